"""DP-SGD engine: Poisson sampling, per-example clipping, noise, one ledger step per update.

Privacy contract
----------------
Neighbouring relation: add or remove one image together with its label.
Each logical step of `DPSGD`:

1. takes the examples of one Poisson batch (`PoissonSampler`: every example
   independently with probability ``q``; ``q`` is the sampler's, never
   ``batch / len(data)``);
2. computes per-example gradient norms and clipped sums of the caller's
   per-example loss, in physical chunks of at most ``max_physical_batch``
   examples (virtual batches; the result equals one big batch up to float
   summation order; the default "auto" picks chunks whose per-example
   gradients take about 32 MiB on a CPU, 2 GiB on a GPU), by one of two
   paths that compute the same thing (``per_example``):

   * ``"book-keeping"`` (`dpimages.privacy.ghost_clipping`): one ordinary
     forward and backward with layer hooks, per-layer norms formed directly
     or by the ghost-norm identity, whichever is cheaper, and the clipped sum
     from the stored activations. Used by ``"auto"`` on a CPU (where it was
     measured faster; on a GPU "auto" keeps torch.func until measured), and
     by an explicit ``"book-keeping"``, when
     every trainable parameter sits in exactly one supported layer, the loss
     is deterministic (``randomness="error"``) and, on a whole physical
     chunk of the first batch (at least two examples) with every weight
     perturbed, its norms and clipped sum match the ``torch.func`` path's to
     1e-4. Book-keeping then only ever sees chunks no larger than the
     largest probed one (a larger chunk is probed first), so a loss that
     mixes examples in groups of any size up to a chunk is caught, and a loss
     cannot mix examples across chunks (it is called on one chunk at a
     time); each layer's rows per example seen in the probe must hold on
     every later chunk. These checks guard what structure cannot show: a
     loss that mixes examples, a parameter used outside its layer's forward,
     rows not grouped per example. A model or loss that fails them falls
     back to torch.func with a warning that names no value. The outcome is
     the same for every data set when the model and loss keep the contract;
     for one that does not, it may depend on the probed examples, and it
     shows only as that warning and the speed (not counted by the ledger);
   * ``"torch.func"``: ``vmap`` over ``grad`` of a ``functional_call``, any
     module that works under ``torch.func``;
3. clips each example's gradient (all trainable parameters together) to L2
   norm ``C`` and sums them, so adding or removing one example moves the sum
   by at most ``C`` (an example whose gradient is not finite contributes 0,
   so it cannot make the whole sum NaN);
4. releases the sum through `NoiseSource.release`, which records
   ``PrivacyEvent.subsampled_gaussian(sigma, q, 1, label)`` in the ledger
   (which checks the budget and writes privacy.json) and only then draws
   ``N(0, (sigma * C)^2)`` noise, one flat draw over all parameters;
5. divides by the *expected* batch size ``q * N`` (N the public data set
   size the sampler was given) and writes ``.grad``; the caller's optimizer
   step is post-processing.

An empty Poisson batch still spends and adds noise (skipping it would reveal
that the batch was empty). The batch size itself is private: the engine
never returns or logs it.

Noise multiplicity K
--------------------
The loss function is ``loss_fn(model, *batch) -> Tensor[B]``: one loss per
example. Inside the engine it is called (under ``vmap``) on one example at
a time with a batch dimension of 1. To use K inner draws per example (DPDM:
K noise levels and noises per image), the loss function repeats the example
K times, computes K losses and returns their mean for that example (see
`repeat_examples` / `mean_over_repeats`). The gradient of that mean is
clipped as a whole, so one example still contributes at most ``C`` and the
privacy cost is unchanged. Inner draws (e.g. diffusion noise) are best drawn
outside the engine and passed in as extra batch-aligned tensors of shape
``(B, K, ...)``, which keeps virtual batches exact; random ops inside the
loss need ``randomness="different"``.

Resume
------
`PrivacyLedger.load` may hold more steps than the last checkpoint (a killed
process spends before it draws noise). A trainer therefore runs only
`DPSGD.steps_remaining` (planned steps minus the ledger's steps of this
release, `steps_spent`), so the final epsilon equals an uninterrupted run's
and nothing is under-counted.

Multi-process (DistributedDataParallel)
---------------------------------------
Launch with ``torchrun`` and ``torch.distributed.init_process_group``
(gloo on CPU, nccl on GPUs) before building the sampler and engine. The
engine then behaves like DDP: parameters are broadcast from rank 0 at
construction; rank 0 draws the Poisson mask and broadcasts it, each rank gets
its shard of the batch; each rank clips its own examples; the clipped sums
are all-reduced; rank 0 alone draws the noise and broadcasts the noisy sum.
Every rank records the same events in its ledger (give only rank 0's ledger
a path; `dpimages fit` under torchrun has rank 0 create or load the ledger
and broadcast it, so the other ranks hold a path-less copy). Accounting is
therefore identical to a single process; all ranks run the same number of
steps because their ledgers agree. Wrapping the model in
``DistributedDataParallel`` is not needed (the engine does the all-reduce);
a wrapped model is unwrapped.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from dpimages.distributed import comm_device, dist_world
from dpimages.errors import InputError
from dpimages.privacy.ghost_clipping import GhostClipping, NotGhostClippable
from dpimages.privacy.ledger import PrivacyEvent, PrivacyLedger, check_positive
from dpimages.privacy.noise import NoiseSource

LossFn = Callable[..., torch.Tensor]
# how the engine computes per-example clipped sums: the same result, only the speed differs (module docstring)
PER_EXAMPLE_METHODS = ("auto", "book-keeping", "torch.func")
# memory for one chunk's per-example gradients when max_physical_batch="auto"
PER_EXAMPLE_GRAD_BYTES = {"cpu": 32 * 2**20, "cuda": 2 * 2**30}

__all__ = [
    "DPSGD", "LossFn", "PoissonSampler", "StepInfo", "auto_physical_batch", "check_model", "mean_over_repeats",
    "repeat_examples", "validate_model",
]


# -- sampling ----------------------------------------------------------------------
class PoissonSampler:
    """Poisson sampling: each step, every example independently with probability `sample_rate`.

    `sample_rate` is what the ledger records. Iterating yields one epoch of
    ``steps_per_epoch = round(1 / sample_rate)`` index tensors (int64). In a
    process group, rank 0 draws the batch and broadcasts it, and each rank
    receives its shard ``batch[rank::world_size]``.
    """

    def __init__(self, n: int, sample_rate: float, noise: NoiseSource, *, shard: bool = True,
                 dataset_size: int | None = None) -> None:
        """`n` examples to sample from; `dataset_size`: the public N (default `n`) that the expected batch size
        ``q * N`` uses. They differ only where a neighbouring data set is fitted under its neighbour's public
        facts (`dpimages.testing`). `shard=False`: this process samples the whole batch itself, even in a
        process group (for a release that rank 0 alone makes, such as DPDM's warm-start stage)."""
        if int(n) != n or n < 1:
            raise InputError(f"n (dataset size) must be a positive integer, got {n}")
        check_positive("sample_rate", sample_rate)
        if sample_rate > 1.0:
            raise InputError(f"sample_rate must be in (0, 1], got {sample_rate}")
        self.n = int(n)
        self.dataset_size = self.n if dataset_size is None else int(dataset_size)
        self.sample_rate = float(sample_rate)
        self.noise = noise
        self.shard = shard

    @classmethod
    def for_batch_size(cls, n: int, expected_batch_size: int, noise: NoiseSource,
                       dataset_size: int | None = None) -> PoissonSampler:
        """A sampler over `n` examples with q = expected_batch_size / N, N = `dataset_size` (public; default n)."""
        size = n if dataset_size is None else int(dataset_size)
        if int(expected_batch_size) != expected_batch_size or not (1 <= expected_batch_size <= size):
            raise InputError(f"expected batch size must be an integer in [1, {size}], got {expected_batch_size}")
        return cls(n, expected_batch_size / size, noise, dataset_size=size)

    @property
    def steps_per_epoch(self) -> int:
        return max(1, round(1.0 / self.sample_rate))

    @property
    def expected_batch_size(self) -> float:
        """q * N with N the public data set size."""
        return self.sample_rate * self.dataset_size

    def sample(self) -> torch.Tensor:
        """Indices of one Poisson batch (this rank's shard in a process group)."""
        rank, world = dist_world()
        if world == 1 or not self.shard:
            return torch.nonzero(self.noise.bernoulli(self.n, self.sample_rate)).flatten()
        dev = comm_device()
        if rank == 0:
            mask = self.noise.bernoulli(self.n, self.sample_rate).to(torch.uint8).to(dev)
        else:
            mask = torch.empty(self.n, dtype=torch.uint8, device=dev)
        torch.distributed.broadcast(mask, src=0)
        return torch.nonzero(mask.cpu()).flatten()[rank::world]

    def __iter__(self) -> Iterator[torch.Tensor]:
        for _ in range(self.steps_per_epoch):
            yield self.sample()

    def __len__(self) -> int:
        return self.steps_per_epoch


# -- model validation ---------------------------------------------------------------
def validate_model(model: nn.Module, name: str = "model") -> list[str]:
    """Every problem that makes `model` unfit for per-example DP-SGD, one line each (empty: fine).

    Refused: batch normalisation (mixes the examples of a batch) and
    normalisation layers with running statistics (estimated from private
    data and released with the model). Use GroupNorm / LayerNorm instead.
    """
    problems: list[str] = []
    for path, module in model.named_modules():
        where = f"{name}.{path}" if path else name
        kind = type(module).__name__
        if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.SyncBatchNorm)):
            problems.append(f"{where}: {kind} mixes examples in a batch; use GroupNorm")
        elif isinstance(module, nn.modules.instancenorm._InstanceNorm) and module.track_running_stats:
            problems.append(
                f"{where}: {kind} with track_running_stats=True keeps statistics of private data; "
                "set track_running_stats=False or use GroupNorm"
            )
    return problems


