"""Small JSON caches on disk for accounting results that are pure functions of public inputs.

Calibrated noise multipliers (`dpimages.privacy.calibrate`) and exact PLD epsilons of event lists
(`dpimages.privacy.ledger`) depend on nothing but the events, delta and the accountant's settings, so they are
cached under ``$DPIMAGES_CACHE`` (default ``~/.cache/dpimages``). Nothing about any data set is stored. A cache
is an optimisation only: an unreadable or unwritable one is ignored.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def cache_dir() -> Path:
    return Path(os.environ.get("DPIMAGES_CACHE", Path.home() / ".cache" / "dpimages"))


def load(name: str) -> dict[str, Any]:
    """The cache `name` (``NAME.json``), or {}."""
    try:
        return json.loads((cache_dir() / f"{name}.json").read_text())
    except (OSError, ValueError):
        return {}


def store(name: str, key: str, value: Any) -> None:
    """Add `key` -> `value` to the cache `name`, atomically (a concurrent writer may drop an entry, never corrupt)."""
    path = cache_dir() / f"{name}.json"
    try:
        cache = load(name)
        cache[key] = value
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, path)
    except OSError:
        pass
