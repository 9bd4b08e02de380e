"""Synthesizer base class, method registry and the fit/sample orchestration.

A method is a `Synthesizer` subclass in ``dpimages/methods/<name>/`` with a
`Config` dataclass. It reads private data only through
``dpimages.privacy`` mechanisms (or the DP-SGD engine), which record each
release in the ledger before drawing noise. `fit_run` does what every method
needs around that: validate inputs and budget before touching data, set up
the run directory and ledger, resume, and write samples and the report.

Several processes (torchrun): when a ``torch.distributed`` process group is
initialised (``dpimages fit`` does it when ``WORLD_SIZE`` > 1), only methods
with ``distributed = True`` (dpdm) run. Rank 0 is the run directory's only
writer (config.yaml, privacy.json, metrics, checkpoints, grids, report); the
other ranks get a `Run` with ``writer=False``, a copy of rank 0's ledger
without a path (the same events, so the same budget checks and refusals on
every rank) and read the checkpoint that rank 0 wrote.
"""

from __future__ import annotations

import importlib
import json
import platform
import shutil
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

import numpy as np
import torch

from dpimages import __version__
from dpimages.allocator import keep_freed_memory
from dpimages.budget.runner import RunBudget, open_run_budget
from dpimages.config import MethodConfig, parse_overrides, resolve_config
from dpimages.data import ImageData, load
from dpimages.distributed import dist_world, rank0_first, same_on_all_ranks
from dpimages.errors import DPImagesError, InputError
from dpimages.privacy import NoiseSource, PrivacyEvent, PrivacyLedger, validate_budget
from dpimages.report import render_report
from dpimages.runs import Run
from dpimages.seeds import seeded_init, stream_generator, stream_seed

# The one place a method is registered: name -> "module:Class". Only methods that really train and sample, each
# held to the contract by `dpimages.testing.check_method` (tests/methods/test_contract.py runs it for every name).
METHOD_CLASSES: dict[str, str] = {
    "dp-mepf": "dpimages.methods.dp_mepf.method:DPMEPF",
    "dpdfd": "dpimages.methods.dpdfd.method:DPDFD",
    "dpdm": "dpimages.methods.dpdm.method:DPDM",
    "dpaf": "dpimages.methods.dpaf.method:DPAF",
    "dpaf-noagg": "dpimages.methods.dpaf.method:DPAFNoAggregation",
    "pe": "dpimages.methods.pe.method:PE",
}


def methods() -> list[str]:
    return sorted(METHOD_CLASSES)


def method_class(name: str) -> type[Synthesizer]:
    """The registered class called `name` (its module is imported on first use); InputError for another name."""
    if name not in METHOD_CLASSES:
        raise InputError(f"unknown method {name!r}; available: {', '.join(methods()) or 'none yet'}")
    module, attr = METHOD_CLASSES[name].split(":")
    cls = getattr(importlib.import_module(module), attr)
    if cls.name != name:
        raise RuntimeError(f"registry: {METHOD_CLASSES[name]} is named {cls.name!r}, not {name!r}")
    return cls


def create(name: str, preset: str | None = None, **overrides: Any) -> Synthesizer:
    cls = method_class(name)
    return cls(resolve_config(cls.Config, preset, overrides))


@dataclass
class FitContext:
    """What a method's fit gets besides the data: ledger, noise, run, device."""

    ledger: PrivacyLedger
    noise: NoiseSource
    run: Run | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    resume_state: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None
    progress: bool = True
    method: str = ""
    epsilon_target: float | None = None  # a stage of a larger plan: calibrate to this share, not the budget
    # The public data set size N that schedules, sample rates and divisors use (`fit_run`: len(private)). Only
    # `dpimages.testing` sets another: a neighbour fitted under its neighbour's public facts.
    dataset_size: int = 0

    def public_size(self, private: ImageData) -> int:
        """N for schedules and divisors: `dataset_size` when set, else the private set's size (public)."""
        return self.dataset_size or len(private)

    @property
    def target_epsilon(self) -> float:
        """The epsilon this fit calibrates its own releases to: the ledger's budget, or a stage's share of it."""
        return self.ledger.epsilon_budget if self.epsilon_target is None else float(self.epsilon_target)

    def generator(self, name: str, device: torch.device | str = "cpu") -> torch.Generator:
        """The run's seed stream `name` (public randomness: initialisation, training draws; never privacy noise)."""
        return stream_generator(self.seed, self.method, name, device)

    def seeded_init(self, name: str) -> AbstractContextManager[None]:
        """A block in which module initialisation draws from seed stream `name` (the global state is restored)."""
        return seeded_init(stream_seed(self.seed, self.method, name))

    def noise_state(self) -> dict[str, Any]:
        """The noise source's state for a checkpoint, with the ledger's step count at this save.

        `fit_run` uses the count on resume: a ledger ahead of it means releases were made after the save,
        so the saved noise state must not be replayed (see `resume_noise`).
        """
        return {**self.noise.state(), "ledger_steps": self.ledger.steps()}


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


