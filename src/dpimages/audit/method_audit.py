"""White-box audit of a method's own release code: how far one added image moves each of its releases.

The canary audit (`dpimages.audit.one_run`) tests the library's mechanisms; a method can still break its
guarantee in its own code around them (per-example randomness keyed by position, a value that is not clipped,
a sensitivity declared too small). This audit runs any registered method's `fit` at its smoke preset on the
contract's generated data (`dpimages.testing`) and on its neighbours with a worst-case image added first, in the
middle and last, with the samples, secret keys and released values replayed, so both fits make the same
releases on the same path. For every release it measures the move ``||v' - v||`` against the declared
sensitivity. The ratio must be at most 1; the *implied epsilon* is the ledger's epsilon recomputed with each
release's noise multiplier divided by the worst ratio seen for that release (so a release that moves by twice its
declared sensitivity counts as having half its noise). A violation is an implied epsilon above the claimed one.

This is a measurement on one data set and three neighbours, not a proof: a ratio at most 1 here does not show
that no other neighbour moves a release further (the contract's worst-case image is chosen to make clipping act).
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from dpimages.errors import InputError
from dpimages.fit_runner import fit_run
from dpimages.privacy.ledger import epsilon_pld
from dpimages.registry import method_class
from dpimages.synthesizer import Synthesizer
from dpimages.testing import RecordingNoise, ReplayingNoise, neighbour, private_set, torch_threads

TOLERANCE = 1e-4  # relative: float32 sums in another order round differently


@dataclass(frozen=True)
class MethodAuditResult:
    """One method's white-box neighbour audit."""

    method: str
    claimed_epsilon: float
    implied_epsilon: float
    worst_ratio: float  # max over releases and neighbours of move / declared sensitivity
    worst_release: str
    worst_position: int
    releases: int
    positions: tuple[int, ...]
    delta: float

    @property
    def violation(self) -> bool:
        return self.worst_ratio > 1 + TOLERANCE

    def to_json(self) -> dict:
        return {**asdict(self), "positions": list(self.positions), "violation": self.violation}


def audit_method(method: str | type[Synthesizer], *, epsilon: float = 1.0, delta: float = 1e-3,
                 workdir: str | Path | None = None) -> MethodAuditResult:
    """Audit `method`'s own releases on neighbours (module docstring); `epsilon`, `delta` the claimed budget."""
    cls = method_class(method) if isinstance(method, str) else method
    base = private_set()
    with tempfile.TemporaryDirectory(prefix="dpimages-audit-") as tmp, torch_threads(1):
        root = Path(workdir or tmp)
        req = cls.smoke_requirements(root / "requirements")
        kw = {"epsilon": epsilon, "delta": delta, "preset": "smoke", "public": req.get("public"),
              "overrides": list(req.get("overrides", [])), "seed": 0, "progress": False}
        recording = RecordingNoise(0)
        first = fit_run(cls, base, run_dir=root / "first", noise_source=recording, **kw)
        positions = (0, len(base) // 2, len(base))
        worst: dict[int, float] = {}  # release index -> worst ratio
        where = (0.0, "", 0)
        for position in positions:
            replay = ReplayingNoise(recording, added_at=position, what=f"audit {cls.name} (added at {position})")
            fit_run(cls, neighbour(base, position), run_dir=root / f"neighbour-{position}", noise_source=replay,
                    dataset_size=len(base), **kw)
            replay.check_all_replayed()
            for i, (rec, moved) in enumerate(zip(recording.releases, replay.values, strict=True)):
                ratio = float((moved.double().cpu() - rec.value.double().cpu()).norm()) / rec.sensitivity
                worst[i] = max(worst.get(i, 0.0), ratio)
                if ratio > where[0]:
                    where = (ratio, rec.event.label, position)
    try:
        implied = epsilon_pld([replace(rec.event, noise_multiplier=rec.event.noise_multiplier / max(1.0, worst[i]))
                               for i, rec in enumerate(recording.releases)], delta)
    except InputError:  # an effective noise multiplier below what any budget is served with
        implied = float("inf")
    return MethodAuditResult(cls.name, first.ledger.epsilon(), implied, where[0], where[1], where[2],
                             len(recording.releases), positions, delta)
