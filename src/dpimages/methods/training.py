"""The method kit: the parts every method composes around its private releases.

* `RunClock`: time and step limits of one process's share of a run; a pause
  decision that every rank of a process group takes alike.
* `ema_update`: one exponential moving average with one buffer policy.
* `write_grid`: the per-class sample grid, always from the same fixed seed.
* `TrainLoop`: the loop skeleton (progress bar, logging, grids, checkpoints,
  pause) that a method fills with its step.
* Seed streams: `FitContext.generator(name)` (in `dpimages.api`) and
  `seeded_init`, from `dpimages.seeds`.

Privacy contract: nothing here reads private data, touches the ledger or
draws privacy noise; it schedules what a method does between releases. The
loop logs no time per step (the time of a private step grows with its private
batch size): times appear only in the ``paused`` and ``train_done`` events,
for the whole run.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from dpimages.data import to_uint8
from dpimages.distributed import rank0_values
from dpimages.eval.grid import save_grid
from dpimages.runs import Run
from dpimages.seeds import GRID_SEED


# -- time and step limits ------------------------------------------------------------------------
class RunClock:
    """Limits of one process's share of a run: `max_minutes` of wall time, `units_per_run` units (steps, cycles).

    ``0`` disables a limit. `pause_reason` says why to stop after the unit just finished (None: go on); under
    torchrun every rank takes rank 0's time decision, so all ranks stop at the same unit. `elapsed_before`:
    seconds already used by earlier processes of the run, for a time budget that covers the whole run.
    `steps_per_unit`: when the caller counts steps but the limit counts larger units (dpaf's cycles).
    """

    def __init__(self, max_minutes: float = 0.0, units_per_run: int = 0, *, unit_name: str = "steps_per_run",
                 distributed: bool = False, elapsed_before: float = 0.0, steps_per_unit: int = 1) -> None:
        self.max_minutes = float(max_minutes)
        self.units_per_run = int(units_per_run)
        self.steps_per_unit = int(steps_per_unit)
        self.unit_name = unit_name
        self.distributed = distributed
        self.start = time.time() - float(elapsed_before)

    def elapsed(self) -> float:
        """Seconds since this process started its share of the run."""
        return time.time() - self.start

    def out_of_time(self) -> bool:
        late = self.max_minutes > 0 and self.elapsed() > 60.0 * self.max_minutes
        if self.distributed and self.max_minutes > 0:
            late = bool(rank0_values(float(late))[0])
        return late

    def pause_reason(self, units_done: int) -> str | None:
        """``max_minutes=M`` or ``UNIT_NAME=K`` when this process should stop now, else None (`units_done` counts
        steps of `steps_per_unit`)."""
        if self.out_of_time():
            return f"max_minutes={self.max_minutes:g}"
        if self.units_per_run > 0 and units_done // self.steps_per_unit >= self.units_per_run:
            return f"{self.unit_name}={self.units_per_run}"
        return None

    def run_times(self, units_done: int, train_s: float) -> dict[str, float]:
        """Whole-run times for the ``paused`` / ``train_done`` events (never per step)."""
        return {"train_s": round(float(train_s), 1), "steps_per_s": round(units_done / max(1e-9, self.elapsed()), 4)}


class TimeEstimate:
    """Once a long loop has run a few steps, one line on stderr: the time its remaining steps will take.

    Measured from this process's first steps (after `after_s` seconds and at least `min_steps` steps), printed once
    and only when the rest would take more than `long_s`; a whole-loop rate, so nothing about a private batch.
    """

    def __init__(self, total: int, done: int, desc: str, *, enabled: bool = True, after_s: float = 20.0,
                 min_steps: int = 3, long_s: float = 120.0) -> None:
        self.total, self.first, self.desc = int(total), int(done), desc
        self.enabled, self.after_s, self.min_steps, self.long_s = enabled, after_s, min_steps, long_s
        self.start = time.time()
        self.message: str | None = None

    def update(self, done: int) -> None:
        """Call after each step (`done`: steps finished so far, this process's and earlier ones')."""
        if self.message is not None or not self.enabled:
            return
        ran, elapsed = done - self.first, time.time() - self.start
        if ran < self.min_steps or elapsed < self.after_s or done >= self.total:
            return
        rest = elapsed / ran * (self.total - done)
        self.message = (f"{self.desc}: about {rest / 60:.0f} min for the {self.total - done} steps left "
                        f"(measured over the first {ran})") if rest > self.long_s else ""
        if self.message:
            tqdm.write(self.message, file=sys.stderr)


# -- EMA -----------------------------------------------------------------------------------------
@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """``ema <- decay * ema + (1 - decay) * model`` for parameters and floating-point buffers; other buffers copied."""
    for e, p in zip(ema.parameters(), model.parameters(), strict=True):
        e.lerp_(p, 1.0 - decay)
    for eb, b in zip(ema.buffers(), model.buffers(), strict=True):
        if eb.dtype.is_floating_point:
            eb.lerp_(b, 1.0 - decay)
        else:
            eb.copy_(b)


def warmup_decay(decay: float, step: int) -> float:
    """The EMA decay at update `step` with warm-up: ``min(decay, (1 + step) / (10 + step))``."""
    return min(decay, (1.0 + step) / (10.0 + step))


# -- grids ---------------------------------------------------------------------------------------
def write_grid(path: str | Path, generate: Callable[[torch.Tensor, torch.Generator], Any], num_classes: int,
               per_class: int = 10) -> Path:
    """A per-class sample grid PNG: ``generate(labels, generator)`` for `per_class` images of every class.

    `generate` returns images as uint8 (N, H, W, C) or as a float tensor (N, C, H, W) in [-1, 1]; the generator
    is always seeded with `GRID_SEED`, so grids of one run are comparable over training.
    """
    y = torch.arange(num_classes * per_class) // per_class
    with torch.no_grad():
        images = generate(y, torch.Generator().manual_seed(GRID_SEED))
    if isinstance(images, torch.Tensor):
        images = to_uint8(images) if images.dtype.is_floating_point else images.cpu().numpy()
    return save_grid(path, np.asarray(images), y.numpy(), num_classes, per_class)


# -- the loop skeleton ---------------------------------------------------------------------------
@dataclass
class TrainLoop:
    """Steps ``done+1 .. total`` of a training run, with logging, grids, checkpoints and pausing.

    The method gives `step` (does step t, returns the values to log: public or noisy only), `checkpoint`
    (``checkpoint(t, finished)``) and optionally `grid` (``grid(path)``; `final_grid` for the last one, `grid`
    by default). `run` is None in tests (nothing written); a non-writer rank runs the steps and the clock but
    writes nothing. `train_s0` is the training time of earlier processes of the run (resume).

    `on_time`: what the clock's limit does: ``"pause"`` (checkpoint, a ``paused`` event, `--resume` goes on) or
    ``"finish"`` (training ends there, as if it were the last step, with a ``time_budget_reached`` event: a
    post-processing time budget). Values are logged every `log_every` steps, at the last one, and whenever
    `log_when(values)` says so; `done_values()` adds fields to the ``train_done`` event.
    """

    run: Run | None
    total: int
    step: Callable[[int], dict[str, Any]]
    checkpoint: Callable[[int, bool], None]
    clock: RunClock = field(default_factory=RunClock)
    grid: Callable[[Path], None] | None = None
    log_every: int = 10
    grid_every: int = 500
    checkpoint_every: int = 200
    progress: bool = True
    desc: str = "training steps"
    train_s0: float = 0.0
    after_step: Callable[[int], None] | None = None
    on_time: str = "pause"
    log_when: Callable[[dict[str, Any]], bool] | None = None
    done_values: Callable[[], dict[str, Any]] | None = None
    final_grid: Callable[[Path], None] | None = None

    def train_s(self) -> float:
        return self.train_s0 + self.clock.elapsed()

    def __call__(self, done: int) -> bool:
        """Run from step `done` (steps already made) to `total`; True when finished, False when paused."""
        writer = self.run is not None and self.run.writer
        bar = tqdm(total=self.total, initial=done, disable=not self.progress, desc=self.desc)
        estimate = TimeEstimate(self.total, done, self.desc, enabled=self.progress)
        t, first, timed_out = done, done, False
        try:
            while t < self.total:
                t += 1
                values = self.step(t)
                bar.update(1)
                estimate.update(t)
                if self.after_step is not None:
                    self.after_step(t)
                reason = self.clock.pause_reason(t - first)
                timed_out = self.on_time == "finish" and reason is not None
                if self.run is None:
                    if timed_out:
                        break
                    continue
                last = t == self.total or timed_out
                if t % self.log_every == 0 or last or (self.log_when is not None and self.log_when(values)):
                    self.run.log(t, **values)
                if last:
                    break
                if writer and self.grid is not None and t % self.grid_every == 0:
                    self.grid(self.run.grid_path(f"grid-{t:07d}.png"))
                if writer and (t % self.checkpoint_every == 0 or reason):
                    self.checkpoint(t, False)
                if reason:
                    self.run.log(t, event="paused", reason=reason, steps_left=self.total - t,
                                 **self.clock.run_times(t - first, self.train_s()))
                    return False
        finally:
            bar.close()
        if writer:
            assert self.run is not None
            if timed_out:
                self.run.log(t, event="time_budget_reached", max_minutes=self.clock.max_minutes,
                             planned_steps=self.total)
            self.checkpoint(t, True)
            grid = self.final_grid or self.grid
            if grid is not None:
                grid(self.run.grid_path("grid-final.png"))
            self.run.log(t, event="train_done", steps=t, **(self.done_values() if self.done_values else {}),
                         **self.clock.run_times(t - first, self.train_s()))
        return True