ConfigT = TypeVar("ConfigT", bound=MethodConfig)


class Synthesizer(Generic[ConfigT]):
    """Base class: `fit` on private data under a ledger, then `sample`; generic in its config type."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    needs_public: ClassVar[bool] = False
    description: ClassVar[str] = ""
    # True: fit works in a torch.distributed process group (one model over several processes)
    distributed: ClassVar[bool] = False

    def __init__(self, config: ConfigT) -> None:
        self.config: ConfigT = config
        self.num_classes = 0
        self.image_shape: tuple[int, int, int] = (0, 0, 0)  # (H, W, C)
        self.classes: list[str] = []

    def fit(self, private: ImageData, public: ImageData | None, ctx: FitContext) -> None:
        raise NotImplementedError

    def planned_events(self, private: ImageData, public: ImageData | None, epsilon: float,
                       delta: float, *, dataset_size: int) -> list[PrivacyEvent]:
        """The ledger events a fit calibrated to (epsilon, delta) will spend, from public facts only.

        A method that implements this can be the first stage of another method's joint plan (a DP prior): the
        caller calibrates its own releases over these events plus its own, reserves them all, then fits this
        synthesizer with ``FitContext(epsilon_target=epsilon)``. Must read no pixel or label of `private`.
        """
        raise InputError(f"{self.name} cannot be a stage of another method's plan (no planned_events)")

    @classmethod
    def smoke_requirements(cls, workdir: Path) -> dict[str, Any]:
        """What a ``smoke`` fit on generated 28x28 data needs besides the data, offline: ``{"overrides": [...],
        "public": ImageData}`` (either key optional; files go under `workdir`). Nothing by default.

        Used by the contract (`dpimages.testing.check_method`) and benchmarks/smoke_samples.py, so a new
        method is covered without test code of its own.
        """
        return {}

    @classmethod
    def contract_cases(cls, workdir: Path) -> list[dict[str, Any]]:
        """Configurations besides the smoke preset whose releases `dpimages.testing.check_method` also checks
        (stages a preset leaves off): dicts with ``name``, ``overrides`` and optionally ``public`` and ``other``
        (the other private set of the same size for the other-data check). None by default."""
        return []

    def sample(self, n: int, labels: np.ndarray | None = None, seed: int | None = None) -> ImageData:
        raise NotImplementedError

    def state_dict(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def meta(self) -> dict[str, Any]:
        """Public facts needed to sample again (saved in the checkpoint's state.json)."""
        return {"num_classes": self.num_classes, "image_shape": list(self.image_shape), "classes": self.classes}

    def restore_meta(self, state: dict[str, Any]) -> None:
        self.num_classes = int(state["num_classes"])
        self.image_shape = tuple(state["image_shape"])  # type: ignore[assignment]
        self.classes = list(state["classes"])

    def report_section(self) -> str:
        """Markdown for report.md: what this method released and how it trained."""
        return ""

    def report(self) -> str:
        """The run's report (markdown) when loaded from a run directory, else this method's section."""
        run_path = getattr(self, "run_path", None)
        if run_path is None:
            return self.report_section()
        return render_report(Run(run_path), self.report_section())

    def bench_extras(self) -> dict[str, Any]:
        """Extra JSON-serialisable numbers for the benchmark results line (e.g. a DP student's test accuracy)."""
        return {}

    def to(self, device: torch.device) -> Synthesizer:
        """Move models to `device` (methods with models override this)."""
        return self

    def balanced_labels(self, n: int) -> np.ndarray:
        return np.arange(n, dtype=np.int64) % self.num_classes


@dataclass
class FitResult:
    synthesizer: Synthesizer
    ledger: PrivacyLedger
    run: Run
    config: dict[str, Any]


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
    private labels.

    For `dpimages.testing` only: `noise_source` replaces the run's noise
    source (a recording or replaying test double; the run is then marked by
    its ``kind``), and `dataset_size` the public N (default ``len(data)``), so
    that a neighbouring data set is fitted under the same public facts.

    `budget`: a data set's name in the owner's budget book (`budget_book`, default its usual place) or a
    `dpimages.budget.RunBudget`: every reservation of the run is also reserved there before anything is
    released, and refused (BudgetExceeded, nothing left behind) past its total (`dpimages.budget.runner`).
    """
    cls = method if isinstance(method, type) else method_class(method)
    method = cls.name
    keep_freed_memory()  # large tensors every step: reuse freed memory rather than page-fault it back in
    rank, world = dist_world()
    check_distributed(cls, world)
    overrides = overrides if isinstance(overrides, dict) else list(overrides)
    config = resolve_config(cls.Config, preset, overrides, config_file)
    validate_budget(epsilon, delta)
    booking = open_run_budget(budget, budget_book, run_dir, world)
    if cls.needs_public and public is None:
        raise InputError(f"method {method} needs public data: pass --public SPEC (e.g. mnist-5k)")
    private = data if isinstance(data, ImageData) else load(data, skip_bad=skip_bad, num_classes=num_classes)
    if private.labels is None:
        raise InputError(f"{private.name}: private data needs labels (class-conditional synthesis)")
    if private.notes.get("classes_from_labels"):
        raise InputError(f"{private.name}: the number of classes is not given (an npz without a 'classes' array): "
                         "add 'classes' to the file or pass --num-classes K; it is not read from the private labels")
    n_public = len(private) if dataset_size is None else int(dataset_size)
    validate_budget(epsilon, delta, n_public)
    if booking is not None:
        booking.check(n_public)
    public_data = public if (public is None or isinstance(public, ImageData)) else load(public, skip_bad=skip_bad)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if world > 1 and dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())  # torchrun: cuda:LOCAL_RANK (set by the CLI)
    run = Run(run_dir, writer=rank == 0)
    noise = noise_source or NoiseSource(int(seed) if insecure_seeded_noise else None)
    full_config = {
        "method": method,
        "preset": preset,
        "data": private.name,
        "dataset_size": n_public,
        "public": None if public_data is None else public_data.name,
        "public_id": None if public_data is None else public_data.public_id,
        "epsilon": float(epsilon),
        "delta": float(delta),
        "seed": int(seed),
        "noise_source": noise.kind,
        "config": config.to_dict(),
        "versions": _versions(),
        "device": str(dev),
        "world_size": world,
    }

    made: dict[str, PrivacyLedger] = {}

    def start() -> dict[str, Any]:  # rank 0 (the writer) only
        run.start(full_config, resume=resume)  # on resume: refuses another config or a missing privacy.json
        if resume:
            run.verify_data_check(private.keyed_digest)
            ledger = PrivacyLedger.load(run.privacy_path)
            check_checkpoint_against_ledger(run, ledger)
        else:
            run.write_data_check(private.keyed_digest)
            ledger = PrivacyLedger(epsilon, delta, path=run.privacy_path, dataset_size=n_public,
                                   noise_source=noise.kind)
            ledger.public_facts = public_facts(private, public_data, n_public)
            ledger.write()
        if booking is not None:
            booking.attach(ledger, run, private, resume)
        made["ledger"] = ledger
        return ledger.to_json(exact=False)

    ledger_json = rank0_first(start)
    # rank 0's ledger writes privacy.json; the others hold a copy without a path (the same events)
    ledger = made["ledger"] if run.writer else PrivacyLedger.from_json(ledger_json)
    resume_state = run.load_checkpoint() if resume else None
    if dist_world()[1] > 1:  # each process read these itself
        same_on_all_ranks(private.fingerprint, "the private data")
        same_on_all_ranks("" if resume_state is None else json.dumps(resume_state[1], sort_keys=True, default=str),
                           "the checkpoint read on resume")
    rekeyed = resume_state is not None and "noise_rng" in resume_state[1] and resume_noise(
        noise, resume_state[1]["noise_rng"], ledger, seed)
    if rekeyed:
        run.log(ledger.steps(), event="noise_rekeyed", reason="ledger ahead of the checkpoint")
    ctx = FitContext(ledger, noise, run, dev, seed, resume_state, progress and run.writer, method,
                     dataset_size=n_public)
    synth = cls(config)
    t0 = time.time()
    try:
        synth.fit(private, public_data, ctx)
    except DPImagesError:
        # A refusal before anything was released leaves nothing behind (the same --run-dir can be reused).
        if not resume and not ledger.events and run.writer:
            shutil.rmtree(run.path, ignore_errors=True)
        raise
    if run.writer:
        if booking is not None and (summary := booking.finish(ledger)) is not None:
            ledger.extra["budget_book"] = summary
        ledger.write(exact=True)
        run.log(-1, event="fit_done", fit_s=round(time.time() - t0, 2), epsilon=ledger.epsilon())
        run.write_report(render_report(run, synth.report_section()))
        for cb in callbacks:
            cb(synth)
    return FitResult(synth, ledger, run, full_config)


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
