"""The fit runner: `fit_run` does what every method needs around its releases, in named steps, and
`load_synthesizer` rebuilds a fitted one from its run directory.

`fit_run`: `_validate` (method, config, budget, data: before anything is written or spent), `_open_run` (the run
directory and its ledger, or the resumed ones), `_fit` (the method's own fit; a refusal before any release
leaves nothing behind), `_finalise` (the exact ledger, the report, callbacks).

Several processes (torchrun): when a ``torch.distributed`` process group is
initialised (``dpimages fit`` does it when ``WORLD_SIZE`` > 1), only methods
with ``distributed = True`` (dpdm) run. Rank 0 is the run directory's only
writer (config.yaml, privacy.json, metrics, checkpoints, grids, report); the
other ranks get a `Run` with ``writer=False``, a copy of rank 0's ledger
without a path (the same events, so the same budget checks and refusals on
every rank) and read the checkpoint that rank 0 wrote.
"""

from __future__ import annotations

import json
import platform
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dpimages import __version__
from dpimages.allocator import keep_freed_memory
from dpimages.budget.runner import RunBudget, open_run_budget
from dpimages.config import MethodConfig, area_scale, parse_overrides, resolve_config
from dpimages.data import ImageData, load
from dpimages.distributed import dist_world, rank0_first, same_on_all_ranks
from dpimages.errors import DPImagesError, InputError
from dpimages.privacy import NoiseSource, PrivacyLedger, validate_budget
from dpimages.registry import method_class, methods
from dpimages.report import render_report
from dpimages.runs import Run
from dpimages.synthesizer import FitContext, FitResult, Synthesizer


def resume_noise(noise: NoiseSource, saved: dict[str, Any], ledger: PrivacyLedger, seed: int) -> bool:
    """Restore a seeded noise source from a checkpoint, never reusing noise; True if it was re-keyed.

    When the ledger is ahead of the checkpoint (the process released more after its last save, then
    stopped), replaying the saved state would draw the same noise again for new releases on possibly
    different values (another device or process count), and two releases with identical noise reveal
    their difference. The source is then re-keyed from the seed and the ledger's step count (both
    public), so a resumed run stays reproducible. Secure sources are never restored (fresh noise).
    """
    if noise.secure:
        return False
    spent = ledger.steps()
    if saved.get("ledger_steps", -1) == spent:
        noise.load_state(saved)
        return False
    noise.load_state({**NoiseSource(seed * 1_000_003 + spent + 1).state(), "gaussian_draws": saved.get(
        "gaussian_draws", 0)})
    return True


def check_checkpoint_against_ledger(run: Run, ledger: PrivacyLedger) -> None:
    """InputError when the checkpoint records more ledger steps than the ledger holds.

    A checkpoint saves the ledger's step count at the save (`FitContext.noise_state`). The ledger only grows
    and is written before each release, so a ledger behind its checkpoint was replaced or edited: resuming
    would under-count what was already spent.
    """
    state_path = run.checkpoint_dir / "state.json"
    if not state_path.exists():
        return
    saved = json.loads(state_path.read_text()).get("noise_rng", {}).get("ledger_steps")
    if saved is not None and int(saved) > ledger.steps():
        raise InputError(f"--resume: the checkpoint records {int(saved)} ledger steps but {run.privacy_path} holds "
                         f"{ledger.steps()}: the ledger was replaced or edited, so the spent budget is unknown")


def check_distributed(cls: type[Synthesizer], world: int) -> None:
    """InputError unless `cls` can fit in a process group of `world` processes."""
    if world > 1 and not cls.distributed:
        multi = ", ".join(m for m in methods() if method_class(m).distributed)
        raise InputError(f"method {cls.name} runs in one process only (world size {world}); run it without "
                         f"torchrun (several processes: {multi})")


def public_facts(private: ImageData, public: ImageData | None, n: int) -> dict[str, Any]:
    """What a run publishes about its private data besides the releases (`PUBLIC_FACTS_TEXT` says why each)."""
    h, w, c = private.image_shape
    return {"dataset_size": int(n), "classes": list(private.classes), "image_shape": [h, w, c],
            "data_name": private.name, "public_data": None if public is None else public.name,
            "timings": "whole-run and whole-stage wall times"}


