"""A small class-conditional U-Net denoiser network (DDPM++-style, GroupNorm only).

The network ``F(x, c_noise, labels)`` is the raw function that EDM
preconditioning (`dpimages.nets.edm.EDMDenoiser`) wraps; it does not know
about sigma schedules or losses.

* Normalisation is GroupNorm only (no BatchNorm: it would mix the examples
  of a batch and break per-example gradients, hence DP-SGD).
* Noise level: a sinusoidal (positional) embedding of ``c_noise`` followed by
  a two-layer MLP, as in EDM's DDPM++ (Karras et al. 2022, Table 7).
* Class conditioning: a label embedding with ``num_classes + 1`` rows; row
  ``num_classes`` is the *null* label used for classifier-free guidance
  (Ho & Salimans 2022). ``labels=None`` means the null label for all.
  ``num_classes=0`` gives an unconditional network.
* Residual blocks receive the embedding as an adaptive GroupNorm scale and
  shift; self-attention runs at the resolutions in ``attn_resolutions``.
* The layout is fixed at construction: no data-dependent control flow and
  no in-place operations on inputs, so the module works under
  ``torch.func.functional_call`` + ``vmap`` (per-example gradients).

General in image size, channels and classes, so the same class serves DPDM
(private training with DP-SGD) and public diffusion models (e.g. for PE).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dpimages.errors import InputError
from dpimages.nets.classifiers import group_count


def _groups(channels: int, max_groups: int = 32) -> int:
    """GroupNorm groups: about channels/4 (at most `max_groups`), a divisor of `channels`."""
    return group_count(channels, max(1, min(max_groups, channels // 4)))


def positional_embedding(x: torch.Tensor, dim: int, max_positions: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding (B,) -> (B, dim): cos and sin of x times geometric frequencies."""
    half = dim // 2
    freqs = torch.arange(half, device=x.device, dtype=torch.float32) / max(1, half - 1)
    freqs = (1.0 / max_positions) ** freqs
    arg = x.float().unsqueeze(-1) * freqs
    return torch.cat([torch.cos(arg), torch.sin(arg)], dim=-1)


class ResBlock(nn.Module):
    """GN-SiLU-conv, adaptive GN (scale/shift from the embedding)-SiLU-conv, plus a skip; scaled by 1/sqrt(2)."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(in_ch), in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = nn.GroupNorm(_groups(out_ch), out_ch)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        nn.init.zeros_(self.conv2.weight)  # each block starts as (scaled) identity
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb).unsqueeze(-1).unsqueeze(-1).chunk(2, dim=1)
        h = self.norm2(h) * (1.0 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return (self.skip(x) + h) * (1.0 / math.sqrt(2.0))


class AttnBlock(nn.Module):
    """Multi-head self-attention over the pixels of a feature map (explicit matmuls, vmap-friendly)."""

    def __init__(self, ch: int, num_heads: int = 1) -> None:
        super().__init__()
        if ch % num_heads:
            raise InputError(f"attention channels {ch} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(_groups(ch), ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        d = c // self.num_heads
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, d, h * w).unbind(1)
        att = torch.softmax(torch.einsum("bncq,bnck->bnqk", q, k) / math.sqrt(d), dim=-1)
        out = torch.einsum("bnqk,bnck->bncq", att, v).reshape(b, c, h, w)
        return (x + self.proj(out)) * (1.0 / math.sqrt(2.0))


class Downsample(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling to a fixed size (handles odd sizes, e.g. 7 -> 14 -> 28), then a conv."""

    def __init__(self, ch: int, size: tuple[int, int]) -> None:
        super().__init__()
        self.size = size
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, size=self.size, mode="nearest"))


MAX_BOTTLENECK = 16  # pixels per side of the lowest resolution, where the middle attention always runs


def fit_levels(channel_mult: Sequence[int], image_size: int | tuple[int, int],
               max_bottleneck: int = MAX_BOTTLENECK) -> tuple[int, ...]:
    """`channel_mult` with its last multiplier repeated until the lowest resolution is at most `max_bottleneck`.

    Presets are sized for 28x28 images (a 7 or 14 pixel bottleneck). On larger images the middle attention, whose
    cost grows with the square of the bottleneck's area, would dominate (a 64x64 bottleneck at 128x128: 4,096
    positions, 16.7 M attention weights per example): each doubling of the image side adds one level instead.
    """
    hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    mult, side = list(channel_mult), min(hw)
    for _ in range(len(mult) - 1):
        side = (side + 1) // 2
    while side > max_bottleneck:
        mult.append(mult[-1])
        side = (side + 1) // 2
    return tuple(mult)


