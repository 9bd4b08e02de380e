"""A DP prior: a cheap DP synthesizer fitted as the first stage of another method's plan.

DPDM's ``warm_start=dp-mepf`` pretrains its U-Net on the prior's samples;
PE's ``api=dp-prior`` trains its diffusion API on them. Both plan the stage
here, calibrate their own releases over its events jointly, reserve all of
it, then fit the prior and sample it.

Privacy contract: `plan_prior` reads no pixel or label (the prior's
``planned_events`` uses N, the image shape and the class list, public facts
in dpimages). `fit_prior` fits the prior under the caller's ledger and noise
with the prior's share as its target, so its releases are the planned
events. Its samples are post-processing of those releases. A stage whose
events are in the ledger without saved results cannot be redone without
spending them again: `refuse_spent_stage` says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dpimages.data import ImageData
from dpimages.errors import InputError
from dpimages.privacy import PrivacyEvent, PrivacyLedger
from dpimages.registry import create
from dpimages.synthesizer import FitContext, Synthesizer

PRIOR_METHOD = "dp-mepf"


@dataclass
class Prior:
    """The planned prior: its synthesizer (unfitted until `fit_prior`), its epsilon share and planned events."""

    synthesizer: Synthesizer
    epsilon: float
    events: list[PrivacyEvent] = field(default_factory=list)

    def describe(self) -> dict:
        return {"method": self.synthesizer.name, "epsilon_share": self.epsilon,
                "events": [e.label for e in self.events]}


def plan_prior(preset: str, private: ImageData, public: ImageData | None, epsilon: float, delta: float,
               dataset_size: int) -> Prior:
    """A `PRIOR_METHOD` synthesizer at `preset` and the events its fit at (epsilon, delta) will spend (public N)."""
    # the prior is a stage of another plan: random features and no labeller stage of its own (the settings dpdm's
    # and pe's rows were measured with; the caller may run a labeller)
    prior = create(PRIOR_METHOD, preset, image_shape=private.image_shape, features="random", labeller="none")
    return Prior(prior, epsilon, prior.planned_events(private, public, epsilon, delta, dataset_size=dataset_size))


def refuse_spent_stage(ledger: PrivacyLedger, events: list[PrivacyEvent], what: str) -> None:
    """InputError when the ledger already holds one of the stage's `events` (a run stopped inside the stage)."""
    if any(ledger.steps(like=e) for e in events):
        raise InputError(f"--resume: the run stopped during its {what} stage (its releases are spent, their "
                         "results were not saved); start a new run")


def fit_prior(prior: Prior, private: ImageData, public: ImageData | None, ctx: FitContext) -> None:
    """Fit the prior under `ctx`'s ledger and noise, calibrated to its share; writes nothing to the run."""
    stage = FitContext(ledger=ctx.ledger, noise=ctx.noise, run=None, device=ctx.device, seed=ctx.seed,
                       progress=ctx.progress, method=prior.synthesizer.name, epsilon_target=prior.epsilon,
                       dataset_size=ctx.dataset_size)
    prior.synthesizer.fit(private, public, stage)