def _versions() -> dict[str, str]:
    import dp_accounting  # noqa: F401

    return {"dpimages": __version__, "torch": str(torch.__version__), "python": platform.python_version()}


@dataclass
class _Job:
    """A validated fit: everything checked before anything is written or spent."""

    cls: type[Synthesizer]
    config: MethodConfig
    private: ImageData
    public: ImageData | None
    epsilon: float
    delta: float
    preset: str | None
    dataset_size: int  # the public N
    device: torch.device
    world: int
    booking: RunBudget | None = None  # the owner's budget book for this run's data set, if any
    image_size: int | None = None  # --image-size: a folder's images resized and centre-cropped to S x S
    notes: list[str] = field(default_factory=list)  # one-line notes on how the data and config were read
    fit_s: float = 0.0  # the method's fit, wall time (a whole-run time: public)

    def config_record(self, ctx: FitContext) -> dict[str, Any]:
        """config.yaml's content: the resolved config and public facts of the run (shareable)."""
        return {
            "method": self.cls.name, "preset": self.preset, "data": self.private.name,
            "dataset_size": self.dataset_size, "public": None if self.public is None else self.public.name,
            "public_id": None if self.public is None else self.public.public_id, "epsilon": self.epsilon,
            "delta": self.delta, "seed": int(ctx.seed), "noise_source": ctx.noise.kind,
            "config": self.config.to_dict(), "versions": _versions(), "device": str(self.device),
            "world_size": self.world, "image_size": self.image_size, "threads": torch.get_num_threads(),
        }


def _validate(method: str | type[Synthesizer], data: str | ImageData, *, epsilon: float, delta: float,
              preset: str | None, public: str | ImageData | None, overrides: Sequence[str] | dict[str, Any],
              config_file: str | None, num_classes: int | None, skip_bad: bool, device: str | None,
              dataset_size: int | None, budget: str | RunBudget | None = None,
              budget_book: str | Path | None = None, run_dir: str | Path = "", image_size: int | None = None) -> _Job:
    """Step 1: method, config and budget before any data is loaded; the data against delta before anything is
    written or spent (InputError, exit 2)."""
    cls = method if isinstance(method, type) else method_class(method)
    world = dist_world()[1]
    check_distributed(cls, world)
    config = resolve_config(cls.Config, preset, overrides if isinstance(overrides, dict) else list(overrides),
                            config_file)
    validate_budget(epsilon, delta)
    booking = open_run_budget(budget, budget_book, run_dir, world)
    if cls.needs_public and public is None:
        raise InputError(f"method {cls.name} needs public data: pass --public SPEC (e.g. mnist-5k)")
    private = data if isinstance(data, ImageData) else load(data, skip_bad=skip_bad, num_classes=num_classes,
                                                            image_size=image_size)
    private = private.as_one_class()  # unlabelled images: one class, fitted unconditionally (a note says so)
    if private.notes.get("classes_from_labels"):
        raise InputError(f"{private.name}: the number of classes is not given (an npz without a 'classes' array): "
                         "add 'classes' to the file or pass --num-classes K; it is not read from the private labels")
    n_public = len(private) if dataset_size is None else int(dataset_size)
    validate_budget(epsilon, delta, n_public)
    notes = [private.notes["one_class"]] if "one_class" in private.notes else []
    if area_scale(private.image_shape) < 1.0:  # the preset's image-sized keys follow the images (public facts)
        scaled = resolve_config(cls.Config, preset, overrides if isinstance(overrides, dict) else list(overrides),
                                config_file, image_shape=private.image_shape)
        changed = [f"{k} {getattr(config, k)} -> {getattr(scaled, k)}" for k in cls.Config.image_scaled
                   if getattr(config, k) != getattr(scaled, k)]
        if changed:
            h, w, _ = private.image_shape
            notes.append(f"{cls.name}: preset sized for 28x28 images, scaled to {h}x{w}: {', '.join(changed)}")
        config = scaled
    if booking is not None:
        booking.check(n_public)
    public_data = public if (public is None or isinstance(public, ImageData)) else load(public, skip_bad=skip_bad)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if world > 1 and dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())  # torchrun: cuda:LOCAL_RANK (set by the CLI)
    return _Job(cls, config, private, public_data, float(epsilon), float(delta), preset, n_public, dev, world,
                booking, image_size, notes)


