"""Run directories: config, ledger, metrics, checkpoints, samples, report.

Layout (SHAREABLE: nothing in it is derived from private data without noise;
`dpimages export` copies exactly the files the run recorded as shareable in
``shareable.json`` when it wrote them, never whatever else lies in a folder)::

    RUN/config.yaml      resolved config, seed, versions, N            SHAREABLE
    RUN/privacy.json     the ledger (written before each release's noise) SHAREABLE
    RUN/metrics.jsonl    one JSON object per logged step (noisy or public values,
                         no per-step timing)                             SHAREABLE
    RUN/samples/         grid PNGs (`Run.grid_path` records each one)     SHAREABLE
    RUN/shareable.json   the allow-list: each shareable file and why
    RUN/report.md        what was trained, privacy spent, metrics, grids  SHAREABLE
    RUN/checkpoints/     model.safetensors + state.json (never pickle) and
                         data-check.json (keyed hash of the private data
                         with its random key): owner only
    RUN/private-eval/    evaluation against the private data without noise
                         (closest pairs, FID reference): owner only

The data check: a run stores an HMAC-SHA256 of its private data under a
random 32-byte key from the OS, both only under ``checkpoints/``, so
``--resume`` can refuse other data while no shareable file carries an
unkeyed fingerprint that a holder of a candidate data set could confirm.

Checkpoints are written atomically: tensors first to a new file, then
state.json (which names that file) replaced in one step. The helpers at the
end (`prefixed`, `optimizer_tensors`, `rng_state` and their inverses) turn
module, optimizer and generator states into that format: named tensors for
the safetensors file, JSON-able values for state.json.

In a process group (torchrun) only rank 0 writes: the other ranks hold a
``Run(path, writer=False)``, whose writing methods (`start`, `log`,
`save_checkpoint`, `write_report`) do nothing; they still read (e.g.
`load_checkpoint`).
"""

from __future__ import annotations

import base64
import hmac
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file

from dpimages.errors import InputError

PRIVATE_EVAL_README = """Owner only: do not share this folder.

These files are evaluations against the PRIVATE data without any privacy noise
(closest private image to each synthetic one, FID against private features,
memorization figures). They are for the data owner's own quality checks and
are not covered by the run's differential-privacy guarantee. `dpimages export`
never copies them.
"""

# keys of config.yaml that may differ between a run and its resumption
RESUME_FREE_KEYS = ("created", "resumed", "versions", "device", "threads", "world_size")
PRIVATE_EVAL = "private-eval"  # the one folder name under which evaluations against private data are written
SHAREABLE_MANIFEST = "shareable.json"
# the files every run writes, and why each may be shared (the export's MANIFEST repeats the reason)
CORE_SHAREABLE = {
    "report.md": "run description and privacy report: settings, budget, noise scales, public facts; no private data",
    "privacy.json": "the ledger: DP events, noise multipliers, sample rates, epsilon, public facts; no private data",
    "config.yaml": "resolved config, seed (not the noise), versions, public facts; no fingerprint of the data",
    "metrics.jsonl": "logged noisy or public values (no per-step timing); post-processing of DP releases",
}
GRID_REASON = "synthetic images: post-processing of the run's DP releases"


