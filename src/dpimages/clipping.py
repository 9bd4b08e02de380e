"""Row-wise norm bounds: the one place where vectors are clipped or scaled to a norm.

Used by the privacy mechanisms (a clipped row bounds one example's contribution) and by networks that clip
features in their forward pass (dpaf's discriminator), so neither imports the other. A row holding a
non-finite entry becomes 0: scaling it (0 x inf is NaN) would make a whole sum non-finite depending on whether
that row was present.
"""

from __future__ import annotations

import torch


def clip_rows(x: torch.Tensor, clip_norm: float) -> torch.Tensor:
    """Scale each row of a (N, ...) tensor to L2 norm at most `clip_norm`; a row with a non-finite entry becomes 0."""
    flat = x.reshape(x.shape[0], -1)
    norms = flat.norm(dim=1, keepdim=True)
    factor = (clip_norm / (norms + 1e-12)).clamp(max=1.0)
    return torch.where(torch.isfinite(norms), flat * factor, 0.0).reshape(x.shape)


def normalise_rows(rows: torch.Tensor, clip_norm: float) -> torch.Tensor:
    """Every row of (T, D) `rows` scaled to L2 norm exactly `clip_norm`, in float64 (the result's dtype).

    Norms are taken in float64 (no underflow for float32 rows), so a scaled row's norm is C up to float64
    rounding (relative 1e-15). Rows that are zero or hold a non-finite entry become zero rows (norm 0 <= C).
    """
    rows = rows.to(torch.float64)
    norms = torch.linalg.vector_norm(rows, dim=1, keepdim=True)
    usable = torch.isfinite(norms) & (norms > 0)
    return torch.where(usable, rows / torch.where(usable, norms, 1.0) * clip_norm, 0.0)