def _open_run(job: _Job, run_dir: str | Path, *, noise: NoiseSource, seed: int, resume: bool,
              progress: bool) -> FitContext:
    """Step 2: the run directory and its ledger (rank 0 writes them; the other ranks get a path-less copy), or on
    `resume` the existing ones, checked against the data, the config and the checkpoint."""
    rank = dist_world()[0]
    run = Run(run_dir, writer=rank == 0)
    ctx = FitContext(PrivacyLedger(job.epsilon, job.delta), noise, run, job.device, seed, None,
                     progress and run.writer, job.cls.name, dataset_size=job.dataset_size)
    made: dict[str, PrivacyLedger] = {}

    def start() -> dict[str, Any]:  # rank 0 (the writer) only
        run.start(job.config_record(ctx), resume=resume)  # on resume: refuses another config or a missing ledger
        if resume:
            run.verify_data_check(job.private.keyed_digest)
            ledger = PrivacyLedger.load(run.privacy_path)
            check_checkpoint_against_ledger(run, ledger)
        else:
            run.write_data_check(job.private.keyed_digest)
            ledger = PrivacyLedger(job.epsilon, job.delta, path=run.privacy_path, dataset_size=job.dataset_size,
                                   noise_source=noise.kind)
            ledger.public_facts = public_facts(job.private, job.public, job.dataset_size)
            ledger.write()
        if job.booking is not None:  # every reservation of the run is also reserved in the book, first
            job.booking.attach(ledger, run, job.private, resume)
        made["ledger"] = ledger
        return ledger.to_json(exact=False)

    ledger_json = rank0_first(start)
    ctx.ledger = made["ledger"] if run.writer else PrivacyLedger.from_json(ledger_json)
    ctx.resume_state = run.load_checkpoint() if resume else None
    if dist_world()[1] > 1:  # each process read these itself
        same_on_all_ranks(job.private.fingerprint, "the private data")
        same_on_all_ranks("" if ctx.resume_state is None else json.dumps(ctx.resume_state[1], sort_keys=True,
                                                                          default=str), "the checkpoint read on resume")
    saved = None if ctx.resume_state is None else ctx.resume_state[1].get("noise_rng")
    if saved is not None and resume_noise(noise, saved, ctx.ledger, seed):
        run.log(ctx.ledger.steps(), event="noise_rekeyed", reason="ledger ahead of the checkpoint")
    return ctx


def _fit(job: _Job, ctx: FitContext, *, resume: bool) -> Synthesizer:
    """Step 3: the method's own fit. A refusal before anything was released leaves no run directory behind (the
    same --run-dir can be reused)."""
    synth = job.cls(job.config)
    started = time.time()
    try:
        synth.fit(job.private, job.public, ctx)
    except DPImagesError:
        if not resume and not ctx.ledger.events and ctx.run is not None and ctx.run.writer:
            shutil.rmtree(ctx.run.path, ignore_errors=True)
        raise
    job.fit_s = time.time() - started
    return synth


def _finalise(job: _Job, ctx: FitContext, synth: Synthesizer,
              callbacks: Sequence[Callable[[Synthesizer], None]]) -> None:
    """Step 4 (the writer): the exact ledger, the ``fit_done`` event (whole-run time), the report, callbacks."""
    run = ctx.run
    if run is None or not run.writer:
        return
    if job.booking is not None and (summary := job.booking.finish(ctx.ledger)) is not None:
        ctx.ledger.extra["budget_book"] = summary
    ctx.ledger.write(exact=True)
    run.log(-1, event="fit_done", fit_s=round(job.fit_s, 2), epsilon=ctx.ledger.epsilon())
    run.write_report(render_report(run, synth.report_section()))
    for cb in callbacks:
        cb(synth)


