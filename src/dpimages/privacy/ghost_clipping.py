"""Per-example clipped gradient sums from one ordinary backward pass (book-keeping, ghost norms).

Under its contract (below) it computes what `DPSGD`'s ``torch.func`` path
computes for the same examples: ``sum_i min(1, C / (||g_i|| + 1e-6)) g_i``
with ``g_i`` the gradient of example i's loss over all trainable parameters,
and the norms ``||g_i||``, only faster. Each layer's norm and its share of
the clipped sum come from the same stored input and output gradient, so a
model that breaks the contract in other ways (an in-place change of a
layer's output, a hook that changes it) gets a wrong gradient that is still
clipped to C; only rows that mix examples break the bound, and those are
what the checks below are for. One forward pass with hooks keeps each
layer's input; one ``torch.autograd.grad`` returns the gradients of the
layers' *outputs* (the parameter gradients are never formed by autograd);
then, layer by layer, example i's gradient norm is computed either

* by forming its per-example weight gradient ``g_i = G_i^T A_i`` (B small
  matrices; cheap when the layer has few positions T), or
* without forming it, by the ghost-norm identity
  ``||G_i^T A_i||^2 = <A_i A_i^T, G_i G_i^T>`` (Li et al. 2022; cheap when
  T^2 (d + p) < T d p),

whichever costs fewer multiply-adds (Bu et al. 2023's mixed ghost clipping).
The clipped sum is then one weighted product per layer (book-keeping: the
stored inputs and output gradients are reused, no second backward).

Cancellation: the ghost norm is a sum of T^2 signed terms. The Gram products
are formed in float64, and an example whose squared norm is small against
its mass ``(sum_t ||a_t|| ||g_t||)^2`` (below `CANCELLATION`, where the
terms cancel) gets its gradient formed instead (`_ghost_part`): its norm and
its share of the sum then come from the same tensor, so a crafted input
whose terms cancel cannot make its float32 share exceed the clip norm while
its computed norm says 0. The same holds for Embedding rows that share an
index. For an example above the cut, the float32 rounding of its share is
at most ``T 2^-24 / sqrt(CANCELLATION)`` of its norm (worst case).

Contract (checked, else the caller must use the ``torch.func`` path):

* every trainable parameter belongs, as ``weight`` or ``bias``, to exactly one
  layer of a supported type (`SUPPORTED`: Linear, Conv2d with groups=1 and numeric
  padding, GroupNorm, Embedding without padding_idx/max_norm), and each such
  layer runs at most once per forward;
* every such layer's batch dimension holds ``K`` consecutive rows per
  example (``K = rows / B``; K > 1 is noise multiplicity as built by
  `repeat_examples` or ``expand(B, K, ...).reshape(B * K, ...)``);
* the loss of example i depends on example i's rows only.

The last two cannot be seen from the module's structure, so `DPSGD` checks
them on its first batch against the ``torch.func`` path, with every weight
perturbed so that no zero-initialised layer hides the others' gradients,
before it trusts this one (``DPSGD._probe_ghost_clipping``), and each layer's
rows per example found there are enforced on every later call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dpimages.errors import InputError

SUPPORTED = (nn.Linear, nn.Conv2d, nn.GroupNorm, nn.Embedding)
# ghost norms below this share of an example's squared mass are formed instead (cancellation)
CANCELLATION = 1e-4

__all__ = ["SUPPORTED", "GhostClipping", "NotGhostClippable", "unsupported_parameters"]


class NotGhostClippable(RuntimeError):
    """This model or loss breaks the book-keeping contract; use the torch.func path."""


def _layer_ok(m: nn.Module) -> bool:
    if type(m) is nn.Conv2d:
        return m.groups == 1 and m.padding_mode == "zeros" and not isinstance(m.padding, str)
    if type(m) is nn.Embedding:
        return m.padding_idx is None and m.max_norm is None and not m.scale_grad_by_freq and not m.sparse
    return type(m) in SUPPORTED  # Linear and GroupNorm: any settings


def unsupported_parameters(module: nn.Module) -> list[str]:
    """Names of trainable parameters that the hooks cannot account for (empty: book-keeping applies).

    Besides parameters outside supported layers: a parameter shared by two layers (tied weights), whose
    per-example norm is not the sum of the two layers' squared norms.
    """
    bad, owners = [], set()
    for mname, m in module.named_modules(remove_duplicate=False):
        for pname, p in m.named_parameters(recurse=False):
            name = f"{mname}.{pname}" if mname else pname
            if p.requires_grad and (not _layer_ok(m) or pname not in ("weight", "bias") or id(p) in owners):
                bad.append(name)
            owners.add(id(p))
    return bad


@dataclass
class _Part:
    """One parameter's per-example squared norms and how to form its clipped sum from per-example factors."""

    param: nn.Parameter
    sq_norms: torch.Tensor  # (B,)
    weighted_sum: Callable[[torch.Tensor], torch.Tensor]  # (B,) factors -> gradient shaped like param