def check_private_eval_path(path: str | os.PathLike, what: str) -> Path:
    """`path`, if it lies in a folder named ``private-eval`` (where files showing private data belong); else
    InputError naming where to put it."""
    p = Path(path)
    if PRIVATE_EVAL not in p.resolve().parent.parts:
        raise InputError(f"{what} {p} shows private images and must lie in a folder named {PRIVATE_EVAL}/ "
                         f"(e.g. RUN/{PRIVATE_EVAL}/{p.name}), which dpimages export never copies")
    return p


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class Run:
    """One run directory; ``writer=False``: read only (the other ranks of a process group)."""

    def __init__(self, path: str | os.PathLike, *, writer: bool = True) -> None:
        self.path = Path(path)
        self.writer = bool(writer)

    # -- paths -----------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def privacy_path(self) -> Path:
        return self.path / "privacy.json"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def samples_dir(self) -> Path:
        return self.path / "samples"

    @property
    def report_path(self) -> Path:
        return self.path / "report.md"

    @property
    def private_eval_dir(self) -> Path:
        """Evaluations against private data without noise: for the data owner only, never exported."""
        return self.path / "private-eval"

    def private_eval_prefix(self, name: str = "eval") -> Path:
        """A file prefix under `private_eval_dir`, created with its owner-only README (writer or not)."""
        self.private_eval_dir.mkdir(parents=True, exist_ok=True)
        readme = self.private_eval_dir / "README.txt"
        if not readme.exists():
            readme.write_text(PRIVATE_EVAL_README)
        return self.private_eval_dir / name

    @property
    def data_check_path(self) -> Path:
        return self.checkpoint_dir / "data-check.json"

    # -- the shareable allow-list ----------------------------------------------------------
    def shareable(self) -> dict[str, str]:
        """{relative path: why it may be shared} of every file this run recorded as shareable ({} if none)."""
        try:
            return dict(json.loads((self.path / SHAREABLE_MANIFEST).read_text())["files"])
        except (FileNotFoundError, KeyError, ValueError):
            return {}

    def record_shareable(self, rel: str, reason: str) -> None:
        """Record `rel` (a path relative to the run) as shareable, with `reason`: what `dpimages export` copies."""
        if not self.writer:
            return
        files = self.shareable()
        if files.get(rel) == reason:
            return
        files[rel] = reason
        _atomic_write(self.path / SHAREABLE_MANIFEST, json.dumps({"files": files}, indent=1))

    def grid_path(self, name: str) -> Path:
        """``samples/NAME``, recorded as shareable: where a method writes a grid of its synthetic images."""
        if "/" in name or name.startswith("."):
            raise InputError(f"a grid name is a plain file name, got {name!r}")
        self.samples_dir.mkdir(parents=True, exist_ok=True)
        self.record_shareable(f"samples/{name}", GRID_REASON)
        return self.samples_dir / name

    # -- the keyed data check (owner only) -----------------------------------------
    def write_data_check(self, digest: Callable[[bytes], str]) -> None:
        """Store ``digest(key)`` (an HMAC of the private data) with a fresh random key, under checkpoints/."""
        if not self.writer:
            return
        key = os.urandom(32)
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.data_check_path, json.dumps({"key": key.hex(), "hmac": digest(key)}))

    def verify_data_check(self, digest: Callable[[bytes], str]) -> None:
        """InputError unless the stored keyed hash matches ``digest(stored key)`` (resume on the same data)."""
        try:
            stored = json.loads(self.data_check_path.read_text())
            key, expected = bytes.fromhex(stored["key"]), str(stored["hmac"])
        except (FileNotFoundError, KeyError, ValueError):
            raise InputError(f"--resume: {self.data_check_path} is missing or unreadable: cannot check that the "
                             "private data is the run's") from None
        if not hmac.compare_digest(digest(key), expected):
            raise InputError(f"--resume: {self.path} was started with a different data set")

    # -- lifecycle ---------------------------------------------------------------
    def exists(self) -> bool:
        return self.config_path.exists()

    def start(self, config: dict[str, Any], *, resume: bool) -> None:
        """Create the directory or, with `resume`, check it matches `config` (a non-writer does nothing)."""
        if not self.writer:
            return
        if resume:
            if not self.exists():
                raise InputError(f"--resume: no run to resume in {self.path} (config.yaml missing)")
            old = self.read_config()
            diffs = sorted(
                k for k in set(old) | set(config) if k not in RESUME_FREE_KEYS and old.get(k) != config.get(k)
            )
            if diffs:
                raise InputError(f"--resume: {self.path} was started with a different config ({', '.join(diffs)})")
            if not self.privacy_path.exists():
                raise InputError(f"--resume: {self.privacy_path} is missing: a run cannot resume without its "
                                 "ledger (what was already spent would go uncounted)")
            return
        if self.path.exists() and any(self.path.iterdir()):
            raise InputError(f"run directory {self.path} is not empty: use --resume or a new --run-dir")
        self.path.mkdir(parents=True, exist_ok=True)
        self.samples_dir.mkdir(exist_ok=True)
        self.checkpoint_dir.mkdir(exist_ok=True)
        _atomic_write(
            self.config_path, yaml.safe_dump({**config, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}, sort_keys=False)
        )
        for rel, why in CORE_SHAREABLE.items():
            self.record_shareable(rel, why)

    def read_config(self) -> dict[str, Any]:
        try:
            return yaml.safe_load(self.config_path.read_text()) or {}
        except FileNotFoundError:
            raise InputError(f"not a run directory (config.yaml missing): {self.path}") from None

    # -- metrics -----------------------------------------------------------------
    def log(self, step: int, **values: Any) -> None:
        """Append one metrics line. Only noisy or public quantities belong here.

        No timestamp per line: the time of a private step depends on its private batch size, so timing is
        logged only as aggregates over a whole run or stage (``fit_s``, ``train_s`` in the done events).
        """
        if not self.writer:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]

    # -- checkpoints -------------------------------------------------------------
    def save_checkpoint(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        """tensors -> safetensors, state (JSON) -> state.json, atomically."""
        if not self.writer:
            return
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        step = int(state.get("step", 0))
        name = f"model-{step:08d}.safetensors"
        tmp = self.checkpoint_dir / (name + ".tmp")
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, self.checkpoint_dir / name)
        _atomic_write(self.checkpoint_dir / "state.json", json.dumps({**state, "tensors": name}, indent=1))
        for old in self.checkpoint_dir.glob("model-*.safetensors"):
            if old.name != name:
                old.unlink(missing_ok=True)

    def load_checkpoint(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        state_path = self.checkpoint_dir / "state.json"
        if not state_path.exists():
            return None
        state = json.loads(state_path.read_text())
        return load_file(str(self.checkpoint_dir / state["tensors"])), state

    def write_report(self, text: str) -> None:
        if not self.writer:
            return
        _atomic_write(self.report_path, text)


# -- checkpoint parts: named tensors (safetensors) and JSON (state.json); never pickle ----------------------
def prefixed(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` (a module's state dict) as ``PREFIX.NAME`` tensors: detached CPU copies, safe to save later."""
    return {f"{prefix}.{k}": v.detach().clone().cpu() for k, v in state.items()}


def unprefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `prefixed`: the ``PREFIX.*`` tensors of `tensors` without the prefix ({} when none)."""
    n = len(prefix) + 1
    return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def optimizer_tensors(prefix: str, opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer's state split for a checkpoint: (tensors, JSON part).

    The tensors are named ``PREFIX.PARAM_ID.KEY`` (non-tensor values such as a step count become 0-d tensors);
    the JSON part is ``{"param_groups": [...]}``. `load_optimizer` restores both.
    """
    sd = opt.state_dict()
    tensors = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            tensors[f"{prefix}.{pid}.{k}"] = v if isinstance(v, torch.Tensor) else torch.tensor(v)
    return tensors, {"param_groups": sd["param_groups"]}


def load_optimizer(prefix: str, opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: dict[str, Any],
                   device: torch.device | None = None) -> None:
    """Restore what `optimizer_tensors` saved under `prefix` into `opt`.

    Only the ``PREFIX.*`` entries of `tensors` are read (others are ignored); with `device` they are moved
    there first. `groups` is the JSON part saved with them.
    """
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in tensors.items():
        if key.startswith(prefix + "."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = v if device is None else v.to(device)
    opt.load_state_dict({"state": state, "param_groups": groups["param_groups"]})


def rng_state(g: torch.Generator) -> str:
    """A torch generator's state as base64 text (for state.json); `set_rng_state` restores it."""
    return base64.b64encode(g.get_state().cpu().numpy().tobytes()).decode("ascii")


def set_rng_state(g: torch.Generator, text: str) -> None:
    """Restore a state saved by `rng_state` into `g`."""
    g.set_state(torch.from_numpy(np.frombuffer(base64.b64decode(text), np.uint8).copy()))