def fit_run(
    method: str | type[Synthesizer],
    data: str | ImageData,
    *,
    epsilon: float,
    delta: float = 1e-5,
    run_dir: str | Path,
    preset: str | None = None,
    public: str | ImageData | None = None,
    overrides: Sequence[str] | dict[str, Any] = (),
    config_file: str | None = None,
    resume: bool = False,
    seed: int = 0,
    insecure_seeded_noise: bool = False,
    num_classes: int | None = None,
    skip_bad: bool = False,
    device: str | None = None,
    progress: bool = True,
    callbacks: Sequence[Callable[[Synthesizer], None]] = (),
    noise_source: NoiseSource | None = None,
    dataset_size: int | None = None,
    budget: str | RunBudget | None = None,
    budget_book: str | Path | None = None,
    image_size: int | None = None,
) -> FitResult:
    """Validate everything, then fit `method` (a registered name, or a `Synthesizer` class) on `data` and write the
    run directory.

    Order matters: method, config and budget are checked before any data is
    loaded; the data's size is checked against delta before anything is
    written or spent. In a torch.distributed process group every rank calls
    this; rank 0 alone writes the run directory and runs `callbacks` (see the
    module docstring).

    Privacy noise and Poisson sampling come from the OS CSPRNG; `seed` seeds
    everything else (initialisation, training draws, generator sampling).
    ``insecure_seeded_noise=True`` draws the noise from `seed` too: a
    reproducible run for tests, NOT private for anyone who knows the seed (the
    ledger says ``noise_source: seeded-insecure`` and the report opens with a
    warning). `num_classes`: the class count of labelled data whose class
    names are not given (an npz without ``classes``); never derived from the
    private labels. Unlabelled data (a flat folder, an npz without labels) is
    read as one class and fitted unconditionally; `FitResult.notes` says so.
    `image_size`: resize and centre-crop a folder's images to S x S.

    For `dpimages.testing` only: `noise_source` replaces the run's noise
    source (a recording or replaying test double; the run is then marked by
    its ``kind``), and `dataset_size` the public N (default ``len(data)``), so
    that a neighbouring data set is fitted under the same public facts.

    `budget`: a data set's name in the owner's budget book (`budget_book`, default its usual place) or a
    `dpimages.budget.RunBudget`: every reservation of the run is also reserved there before anything is
    released, and refused (BudgetExceeded, nothing left behind) past its total (`dpimages.budget.runner`).
    """
    keep_freed_memory()  # large tensors every step: reuse freed memory rather than page-fault it back in
    job = _validate(method, data, epsilon=epsilon, delta=delta, preset=preset, public=public, overrides=overrides,
                    config_file=config_file, num_classes=num_classes, skip_bad=skip_bad, device=device,
                    dataset_size=dataset_size, budget=budget, budget_book=budget_book, run_dir=run_dir,
                    image_size=image_size)
    noise = noise_source or NoiseSource(int(seed) if insecure_seeded_noise else None)
    ctx = _open_run(job, run_dir, noise=noise, seed=seed, resume=resume, progress=progress)
    synth = _fit(job, ctx, resume=resume)
    _finalise(job, ctx, synth, callbacks)
    assert ctx.run is not None
    return FitResult(synth, ctx.ledger, ctx.run, job.config_record(ctx), job.notes)


def load_synthesizer(
    run_dir: str | Path, device: str | None = None, sampling: list[str] | None = None,
    method: type[Synthesizer] | None = None,
) -> Synthesizer:
    """Rebuild a fitted synthesizer from its run directory (config + last checkpoint).

    `sampling`: KEY=VALUE overrides of the method's `sampling_keys` only
    (e.g. dpdm's ``guidance=1``): they change how the released model is
    sampled, post-processing with no privacy cost; the run directory is not
    changed. Any other key is refused (exit 2), since it would describe a
    model that was not fitted. `method`: the class of a run fitted by an unregistered `Synthesizer` subclass
    (`dpimages.testing.check_method`); by default the registered class the run's config names.
    """
    run = Run(run_dir)
    cfg = run.read_config()
    cls = method if method is not None else method_class(cfg.get("method", ""))
    values = dict(cfg.get("config", {}))
    changes = parse_overrides(sampling or [])
    for key in changes:
        if key not in cls.Config.sampling_keys:
            allowed = ", ".join(cls.Config.sampling_keys) or "none"
            raise InputError(f"{key!r} cannot be changed when sampling a fitted {cls.name} run; "
                             f"sampling keys: {allowed}")
    values.update(changes)
    synth = cls(resolve_config(cls.Config, None, values))
    ckpt = run.load_checkpoint()
    if ckpt is None or not ckpt[1].get("finished", False):
        raise InputError(f"{run.path}: no finished checkpoint to sample from (fit it first, or --resume it)")
    synth.restore_meta(ckpt[1])
    synth.load_state_dict(ckpt[0])
    synth.run_path = run.path
    return synth.to(torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")))