def _ghost_cheaper(t: int, d: int, p: int) -> bool:
    """Ghost norm (T^2 (d + p) multiply-adds per example) beats forming the p x d gradient (T d p)."""
    return t * (d + p) < d * p


def _cancelled(sq: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """(B,) True where an example's squared norm `sq` is small against its squared `mass` (terms cancel)."""
    return sq < CANCELLATION * mass.square()


def _with_formed(param: nn.Parameter, sq: torch.Tensor, weighted: Callable[[torch.Tensor], torch.Tensor],
                 cancelled: torch.Tensor, form: Callable[[torch.Tensor], torch.Tensor]) -> _Part:
    """A ghost part whose `cancelled` examples are formed instead: ``form(index)`` gives their gradients."""
    if not bool(cancelled.any()):
        return _Part(param, sq, weighted)
    which = torch.nonzero(cancelled).flatten()
    formed = _formed_part(param, form(which))
    sq = sq.index_copy(0, which, formed.sq_norms.to(sq.dtype))

    def mixed(c: torch.Tensor) -> torch.Tensor:
        return weighted(c.masked_fill(cancelled, 0.0)) + formed.weighted_sum(c[which])

    return _Part(param, sq, mixed)


def _ghost_part(param: nn.Parameter, a: torch.Tensor, g: torch.Tensor) -> _Part:
    """Weight gradient sum_t g_t a_t^T per example, a (B, T, d), g (B, T, p), never formed per example.

    Squared norms from float64 Gram products; examples whose terms cancel are formed (module docstring).
    """
    b, t, d = a.shape
    p = g.shape[2]
    a64, g64 = a.double(), g.double()
    sq = (torch.bmm(a64, a64.transpose(1, 2)) * torch.bmm(g64, g64.transpose(1, 2))).sum((1, 2))
    mass = (a64.norm(dim=2) * g64.norm(dim=2)).sum(1)

    def weighted(c: torch.Tensor) -> torch.Tensor:
        return ((g * c.view(b, 1, 1)).reshape(b * t, p).t() @ a.reshape(b * t, d)).view_as(param)

    return _with_formed(param, sq, weighted, _cancelled(sq, mass),
                        lambda i: torch.bmm(g[i].transpose(1, 2), a[i]).view(-1, *param.shape))


def _formed_part(param: nn.Parameter, per_example: torch.Tensor) -> _Part:
    """A parameter whose per-example gradients (B, ...) are formed: squared norms and the weighted sum."""
    flat = per_example.reshape(per_example.shape[0], -1)
    return _Part(param, flat.pow(2).sum(1), lambda c: (c @ flat).view_as(param))


def _matrix_part(param: nn.Parameter, a: torch.Tensor, g: torch.Tensor) -> _Part:
    """Linear weight: a (B, T, d), g (B, T, p); the cheaper of ghost norm and forming (B, p, d)."""
    if _ghost_cheaper(a.shape[1], a.shape[2], g.shape[2]):
        return _ghost_part(param, a, g)
    return _formed_part(param, torch.bmm(g.transpose(1, 2), a))


def _conv_weight_part(m: nn.Conv2d, x: torch.Tensor, g: torch.Tensor, b: int) -> _Part:
    """Conv2d weight; x (B*K, Cin, H, W), g (B*K, Cout, H', W').

    Formed per example by one grouped weight-gradient convolution (groups = B,
    the K rows of an example in its batch dimension, which sums them), or by
    the ghost norm over unfolded patches where that is cheaper.
    """
    w = m.weight
    k = x.shape[0] // b
    cout, cin = w.shape[0], w.shape[1]
    positions = k * g.shape[2] * g.shape[3]
    if _ghost_cheaper(positions, w[0].numel(), cout):
        u = F.unfold(x, m.kernel_size, m.dilation, m.padding, m.stride)  # (B*K, d, L)
        a = u.view(b, k, u.shape[1], u.shape[2]).transpose(2, 3).reshape(b, positions, u.shape[1])
        gg = g.reshape(b, k, cout, -1).transpose(2, 3).reshape(b, positions, cout)
        return _ghost_part(w, a, gg)
    xs = x.view(b, k, *x.shape[1:]).transpose(0, 1).reshape(k, b * cin, *x.shape[2:])
    gs = g.view(b, k, *g.shape[1:]).transpose(0, 1).reshape(k, b * cout, *g.shape[2:])
    per_example = torch.nn.grad.conv2d_weight(xs, (b * cout, cin, *w.shape[2:]), gs, m.stride, m.padding,
                                              m.dilation, groups=b)
    return _formed_part(w, per_example.reshape(b, *w.shape))


def _parts(m: nn.Module, x: torch.Tensor, g: torch.Tensor, b: int) -> list[_Part]:
    """The parts of layer `m` with input `x` and output gradient `g` (first dim B*K rows, K per example)."""
    if g.shape[0] != x.shape[0]:  # (rows = K * b is checked by the caller)
        raise NotGhostClippable(f"{type(m).__name__}: {g.shape[0]} output rows for {x.shape[0]} input rows")
    w, bias = m.weight, m.bias if hasattr(m, "bias") else None
    out: list[_Part] = []
    if isinstance(m, nn.Linear):
        a, gg = x.reshape(b, -1, x.shape[-1]), g.reshape(b, -1, g.shape[-1])
        if w.requires_grad:
            out.append(_matrix_part(w, a, gg))
        if bias is not None and bias.requires_grad:
            out.append(_formed_part(bias, gg.sum(1)))
    elif isinstance(m, nn.Conv2d):
        cout = g.shape[1]
        if w.requires_grad:
            out.append(_conv_weight_part(m, x, g, b))
        if bias is not None and bias.requires_grad:
            out.append(_formed_part(bias, g.reshape(b, -1, cout, g[0, 0].numel()).sum((1, 3))))
    elif isinstance(m, nn.GroupNorm):
        c = x.shape[1]
        gg = g.reshape(b, -1, c, g[0, 0].numel())
        if w is not None and w.requires_grad:
            xhat = F.group_norm(x, m.num_groups, None, None, m.eps).reshape(gg.shape)
            out.append(_formed_part(w, (gg * xhat).sum((1, 3))))
        if bias is not None and bias.requires_grad:
            out.append(_formed_part(bias, gg.sum((1, 3))))
    elif isinstance(m, nn.Embedding) and w.requires_grad:
        idx, gg = x.reshape(b, -1), g.reshape(b, -1, g.shape[-1])
        g64 = gg.double()
        same = (idx.unsqueeze(2) == idx.unsqueeze(1)).to(g64.dtype)
        sq = (same * torch.bmm(g64, g64.transpose(1, 2))).sum((1, 2))

        def weighted(c: torch.Tensor) -> torch.Tensor:
            rows_g = (gg * c.view(b, 1, 1)).reshape(-1, gg.shape[-1])
            return torch.zeros_like(w).index_add_(0, idx.reshape(-1), rows_g)

        def form(i: torch.Tensor) -> torch.Tensor:  # (n, V, D): each example's rows added at its indices
            n, per = i.numel(), idx.shape[1]
            rows = (torch.arange(n, device=idx.device).repeat_interleave(per) * w.shape[0] + idx[i].reshape(-1))
            flat = torch.zeros(n * w.shape[0], w.shape[1], dtype=gg.dtype, device=gg.device)
            return flat.index_add_(0, rows, gg[i].reshape(-1, gg.shape[-1])).view(n, *w.shape)

        out.append(_with_formed(w, sq, weighted, _cancelled(sq, g64.norm(dim=2).sum(1)), form))
    return out


class GhostClipping:
    """Clipped per-example gradient sums of `module` by hooks (see the module docstring for the contract).

    `rows_per_example` (layer -> K), recorded by the first call (DPSGD's probe), is enforced on every later call: a
    layer whose number of rows does not stay K times the number of examples is not per example (e.g. a layer run
    on a shared table and then indexed), and raises `NotGhostClippable`.
    """

    def __init__(self, module: nn.Module) -> None:
        bad = unsupported_parameters(module)
        if bad:
            raise NotGhostClippable("parameters outside supported layers: " + ", ".join(bad[:5]))
        self.module = module
        self.layers = [m for m in module.modules() if any(p.requires_grad for p in m.parameters(recurse=False))]
        self.rows_per_example: dict[nn.Module, int] = {}

    def clipped_sum(self, loss_fn: Callable[..., torch.Tensor], batch: tuple[torch.Tensor, ...],
                    clip_norm: float) -> tuple[dict[nn.Parameter, torch.Tensor], torch.Tensor]:
        """({param: sum_i c_i g_i}, per-example norms (B,)) with c_i = min(1, C / (||g_i|| + 1e-6)).

        The first call records each layer's rows per example; later calls must match it.
        """
        b = batch[0].shape[0]
        seen: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []

        def keep(m: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if not inputs or not isinstance(inputs[0], torch.Tensor) or not isinstance(output, torch.Tensor):
                raise NotGhostClippable(f"{type(m).__name__} called without a positional tensor input")
            seen.append((m, inputs[0].detach(), output))

        handles = [m.register_forward_hook(keep) for m in self.layers]
        try:
            with torch.enable_grad():
                losses = loss_fn(self.module, *batch)
        finally:
            for h in handles:
                h.remove()
        if losses.shape != (b,):
            raise InputError(f"loss_fn must return one loss per example, shape (B,); "
                             f"got {tuple(losses.shape)} for B={b}")
        if len({id(m) for m, _, _ in seen}) != len(seen):
            raise NotGhostClippable("a layer ran more than once in one forward pass")
        record = not self.rows_per_example
        for m, x, _ in seen:
            if record:
                self.rows_per_example[m] = x.shape[0] // b
            if x.shape[0] != self.rows_per_example.get(m, -1) * b:
                raise NotGhostClippable(f"{type(m).__name__}: {x.shape[0]} rows for {b} examples, not the "
                                      "probe's rows per example")
        outputs = [o for _, _, o in seen]
        grads = torch.autograd.grad(losses.sum(), outputs, allow_unused=True) if outputs else []
        stored = [(m, x, torch.zeros_like(o) if g is None else g.detach())
                  for (m, x, o), g in zip(seen, grads, strict=True)]
        parts, norms = self._parts_and_norms(stored, b, losses)
        bad = ~torch.isfinite(norms)
        if bad.any():  # rare: its stored rows zeroed, an example with a non-finite gradient contributes exactly 0
            stored = [(m, _zero_examples(x, bad), _zero_examples(g, bad)) for m, x, g in stored]
            parts, norms = self._parts_and_norms(stored, b, losses)
        factor = (clip_norm / (norms + 1e-6)).clamp(max=1.0).to(losses.dtype)
        sums: dict[nn.Parameter, torch.Tensor] = {}
        for part in parts:
            sums[part.param] = part.weighted_sum(factor)
        return sums, norms.to(losses.dtype)

    @staticmethod
    def _parts_and_norms(stored: list[tuple[nn.Module, torch.Tensor, torch.Tensor]], b: int,
                         losses: torch.Tensor) -> tuple[list[_Part], torch.Tensor]:
        parts = [part for m, x, g in stored for part in _parts(m, x, g, b)]
        sq = torch.zeros(b, dtype=torch.float64, device=losses.device)
        for part in parts:
            sq = sq + part.sq_norms
        return parts, sq.clamp_min(0.0).sqrt()  # ghost norms can round below 0 where the true norm is 0


def _zero_examples(t: torch.Tensor, bad: torch.Tensor) -> torch.Tensor:
    """`t` (B*K rows, K consecutive per example) with every row of the examples marked in `bad` (B,) set to 0.

    Embedding inputs (indices) are kept: they are finite, and a zero output gradient already zeroes the row.
    """
    if not t.is_floating_point():
        return t
    rows = bad.repeat_interleave(t.shape[0] // bad.shape[0]).view(-1, *([1] * (t.dim() - 1)))
    return torch.where(rows, torch.zeros((), dtype=t.dtype, device=t.device), t)
