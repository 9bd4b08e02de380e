"""One file-hash helper: SHA-256 over files' bytes, read in chunks.

For provenance of models and files loaded by path (public models, feature
networks, weights a user brings) and for export manifests of DP outputs.
Never applied to private data: a run's private-data check is a keyed HMAC
(`ImageData.keyed_digest`), kept under ``checkpoints/``.
"""

from __future__ import annotations

import hashlib
import os


def file_sha256(*paths: str | os.PathLike) -> str:
    """Hex SHA-256 over the bytes of `paths`, in order (one file: that file's plain SHA-256)."""
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()
