"""The `Synthesizer` base class, what its fit gets (`FitContext`) and what a fit returns (`FitResult`).

A method is a `Synthesizer` subclass with a `Config` dataclass, registered in `dpimages.registry`. It reads
private data only through ``dpimages.privacy`` mechanisms (or the DP-SGD engine), which record each release in
the ledger before drawing noise; `dpimages.fit_runner.fit_run` does what every method needs around that. The method
contract it is held to is `dpimages.testing.check_method`.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

import numpy as np
import torch

from dpimages.config import MethodConfig
from dpimages.data import ImageData
from dpimages.errors import InputError
from dpimages.privacy import NoiseSource, PrivacyEvent, PrivacyLedger
from dpimages.report import render_report
from dpimages.runs import Run
from dpimages.seeds import seeded_init, stream_generator, stream_seed


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


ConfigT = TypeVar("ConfigT", bound=MethodConfig)


class Synthesizer(Generic[ConfigT]):
    """Base class: `fit` on private data under a ledger, then `sample`; generic in its config type."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    needs_public: ClassVar[bool] = False
    description: ClassVar[str] = ""
    # True: fit works in a torch.distributed process group (one model over several processes)
    distributed: ClassVar[bool] = False
    # True: fits unlabelled data (a flat folder), read as one class; False: the method needs >= 2 classes and
    # refuses one class with a clear error (e.g. dpdfd, which distils a classifier)
    unconditional: ClassVar[bool] = True

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
    """A finished fit: the synthesizer, its ledger, its run directory and resolved config, and one-line notes about
    how the data was read (e.g. unlabelled images fitted as one class)."""

    synthesizer: Synthesizer
    ledger: PrivacyLedger
    run: Run
    config: dict[str, Any]
    notes: list[str] = field(default_factory=list)