class UNet(nn.Module):
    """Class-conditional U-Net ``F(x, c_noise, labels) -> tensor shaped like x``.

    Args:
        image_size: input height and width (an int for square images).
        in_channels: image channels (1 or 3); the output has as many.
        num_classes: number of classes (0: unconditional); the embedding has
            one extra row, index ``num_classes``, the null label.
        channels: base channel count; level ``i`` has ``channels * channel_mult[i]``.
        channel_mult: one multiplier per resolution level (each level after
            the first halves the resolution, rounding up).
        num_res_blocks: residual blocks per level on the way down (one more on the way up).
        attn_resolutions: resolutions (the smaller side, in pixels) with self-attention.
        dropout: dropout inside residual blocks (0 for DP-SGD: vmap would need
            ``randomness="different"``).
        num_heads: attention heads.
    """

    def __init__(
        self,
        image_size: int | tuple[int, int] = 28,
        in_channels: int = 1,
        num_classes: int = 10,
        channels: int = 32,
        channel_mult: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (7,),
        dropout: float = 0.0,
        num_heads: int = 1,
    ) -> None:
        super().__init__()
        hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if len(hw) != 2 or min(hw) < 4:
            raise InputError(f"image_size must be >= 4 pixels per side, got {image_size}")
        if in_channels < 1 or channels < 1 or num_res_blocks < 1 or num_classes < 0:
            raise InputError(
                f"need in_channels, channels, num_res_blocks >= 1 and num_classes >= 0, got "
                f"{in_channels}, {channels}, {num_res_blocks}, {num_classes}"
            )
        if not channel_mult or any(m < 1 for m in channel_mult):
            raise InputError(f"channel_mult must be positive ints, got {tuple(channel_mult)}")
        if not 0.0 <= dropout < 1.0:
            raise InputError(f"dropout must be in [0, 1), got {dropout}")
        self.image_size = (int(hw[0]), int(hw[1]))
        self.in_channels = int(in_channels)
        self.num_classes = int(num_classes)
        self.null_label = int(num_classes)
        emb_dim = 4 * channels
        self.noise_dim = channels
        self.map_noise = nn.Sequential(nn.Linear(channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = nn.Embedding(num_classes + 1, emb_dim) if num_classes > 0 else None
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)

        # encoder: record each skip's channels and spatial size
        sizes = [self.image_size]
        for _ in range(len(channel_mult) - 1):
            h, w = sizes[-1]
            sizes.append(((h + 1) // 2, (w + 1) // 2))
        self.down = nn.ModuleList()
        skips = [channels]
        ch = channels
        for level, mult in enumerate(channel_mult):
            out_ch = channels * mult
            for _ in range(num_res_blocks):
                attn = min(sizes[level]) in attn_resolutions
                self.down.append(_Stage(ResBlock(ch, out_ch, emb_dim, dropout), AttnBlock(out_ch, num_heads)
                                        if attn else None))
                ch = out_ch
                skips.append(ch)
            if level < len(channel_mult) - 1:
                self.down.append(_Stage(None, None, Downsample(ch)))
                skips.append(ch)
        self.mid1 = ResBlock(ch, ch, emb_dim, dropout)
        self.mid_attn = AttnBlock(ch, num_heads)
        self.mid2 = ResBlock(ch, ch, emb_dim, dropout)
        self.up = nn.ModuleList()
        for level in reversed(range(len(channel_mult))):
            out_ch = channels * channel_mult[level]
            for _ in range(num_res_blocks + 1):
                attn = min(sizes[level]) in attn_resolutions
                self.up.append(_Stage(ResBlock(ch + skips.pop(), out_ch, emb_dim, dropout),
                                      AttnBlock(out_ch, num_heads) if attn else None))
                ch = out_ch
            if level > 0:
                self.up.append(_Stage(None, None, Upsample(ch, sizes[level - 1])))
        self.norm_out = nn.GroupNorm(_groups(ch), ch)
        self.conv_out = nn.Conv2d(ch, in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def embed(self, c_noise: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """(B,) noise conditioning and (B,) labels (or None: null label) -> (B, emb_dim)."""
        emb = self.map_noise(positional_embedding(c_noise.reshape(-1), self.noise_dim))
        if self.label_emb is not None:
            if labels is None:
                labels = torch.full(c_noise.reshape(-1).shape, self.null_label, dtype=torch.long,
                                    device=c_noise.device)
            emb = emb + self.label_emb(labels.reshape(-1))
        return F.silu(emb)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, H, W), c_noise (B,), labels (B,) int64 in [0, num_classes] (num_classes = null)."""
        emb = self.embed(c_noise, labels)
        h = self.conv_in(x)
        hs = [h]
        for stage in self.down:
            h = stage(h, emb)
            hs.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        for stage in self.up:
            if stage.res is not None:
                h = torch.cat([h, hs.pop()], dim=1)
            h = stage(h, emb)
        return self.conv_out(F.silu(self.norm_out(h)))


class _Stage(nn.Module):
    """One U-Net step: a residual block (optionally followed by attention) or a resampler."""

    def __init__(self, res: ResBlock | None, attn: AttnBlock | None, resample: nn.Module | None = None) -> None:
        super().__init__()
        self.res = res
        self.attn = attn
        self.resample = resample

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.resample is not None:
            return self.resample(x)
        assert self.res is not None
        x = self.res(x, emb)
        return self.attn(x) if self.attn is not None else x


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