def check_model(model: nn.Module, name: str = "model") -> None:
    """Raise InputError listing all of `validate_model`'s problems at once."""
    problems = validate_model(model, name)
    if problems:
        raise InputError(f"model not usable with DP-SGD ({len(problems)} problem(s)): " + "; ".join(problems))


# -- noise multiplicity helpers ------------------------------------------------------------
def repeat_examples(x: torch.Tensor, k: int) -> torch.Tensor:
    """(B, ...) -> (B * K, ...), each example repeated K times consecutively."""
    return x.repeat_interleave(k, dim=0)


def mean_over_repeats(losses: torch.Tensor, k: int) -> torch.Tensor:
    """(B * K,) per-draw losses -> (B,) per-example means (what noise multiplicity clips)."""
    return losses.reshape(-1, k).mean(dim=1)


def auto_physical_batch(num_params: int, device: torch.device, element_size: int = 4) -> int:
    """Chunk size whose per-example gradients take about `PER_EXAMPLE_GRAD_BYTES` (a power of 2).

    On a CPU, chunks whose per-example gradients stay near the cache size
    are markedly faster than one big batch (e.g. 256 rather than 1,024
    examples of a 26k-parameter CNN); on a GPU the budget is larger.
    """
    budget = PER_EXAMPLE_GRAD_BYTES["cuda" if device.type == "cuda" else "cpu"]
    n = max(1, budget // max(1, num_params * element_size))
    return 1 << (n.bit_length() - 1)


# -- accounting helpers -------------------------------------------------------------------
@dataclass(frozen=True)
class StepInfo:
    """Post-processing facts about one noisy step (safe to log)."""

    step: int  # ledger steps of this release after this step
    noisy_grad_norm: float  # L2 norm of the noisy, scaled gradient


# -- the engine ---------------------------------------------------------------------------
class DPSGD:
    """Per-example clipped, noised gradients for any optimizer; one ledger step per update.

    Usage::

        sampler = PoissonSampler(len(data), q, noise)
        engine = DPSGD(model, loss_fn, sampler=sampler, noise_multiplier=sigma, clip_norm=1.0,
                       ledger=ledger, noise=noise)
        engine.plan(total_steps)             # reserves the whole schedule in the ledger
        for _ in range(engine.steps_remaining):
            idx = sampler.sample()
            engine.step(x[idx], y[idx])       # sets .grad of the trainable parameters
            optimizer.step()

    ``loss_fn(model, *batch)`` returns one loss per example, shape (B,);
    `model` is a callable with the module's signature. ``step`` may also be
    split into `clip_and_accumulate` (any number of calls, one per physical
    chunk) followed by `add_noise` (spend, noise, scale, set ``.grad``).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        *,
        sampler: PoissonSampler,
        noise_multiplier: float,
        clip_norm: float,
        ledger: PrivacyLedger,
        noise: NoiseSource,
        label: str = "dp-sgd",
        max_physical_batch: int | str | None = "auto",
        randomness: str = "error",
        per_example: str = "auto",
    ) -> None:
        check_positive("noise_multiplier", noise_multiplier)
        check_positive("clip_norm", clip_norm)
        if max_physical_batch not in (None, "auto") and (
            isinstance(max_physical_batch, (str, bool)) or int(max_physical_batch) != max_physical_batch
            or max_physical_batch < 1
        ):
            raise InputError(
                f"max_physical_batch must be a positive integer, 'auto' or None, got {max_physical_batch!r}"
            )
        if randomness not in ("error", "different", "same"):
            raise InputError(f"randomness must be 'error', 'different' or 'same', got {randomness!r}")
        if per_example not in PER_EXAMPLE_METHODS:
            raise InputError(f"per_example must be one of {', '.join(PER_EXAMPLE_METHODS)}, got {per_example!r}")
        module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        check_model(module)
        self.module = module
        self.loss_fn = loss_fn
        self.sampler = sampler
        self.noise_multiplier = float(noise_multiplier)
        self.clip_norm = float(clip_norm)
        self.ledger = ledger
        self.noise = noise
        self.label = label
        self.planned_steps: int | None = None
        self._named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        if not self._named:
            raise InputError("model has no trainable parameters (requires_grad=True)")
        self._frozen = {n: p for n, p in module.named_parameters() if not p.requires_grad}
        self.num_params = sum(p.numel() for _, p in self._named)
        ref = self._named[0][1]
        if max_physical_batch == "auto":
            max_physical_batch = auto_physical_batch(self.num_params, ref.device, ref.element_size())
        self.max_physical_batch = None if max_physical_batch is None else int(max_physical_batch)
        self._sum = torch.zeros(self.num_params, device=ref.device, dtype=ref.dtype)
        self._views = self._split(self._sum)
        self._rank, self._world = dist_world()
        if self._world > 1 and not sampler.shard:  # every rank would add its own whole batch: sensitivity world x C
            raise InputError("DP-SGD in a process group needs a sharded sampler (PoissonSampler(..., shard=True))")
        if self._world > 1:
            with torch.no_grad():
                for t in [*module.parameters(), *module.buffers()]:
                    buf = t.detach().to(comm_device())
                    torch.distributed.broadcast(buf, src=0)
                    t.copy_(buf.to(t.device))
        self._per_example = vmap(grad(self._example_loss), in_dims=(None, None, 0), randomness=randomness)
        self._ghost: GhostClipping | None = None
        self._probed = 0  # largest chunk on which book-keeping matched torch.func; it never sees a larger one
        # "auto": book-keeping where it was measured faster (CPU, benchmarks/results/dpsgd_overhead.json); on a GPU
        # torch.func stays the default until a GPU run of benchmarks/dpsgd_overhead.py --device cuda says otherwise
        wanted = per_example == "book-keeping" or (per_example == "auto" and randomness == "error"
                                                    and ref.device.type == "cpu")
        if wanted:
            try:
                self._ghost = GhostClipping(module)
            except NotGhostClippable as err:
                if per_example == "book-keeping":
                    raise InputError(f"per_example='book-keeping' does not apply to this model: {err}") from None

    @property
    def per_example(self) -> str:
        """The path computing per-example norms and clipped sums now: "book-keeping" or "torch.func"."""
        return "torch.func" if self._ghost is None else "book-keeping"

    # -- accounting ------------------------------------------------------------
    @property
    def sample_rate(self) -> float:
        return self.sampler.sample_rate

    def event(self, steps: int = 1) -> PrivacyEvent:
        """The ledger event of `steps` noisy updates of this engine."""
        return PrivacyEvent.subsampled_gaussian(self.noise_multiplier, self.sample_rate, steps, self.label)

    def plan(self, steps: int) -> None:
        """Reserve the whole schedule of `steps` updates (BudgetExceeded before any private access).

        Steps already in the ledger for this release (a resumed run) count
        towards the plan; see `steps_remaining`.
        """
        if int(steps) != steps or steps < 1:
            raise InputError(f"steps must be a positive integer, got {steps}")
        self.ledger.reserve(self.event(int(steps)))
        self.planned_steps = int(steps)

    @property
    def steps_spent(self) -> int:
        """Noisy updates of this release already recorded in the ledger (all runs of it)."""
        return self.ledger.steps(like=self.event())

    @property
    def steps_remaining(self) -> int:
        """Planned steps not yet in the ledger: what a (resumed) trainer must still run."""
        if self.planned_steps is None:
            raise InputError("call plan(steps) before asking for steps_remaining")
        return max(0, self.planned_steps - self.steps_spent)

    # -- per-example gradients ----------------------------------------------------------
    def _split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        out, i = [], 0
        for _, p in self._named:
            out.append(flat[i : i + p.numel()].view_as(p))
            i += p.numel()
        return out

    def _example_loss(self, params: dict, rest: dict, example: tuple[torch.Tensor, ...]) -> torch.Tensor:
        def model(*args: object, **kwargs: object) -> torch.Tensor:
            return functional_call(self.module, (params, rest), args, kwargs)

        losses = self.loss_fn(model, *(t.unsqueeze(0) for t in example))
        if losses.shape != (1,):
            raise InputError(f"loss_fn must return one loss per example, shape (B,); got {tuple(losses.shape)} for B=1")
        return losses.sum()

    def _state(self) -> tuple[dict, dict]:
        params = {n: p.detach() for n, p in self._named}
        rest = {n: b.detach() for n, b in self.module.named_buffers()}
        rest.update({n: p.detach() for n, p in self._frozen.items()})
        return params, rest

    def per_example_grads(self, *batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """Unclipped per-example gradients {name: (B, *param.shape)} (no privacy: internal and tests)."""
        _check_batch(batch)
        params, rest = self._state()
        return self._per_example(params, rest, tuple(batch))

    def clip_and_accumulate(self, *batch: torch.Tensor) -> None:
        """Add the clipped per-example gradients of `batch` (tensors with a common first dim) to the sum."""
        _check_batch(batch)
        b = batch[0].shape[0]
        if b == 0:
            return
        chunk = self.max_physical_batch or b
        for start in range(0, b, chunk):
            part = tuple(t[start : start + chunk] for t in batch)
            size = part[0].shape[0]
            sums = None
            if self._ghost is not None and size > self._probed and size >= 2:
                self._probe_ghost_clipping(part)  # a chunk larger than any probed one is probed first
            if self._ghost is not None and size <= self._probed:
                try:
                    sums, _ = self._ghost.clipped_sum(self.loss_fn, part, self.clip_norm)
                except NotGhostClippable as err:  # nothing was added: this chunk goes the torch.func way
                    self._fall_back(str(err))
            if sums is None:
                sums, _ = self._clipped_torch_func(part)
            for (_, p), view in zip(self._named, self._views, strict=True):
                if p in sums:  # book-keeping leaves out the layers that did not run: their gradient is 0
                    view.add_(sums[p])

    def _clipped_torch_func(self, part: tuple[torch.Tensor, ...]) -> tuple[dict[nn.Parameter, torch.Tensor],
                                                                             torch.Tensor]:
        """({param: clipped sum}, per-example norms) of `part` by vmap over grad (as `GhostClipping.clipped_sum`)."""
        params, rest = self._state()
        grads = self._per_example(params, rest, part)
        flat = [grads[n].reshape(part[0].shape[0], -1) for n, _ in self._named]
        norms = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, dim=1) for g in flat]), dim=0)
        bad = ~torch.isfinite(norms)
        if bad.any():  # an example whose gradient is not finite contributes 0 (0 x inf would be NaN for all)
            flat = [torch.where(bad[:, None], 0.0, g) for g in flat]
            norms = torch.where(bad, 0.0, norms)
        factor = (self.clip_norm / (norms + 1e-6)).clamp(max=1.0)
        return {p: (g.t() @ factor).view_as(p) for g, (_, p) in zip(flat, self._named, strict=True)}, norms

    def _probe_ghost_clipping(self, probe: tuple[torch.Tensor, ...]) -> None:
        """Keep book-keeping only if it reproduces the torch.func norms and clipped sum on the chunk `probe`.

        Both paths run with every trainable weight perturbed (a fixed, public
        generator; the weights are restored), so that zero-initialised layers
        do not hide the other layers' gradients. Nothing here is released or
        logged: a mismatch only switches this engine to the torch.func path,
        with a warning naming no value. On success, chunks up to the probe's
        size go the book-keeping way.
        """
        assert self._ghost is not None
        reason = ""
        saved = [p.detach().clone() for _, p in self._named]
        gen = torch.Generator(device=saved[0].device).manual_seed(20211)
        try:
            with torch.no_grad():
                for _, p in self._named:
                    spread = float(p.std()) if p.numel() > 1 else 0.0
                    p.add_(torch.randn(p.shape, generator=gen, device=p.device, dtype=p.dtype) * (spread or 0.05))
            sums, norms = self._ghost.clipped_sum(self.loss_fn, probe, self.clip_norm)
            ref_sums, ref_norms = self._clipped_torch_func(probe)
            scale = float(ref_norms.max()) + 1e-6
            # float32 sums of b terms of norm <= C round differently in the two paths: measured up to ~1e-6 b C
            # per entry (an outlier image's clipped gradient; entries near 0, e.g. a bias before a normalisation,
            # have no relative precision to check), so 10 times that; a loss that mixes examples or a wrong layer
            # norm moves entries by a share of C per example
            atol = 1e-5 * self.clip_norm * probe[0].shape[0]
            same = torch.allclose(norms, ref_norms, rtol=1e-4, atol=1e-6 * scale) and all(
                torch.allclose(sums.get(p, torch.zeros_like(r)), r, rtol=1e-4, atol=atol)
                for p, r in ref_sums.items())
            if not same:
                reason = "its per-example norms differ from torch.func's on the first batch"
        except InputError:
            raise
        except Exception as err:  # noqa: BLE001 - any failure of the probe means: do not trust book-keeping
            reason = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
        finally:
            with torch.no_grad():
                for (_, p), v in zip(self._named, saved, strict=True):
                    p.copy_(v)
        if reason:
            self._fall_back(reason)
        else:
            self._probed = probe[0].shape[0]

    def _fall_back(self, reason: str) -> None:
        self._ghost = None
        warnings.warn(f"DP-SGD engine {self.label!r}: book-keeping clipping does not apply ({reason}); "
                      "using torch.func per-example gradients", RuntimeWarning, stacklevel=4)

    def add_noise(self) -> StepInfo:
        """Spend one step, add N(0, (sigma*C)^2) to the clipped sum, divide by q*N, set `.grad`.

        The ledger records the step before the noise is drawn. In a process
        group the sums are all-reduced and rank 0 draws the noise.
        """
        total = self._sum
        if self._world > 1:
            dev = comm_device()
            total = total.to(dev)
            torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.SUM)
        total = self.noise.release(total, sensitivity=self.clip_norm, event=self.event(1), ledger=self.ledger,
                                   draw=self._rank == 0)
        if self._world > 1:
            torch.distributed.broadcast(total, src=0)
        grad_flat = (total / self.sampler.expected_batch_size).to(self._sum.device)
        for (_, p), g in zip(self._named, self._split(grad_flat), strict=True):
            p.grad = g.clone()
        self._sum.zero_()
        return StepInfo(step=self.steps_spent, noisy_grad_norm=float(grad_flat.norm()))

    def step(self, *batch: torch.Tensor) -> StepInfo:
        """One noisy update on the Poisson batch `batch` (possibly empty): sets `.grad` of the model."""
        self.clip_and_accumulate(*batch)
        return self.add_noise()

    def accumulated(self) -> torch.Tensor:
        """A copy of the flat clipped sum since the last noisy step.

        Not a DP release: for tests and internal checks only; never log it.
        """
        return self._sum.clone()

    def zero_accumulated(self) -> None:
        """Drop clipped sums accumulated since the last noisy step (nothing was released)."""
        self._sum.zero_()


def _check_batch(batch: Sequence[torch.Tensor]) -> None:
    if not batch:
        raise InputError("a batch needs at least one tensor")
    sizes = {tuple(t.shape[:1]) for t in batch}
    if len(sizes) != 1 or any(t.ndim == 0 for t in batch):
        raise InputError(
            "batch tensors must share their first (example) dimension, got shapes "
            + ", ".join(str(tuple(t.shape)) for t in batch)
        )
