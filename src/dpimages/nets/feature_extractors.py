"""Feature networks for mean-embedding methods (DP-MEPF).

A *trunk* maps images (N, C, H, W) in [-1, 1] to named feature maps; a
`FeatureExtractor` turns the maps of one or more trunks into per-image
embedding vectors (first moment, optionally second moment), each scaled to
unit L2 norm, as DP-MEPF requires.

Trunks:

* `ConvTrunk`: a small conv net (conv -> activation -> 2x2 average pool per
  block). Random weights (a seeded initialisation, no data at all) or
  weights pre-trained on a *public* set with `train_conv_trunk`.
* `VGGTrunk`: the ``features`` part of a torchvision-style VGG (11/13/16/19,
  without batch norm), built here from the layout of a state dict, so
  torchvision is not needed. Weights come from a user's file by path
  (``.safetensors``, or ``.pt``/``.pth`` read with ``torch.load(weights_only=True)``,
  which refuses arbitrary pickled objects). Nothing is downloaded.

Privacy contract: these networks never see private data during training.
Feature vectors are scaled to unit norm per image, so one private image
moves a per-class *sum* of them by at most 1 (L2): that is the sensitivity
the DP-MEPF release relies on, and `clip_rows` in the mechanism enforces it
again.

Saved format (`save_feature_net` / `load_trunk`): a directory with
``weights.safetensors`` and ``features.json`` (architecture and provenance).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from dpimages.errors import InputError, require_empty_folder
from dpimages.seeds import seeded_init

if TYPE_CHECKING:
    from dpimages.data import ImageData

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WEIGHTS_FILE = "weights.safetensors"
META_FILE = "features.json"


# -- trunks --------------------------------------------------------------------------------
class ConvTrunk(nn.Module):
    """conv(k) -> activation -> avg-pool(2) blocks; taps ``b1``, ``b2``, ... (post-activation).

    With ``tap="pre"`` the tapped maps are the conv outputs before the
    activation (as the DP-MEPF paper does for VGG). The last block is not
    pooled. Input images are in [-1, 1].
    """

    arch = "conv"

    def __init__(
        self,
        in_channels: int = 1,
        channels: Sequence[int] = (32, 64, 128),
        kernel: int = 3,
        act: str = "relu",
        tap: str = "post",
    ) -> None:
        super().__init__()
        if not channels:
            raise InputError("feature_channels must name at least one layer, got ()")
        if act not in ("relu", "tanh", "lrelu"):
            raise InputError(f"feature activation must be relu, tanh or lrelu, got {act!r}")
        if tap not in ("post", "pre"):
            raise InputError(f"feature_tap must be 'post' or 'pre', got {tap!r}")
        self.in_channels, self.channels, self.kernel, self.act_name, self.tap = (
            int(in_channels), [int(c) for c in channels], int(kernel), act, tap
        )
        convs, prev = [], self.in_channels
        for c in self.channels:
            convs.append(nn.Conv2d(prev, c, self.kernel, padding=self.kernel // 2))
            prev = c
        self.convs = nn.ModuleList(convs)

    def config(self) -> dict[str, Any]:
        return {"arch": "conv", "in_channels": self.in_channels, "channels": self.channels, "kernel": self.kernel,
                "act": self.act_name}

    def layer_names(self) -> list[str]:
        return [f"b{i + 1}" for i in range(len(self.convs))]

    def _act(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_name == "relu":
            return F.relu(x)
        if self.act_name == "lrelu":
            return F.leaky_relu(x, 0.2)
        return torch.tanh(x)

    def forward(self, x: torch.Tensor, layers: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        want = set(layers or self.layer_names())
        last = max(self.layer_names().index(n) for n in want)
        out: dict[str, torch.Tensor] = {}
        for i, conv in enumerate(self.convs):
            pre = conv(x)
            x = self._act(pre)
            name = f"b{i + 1}"
            if name in want:
                out[name] = pre if self.tap == "pre" else x
            if i == last:
                break
            if i < len(self.convs) - 1:
                x = F.avg_pool2d(x, 2, ceil_mode=True)
        return out


class ConvClassifier(nn.Module):
    """A `ConvTrunk` with a global-mean-pool linear head, for public pre-training."""

    def __init__(self, trunk: ConvTrunk, num_classes: int) -> None:
        super().__init__()
        self.trunk = trunk
        self.head = nn.Linear(trunk.channels[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = self.trunk.layer_names()[-1]
        return self.head(self.trunk(x, [last])[last].mean(dim=(2, 3)))


def _vgg_layout(state: dict[str, torch.Tensor]) -> list[tuple[int, int, int, bool]]:
    """[(index, in, out, pool_after)] of the convs of a torchvision VGG ``features`` state dict."""
    idx = sorted(int(k.split(".")[1]) for k in state if k.startswith("features.") and k.endswith(".weight"))
    if not idx:
        raise InputError("not a VGG state dict: no 'features.N.weight' keys")
    for i in idx:
        w = state[f"features.{i}.weight"]
        if w.ndim != 4:
            raise InputError(
                f"features.{i}.weight has shape {tuple(w.shape)}: only VGG without batch norm is supported"
            )
        if f"features.{i}.bias" not in state:
            raise InputError(f"VGG state dict lacks features.{i}.bias")
    layout = []
    for j, i in enumerate(idx):
        w = state[f"features.{i}.weight"]
        nxt = idx[j + 1] if j + 1 < len(idx) else None
        gap = None if nxt is None else nxt - i
        if gap not in (None, 2, 3):
            raise InputError(f"unexpected VGG layer layout between features.{i} and features.{nxt}")
        layout.append((i, int(w.shape[1]), int(w.shape[0]), gap == 3))
    for (a, _, out_a, _), (b, in_b, _, _) in zip(layout[:-1], layout[1:], strict=True):
        if out_a != in_b:
            raise InputError(f"VGG state dict: features.{a} gives {out_a} channels but features.{b} takes {in_b}")
    return layout


class VGGTrunk(nn.Module):
    """torchvision-style VGG ``features`` (conv 3x3, ReLU, max-pool), built from a state dict's layout.

    Taps are named ``conv{block}_{j}``; like the DP-MEPF paper they are the
    conv outputs *before* the ReLU (``tap="post"`` gives them after it).
    Inputs in [-1, 1] are mapped to [0, 1], grey images repeated to three
    channels, normalised with the ImageNet mean and std, and (with
    ``resize``) resized to ``resize`` x ``resize``.
    """

    arch = "vgg"

    def __init__(self, layout: Sequence[tuple[int, int, int, bool]], tap: str = "pre", resize: int = 0) -> None:
        super().__init__()
        if tap not in ("post", "pre"):
            raise InputError(f"feature_tap must be 'post' or 'pre', got {tap!r}")
        self.layout = [tuple(x) for x in layout]
        self.tap, self.resize = tap, int(resize)
        self.features = nn.ModuleDict({str(i): nn.Conv2d(cin, cout, 3, padding=1) for i, cin, cout, _ in self.layout})
        names, block, j = [], 1, 0
        for _, _, _, pool in self.layout:
            j += 1
            names.append(f"conv{block}_{j}")
            if pool:
                block, j = block + 1, 0
        self._names = names
        self.in_channels = self.layout[0][1]
        mean, std = IMAGENET_MEAN[: self.in_channels], IMAGENET_STD[: self.in_channels]
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], tap: str = "pre", resize: int = 0) -> VGGTrunk:
        trunk = cls(_vgg_layout(state), tap=tap, resize=resize)
        trunk.load_vgg_state_dict(state)
        return trunk

    def load_vgg_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for i, _, _, _ in self.layout:
            conv = self.features[str(i)]
            for p in ("weight", "bias"):
                src = state[f"features.{i}.{p}"]
                if tuple(src.shape) != tuple(getattr(conv, p).shape):
                    raise InputError(f"features.{i}.{p} has shape {tuple(src.shape)}, expected "
                                     f"{tuple(getattr(conv, p).shape)}")
                getattr(conv, p).data.copy_(src.float())

    def vgg_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights under torchvision's key names (``features.N.weight``)."""
        out = {}
        for i, _, _, _ in self.layout:
            out[f"features.{i}.weight"] = self.features[str(i)].weight.detach().clone()
            out[f"features.{i}.bias"] = self.features[str(i)].bias.detach().clone()
        return out

    def config(self) -> dict[str, Any]:
        return {"arch": "vgg", "layout": [list(x) for x in self.layout], "resize": self.resize}

    def layer_names(self) -> list[str]:
        return list(self._names)

    def forward(self, x: torch.Tensor, layers: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        want = set(layers or self._names)
        last = max(self._names.index(n) for n in want)
        x = (x + 1.0) / 2.0
        if x.shape[1] == 1 and self.in_channels == 3:
            x = x.repeat(1, 3, 1, 1)
        x = (x - self.mean) / self.std
        if self.resize:
            x = F.interpolate(x, size=(self.resize, self.resize), mode="bilinear", align_corners=False)
        out: dict[str, torch.Tensor] = {}
        for j, (i, _, _, pool) in enumerate(self.layout):
            pre = self.features[str(i)](x)
            x = F.relu(pre)
            if self._names[j] in want:
                out[self._names[j]] = pre if self.tap == "pre" else x
            if j == last:
                break
            if pool:
                x = F.max_pool2d(x, 2, ceil_mode=True)
        return out


class ScatterTrunk(nn.Module):
    """Scattering coefficients as a trunk (no parameters, no data): taps ``s0``, ``s1``, ``s2``, the orders.

    Order 0 is the low-pass image, orders 1 and 2 the low-passed moduli of one and two wavelet
    filterings (`dpimages.nets.scattering.Scattering`). Every coefficient is non-negative.
    """

    arch = "scatter"

    def __init__(self, in_channels: int, image_size: tuple[int, int], scales: int = 2, orientations: int = 8,
                 tap: str = "post") -> None:
        from dpimages.nets.scattering import Scattering, scatter_orders

        super().__init__()
        self.in_channels, self.tap = int(in_channels), tap
        self.scattering = Scattering(image_size, in_channels, scales, orientations)
        self._orders = scatter_orders(scales, orientations)

    def config(self) -> dict[str, Any]:
        s = self.scattering
        return {"arch": "scatter", "in_channels": self.in_channels, "image_size": list(s.image_size),
                "scales": s.scales, "orientations": s.orientations}

    def layer_names(self) -> list[str]:
        return ["s0", "s1", "s2"]

    def forward(self, x: torch.Tensor, layers: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        coeffs = self.scattering(x)  # (N, C * K, h, w), channel-major
        n, _, h, w = coeffs.shape
        coeffs = coeffs.view(n, self.in_channels, sum(self._orders), h, w)
        parts = torch.split(coeffs, self._orders, dim=2)
        want = set(layers or self.layer_names())
        return {name: part.reshape(n, -1, h, w) for name, part in zip(self.layer_names(), parts, strict=True)
                if name in want}


Trunk = ConvTrunk | VGGTrunk | ScatterTrunk


# -- the embedding -------------------------------------------------------------------------
def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)


class FeatureExtractor(nn.Module):
    """Per-image embedding vectors of unit L2 norm from the tapped maps of one or more trunks.

    For each tapped map (N, C, h, w): the first moment is its average over
    ``pool`` x ``pool`` spatial cells (``pool=1``: per-channel spatial
    mean; ``pool=0``: the full map), the optional second moment the same
    average of the squared map. With ``balance`` each layer's block is first
    scaled to unit norm and divided by sqrt(number of blocks), so no layer
    dominates; the concatenation is then scaled to unit norm. First and
    second moments are normalised separately. The extractor is frozen
    (``requires_grad=False``); gradients flow to its input only.
    """

    def __init__(
        self,
        trunks: Sequence[Trunk],
        layers: Sequence[str] = (),
        pool: Sequence[int] = (4,),
        second_moment: bool = False,
        balance: bool = True,
    ) -> None:
        super().__init__()
        self.trunks = nn.ModuleList(trunks)
        # `layers` name the learnt (conv or VGG) trunks' taps; a scattering trunk always gives all its orders
        learnt = [t for t in trunks if not isinstance(t, ScatterTrunk)]
        self.layers = list(layers) or (learnt[0].layer_names() if learnt else [])
        for t in learnt:
            bad = [n for n in self.layers if n not in t.layer_names()]
            if bad:
                raise InputError(f"feature_layers {bad} not in the network's layers {t.layer_names()}")
        pools = list(pool)
        if len(pools) == 1:
            pools = pools * max(len(self.layers), 1)
        if (learnt and len(pools) != len(self.layers)) or any(p < 0 for p in pools):
            raise InputError(f"feature_pool must be one int >= 0 or one per layer ({len(self.layers)}), got {pool}")
        self.pools = pools
        self.second_moment = bool(second_moment)
        self.balance = bool(balance)
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FeatureExtractor:  # always frozen
        return super().train(False)

    def _blocks(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        first, second = [], []
        for t in self.trunks:
            scatter = isinstance(t, ScatterTrunk)
            names = t.layer_names() if scatter else self.layers
            pools = [0] * len(names) if scatter else self.pools  # scattering maps are already pooled (2^J)
            maps = t(x, names)
            for name, p in zip(names, pools, strict=True):
                m = maps[name]
                if p == 0:
                    first.append(m.flatten(1))
                    if self.second_moment:
                        second.append((m * m).flatten(1))
                else:
                    first.append(F.adaptive_avg_pool2d(m, p).flatten(1))
                    if self.second_moment:
                        second.append(F.adaptive_avg_pool2d(m * m, p).flatten(1))
        return first, second

    def _combine(self, blocks: list[torch.Tensor]) -> torch.Tensor:
        if self.balance:
            scale = 1.0 / math.sqrt(len(blocks))
            blocks = [_unit(b) * scale for b in blocks]
        return _unit(torch.cat(blocks, dim=1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(N, D1) unit-norm first moments and (N, D2) unit-norm second moments or None."""
        first, second = self._blocks(x)
        return self._combine(first), (self._combine(second) if self.second_moment else None)

    @torch.no_grad()
    def dims(self, image_shape_chw: tuple[int, int, int]) -> tuple[int, int]:
        f, s = self.forward(torch.zeros(1, *image_shape_chw))
        return f.shape[1], (0 if s is None else s.shape[1])


# -- construction, saving, loading ---------------------------------------------------------
def random_conv_trunk(
    seed: int, in_channels: int, channels: Sequence[int], kernel: int = 3, act: str = "relu", tap: str = "post"
) -> ConvTrunk:
    """A `ConvTrunk` with seeded random weights (Kaiming-normal convs, small random biases): no data used."""
    g = torch.Generator().manual_seed(int(seed))
    trunk = ConvTrunk(in_channels, channels, kernel, act, tap)
    with torch.no_grad():
        for conv in trunk.convs:
            fan_in = conv.weight.shape[1] * conv.weight.shape[2] * conv.weight.shape[3]
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * math.sqrt(2.0 / fan_in))
            conv.bias.copy_(torch.randn(conv.bias.shape, generator=g) * 0.1)
    return trunk


def train_conv_trunk(
    public_images: torch.Tensor,
    public_labels: torch.Tensor,
    num_classes: int,
    **options: Any,
) -> tuple[ConvTrunk, dict[str, Any]]:
    """Train a `ConvClassifier` on *public* images (N, C, H, W) in [-1, 1]; return its trunk and facts.

    Never call this on private data: the result is used as a public
    feature extractor with no privacy accounting. `options` are those of `train_conv_classifier`.
    """
    classifier, facts = train_conv_classifier(public_images, public_labels, num_classes, **options)
    return classifier.trunk, facts


def train_conv_classifier(
    public_images: torch.Tensor,
    public_labels: torch.Tensor,
    num_classes: int,
    *,
    channels: Sequence[int] = (32, 64, 128),
    kernel: int = 3,
    act: str = "relu",
    epochs: int = 5,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    val_fraction: float = 0.1,
    log: Any = None,
) -> tuple[ConvClassifier, dict[str, Any]]:
    """Train a `ConvClassifier` (trunk and head) on *public* images (N, C, H, W) in [-1, 1]; return it and facts.

    Never call this on private data: the classifier is public (no privacy accounting); a private image may only
    meet it inside a `dpimages.privacy` mechanism.
    """
    if public_images.ndim != 4 or public_labels.shape != (public_images.shape[0],):
        raise InputError(f"public images must be (N, C, H, W) with labels (N,), got {tuple(public_images.shape)} "
                         f"and {tuple(public_labels.shape)}")
    with seeded_init(seed):  # module initialisation from the seed; the caller's global RNG state is restored
        return _train_conv_classifier(public_images, public_labels, num_classes, channels, kernel, act, epochs,
                                      batch_size, lr, seed, val_fraction, log)


def _train_conv_classifier(public_images: torch.Tensor, public_labels: torch.Tensor, num_classes: int,
                           channels: Sequence[int], kernel: int, act: str, epochs: int, batch_size: int, lr: float,
                           seed: int, val_fraction: float, log: Any) -> tuple[ConvClassifier, dict[str, Any]]:
    g = torch.Generator().manual_seed(int(seed))
    n = public_images.shape[0]
    order = torch.randperm(n, generator=g)
    n_val = int(round(n * val_fraction)) if n >= 20 else 0
    val_idx, tr_idx = order[:n_val], order[n_val:]
    trunk = random_conv_trunk(seed, public_images.shape[1], channels, kernel, act)
    model = ConvClassifier(trunk, num_classes)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for epoch in range(int(epochs)):
        model.train()
        perm = tr_idx[torch.randperm(len(tr_idx), generator=g)]
        total, seen = 0.0, 0
        for i in range(0, len(perm), batch_size):
            b = perm[i : i + batch_size]
            x = public_images[b]
            # light augmentation: random shifts by up to 2 pixels
            dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=g))
            x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
            loss = F.cross_entropy(model(x), public_labels[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, seen = total + loss.item() * len(b), seen + len(b)
        if log is not None:
            log(epoch=epoch + 1, train_loss=total / max(seen, 1))
    facts: dict[str, Any] = {"epochs": int(epochs), "train_size": int(len(tr_idx))}
    if n_val:
        model.eval()
        with torch.no_grad():
            pred = torch.cat([model(public_images[val_idx[i : i + 500]]).argmax(1)
                              for i in range(0, n_val, 500)])
        facts["public_val_accuracy"] = float((pred == public_labels[val_idx]).float().mean())
        facts["public_val_size"] = int(n_val)
    model.eval()
    return model, facts


def save_feature_net(out_dir: str | Path, trunk: Trunk, meta: dict[str, Any] | None = None) -> Path:
    """Write ``weights.safetensors`` + ``features.json`` into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = trunk.vgg_state_dict() if isinstance(trunk, VGGTrunk) else dict(trunk.state_dict())
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(out / WEIGHTS_FILE))
    (out / META_FILE).write_text(json.dumps({**trunk.config(), **(meta or {})}, indent=1) + "\n")
    return out


def trunk_from_config(cfg: dict[str, Any], tap: str) -> Trunk:
    """An untrained trunk with the architecture described by `cfg` (a features.json)."""
    if cfg.get("arch") == "conv":
        return ConvTrunk(cfg["in_channels"], cfg["channels"], cfg.get("kernel", 3), cfg.get("act", "relu"), tap)
    if cfg.get("arch") == "vgg":
        return VGGTrunk([tuple(x) for x in cfg["layout"]], tap=tap, resize=cfg.get("resize", 0))
    if cfg.get("arch") == "scatter":
        return ScatterTrunk(cfg["in_channels"], tuple(cfg["image_size"]), cfg["scales"], cfg["orientations"])
    raise InputError(f"unknown feature architecture {cfg.get('arch')!r} (expected conv, vgg or scatter)")


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises several types on a bad header
            raise InputError(f"{path}: not a readable safetensors file ({type(e).__name__})") from None
    if path.suffix in (".pt", ".pth", ".bin"):
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # weights_only refuses anything but tensors and containers
            raise InputError(f"{path}: not a loadable weights-only torch file ({type(e).__name__})") from None
        if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise InputError(f"{path}: expected a state dict of tensors")
        return obj
    raise InputError(f"{path}: weights must be .safetensors, .pt or .pth, got {path.suffix or 'no suffix'}")


def load_trunk(path: str | Path, tap: str = "post", resize: int = 0) -> tuple[Trunk, dict[str, Any]]:
    """Load a feature trunk from a directory written by `save_feature_net` or a weights file.

    A bare weights file with ``features.N.weight`` keys is read as a
    torchvision-style VGG (``resize`` sets its input size; 0 keeps the
    image size). Returns the trunk and its metadata.
    """
    p = Path(path)
    if p.is_dir():
        meta_path, weights = p / META_FILE, p / WEIGHTS_FILE
        if not meta_path.exists() or not weights.exists():
            raise InputError(f"{p}: expected {WEIGHTS_FILE} and {META_FILE} (from `dpimages features train`)")
        try:
            meta = json.loads(meta_path.read_text())
        except ValueError:
            raise InputError(f"{meta_path}: not valid JSON") from None
        state = _read_state(weights)
        if meta.get("arch") == "vgg":
            if resize:
                meta["resize"] = resize
            return VGGTrunk.from_state_dict(state, tap=tap, resize=meta.get("resize", 0)), meta
        trunk = trunk_from_config(meta, tap)
        try:
            trunk.load_state_dict(state)
        except RuntimeError:
            raise InputError(f"{weights}: tensors do not match the architecture in {META_FILE}") from None
        return trunk, meta
    if not p.is_file():
        raise InputError(f"feature weights not found: {p}")
    state = _read_state(p)
    if any(k.startswith("features.") for k in state):
        trunk = VGGTrunk.from_state_dict(state, tap=tap, resize=resize)
        return trunk, {**trunk.config(), "source": str(p)}
    raise InputError(f"{p}: not a VGG state dict (no 'features.N.weight' keys); use a directory from "
                     "`dpimages features train`")


def embed_in_chunks(
    extractor: FeatureExtractor, images: torch.Tensor, chunk: int = 500
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Embed (N, C, H, W) images without gradients, `chunk` at a time."""
    firsts, seconds = [], []
    with torch.no_grad():
        for i in range(0, images.shape[0], chunk):
            f, s = extractor(images[i : i + chunk])
            firsts.append(f)
            if s is not None:
                seconds.append(s)
    return torch.cat(firsts), (torch.cat(seconds) if seconds else None)


def train_and_save_feature_net(public: ImageData, out: str | Path, *, channels: Sequence[int], kernel: int = 3,
                               act: str = "relu", epochs: int = 5, seed: int = 0) -> tuple[Path, dict[str, Any]]:
    """Pre-train a conv trunk on the labelled PUBLIC set and write it to the new folder `out`; (path, meta).

    Trained without privacy accounting: never give it private data (`dpimages features train --public`).
    """
    if not channels or min(channels) < 1 or kernel < 1 or epochs < 1:
        raise InputError(f"--channels, --kernel and --epochs must be positive, got {','.join(map(str, channels))!r}, "
                         f"{kernel}, {epochs}")
    require_empty_folder(out)
    if public.labels is None:
        raise InputError(f"{public.name}: pre-training needs labels")
    trunk, facts = train_conv_trunk(public.to_tensor(), public.label_tensor(), public.num_classes,
                                    channels=tuple(channels), kernel=kernel, act=act, epochs=epochs, seed=seed)
    meta = {"trained_on": public.name, "public_fingerprint": public.public_id, "seed": seed, **facts}
    return save_feature_net(out, trunk, meta), meta
