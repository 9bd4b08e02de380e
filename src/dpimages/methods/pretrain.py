"""Non-private training of an EDM denoiser on images that cost no privacy: public images or DP outputs.

One loop serves every caller: PE's public diffusion API (`pe.diffusion_api.
train_public_model`, public images, unconditional) and DPDM's warm start
(`dpdm.warm`: images sampled from a DP prior, or released noisy central
images, class-conditional; or public images under the null label).

Privacy contract: the images and labels given here must be public or the
output of DP releases already recorded in the ledger (post-processing).
Nothing here reads private data, touches a ledger or draws privacy noise;
it is never to be called on private images (those go through
`dpimages.privacy.dpsgd.DPSGD`). Randomness (batches, noise levels,
diffusion noise, label dropout, augmentation) comes from the caller's seeded
generator.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dpimages.methods.training import RunClock, ema_update, warmup_decay
from dpimages.nets.edm import EDMDenoiser


def augment(x: torch.Tensor, g: torch.Generator, *, flip: bool = True, shift: int = 2) -> torch.Tensor:
    """Random horizontal flips and integer shifts of up to `shift` pixels (edge padding): (B, C, H, W) -> same.

    For a few released images (DP-FETA's central images), so a denoiser does not learn them by heart.
    """
    b, _, h, w = x.shape
    if flip:
        mirror = torch.rand(b, generator=g) < 0.5
        x = torch.where(mirror.to(x.device).view(-1, 1, 1, 1), x.flip(3), x)
    if shift > 0:
        padded = F.pad(x, (shift, shift, shift, shift), mode="replicate")
        dy, dx = (torch.randint(0, 2 * shift + 1, (b,), generator=g) for _ in range(2))
        rows = (dy.view(-1, 1) + torch.arange(h)).to(x.device)  # (b, h)
        cols = (dx.view(-1, 1) + torch.arange(w)).to(x.device)  # (b, w)
        idx = torch.arange(b, device=x.device).view(-1, 1, 1)
        x = padded.permute(0, 2, 3, 1)[idx, rows.unsqueeze(2), cols.unsqueeze(1)].permute(0, 3, 1, 2)
    return x


@dataclass
class PretrainSchedule:
    """How long and how: `epochs` over the images (capped at `max_steps` steps / `max_minutes`, 0: no cap)."""

    epochs: float
    batch_size: int
    lr: float
    ema: float
    max_steps: int = 0
    max_minutes: float = 0.0
    label_dropout: float = 0.0  # conditional training: share of draws under the null label (guidance)
    augment: bool = False
    log_every: int = 100

    def steps(self, n: int) -> int:
        per_epoch = -(-n // self.batch_size)
        total = max(1, round(self.epochs * per_epoch))
        return min(total, self.max_steps) if self.max_steps > 0 else total


def train_denoiser(
    model: EDMDenoiser,
    ema: EDMDenoiser,
    images: torch.Tensor,
    labels: torch.Tensor | None,
    schedule: PretrainSchedule,
    g: torch.Generator,
    *,
    device: torch.device | str = "cpu",
    progress: bool = False,
    desc: str = "pretraining (no privacy cost)",
    log: Callable[..., None] | None = None,
) -> dict[str, Any]:
    """Train `model` (and its EMA `ema`) with EDM's loss on `images` (N, C, H, W) in [-1, 1]; returns facts.

    `labels`: (N,) class indices for a conditional net, or None (an unconditional net, or the null label of a
    conditional one). Batches are successive random permutations of the images (the last batch of a pass may be
    short). NEVER call this on private data: no clipping, no noise, no ledger.
    """
    dev = torch.device(device)
    n = images.shape[0]
    total = schedule.steps(n)
    opt = torch.optim.Adam(model.parameters(), lr=schedule.lr)
    clock = RunClock(schedule.max_minutes)
    bar = tqdm(total=total, disable=not progress, desc=desc)
    step, running, perm, pos = 0, 0.0, torch.randperm(n, generator=g), 0
    null = getattr(model, "null_label", 0)
    while step < total and not clock.out_of_time():
        if pos >= n:
            perm, pos = torch.randperm(n, generator=g), 0
        idx = perm[pos : pos + schedule.batch_size]
        pos += schedule.batch_size
        x = images[idx].to(dev)
        if schedule.augment:
            x = augment(x, g)
        y = None
        if labels is not None:
            y = labels[idx].to(dev)
            if schedule.label_dropout > 0:
                drop = torch.rand(y.shape, generator=g) < schedule.label_dropout
                y = torch.where(drop.to(dev), torch.full_like(y, null), y)
        sigma = model.training_sigmas((x.shape[0],), g).to(dev)
        noise = torch.randn(x.shape, generator=g).to(dev)
        loss = model.loss(x, y, sigma, noise).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        bar.update(1)
        ema_update(ema, model, warmup_decay(schedule.ema, step))
        value = loss.item()
        running = 0.98 * running + 0.02 * value if step > 1 else value
        if log is not None and step % schedule.log_every == 0:
            log(step=step, loss=round(running, 5), train_s=round(clock.elapsed(), 1))
    bar.close()
    batch = min(schedule.batch_size, n)  # a batch never holds an image twice: fewer images make smaller batches
    return {"steps": step, "planned_steps": total, "batch": batch, "epochs_done": round(step * batch / n, 2),
            "final_loss_ema": round(running, 5), "train_s": round(clock.elapsed(), 1)}
