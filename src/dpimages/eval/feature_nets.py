"""Feature networks for fidelity metrics, and the on-disk cache of the evaluation network.

No Inception weights can be downloaded here, so by default the features come
from a domain *evaluation network*: a small CNN trained once, non-privately
(it is used for evaluation only, never by a generator), on the real training
split. It is cached under ``$DPIMAGES_CACHE`` (default ``~/.cache/dpimages``)
in ``evalnet/<key>/``, where ``key`` hashes the training data's fingerprint,
`EVAL_NET_VERSION` and the training settings; its name ``evalcnn-v1-<key>``
goes into every result as ``feature_net``. With pytorch-fid Inception weights
given by path (``--fid-weights``), the feature network is Inception-v3 and
the name is ``inception-v3-pytorch-fid-<sha>``: numbers from different
feature networks are never comparable.

The features of the real training split (the fidelity reference) are cached
beside each network, keyed by the data fingerprint.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from dpimages.data import ImageData, to_unit_range
from dpimages.filehash import file_sha256

EVAL_NET_VERSION = 1
EVAL_NET_SETTINGS = {"arch": "evalcnn(16,32)-fc128", "epochs": 2, "lr": 1e-3, "batch_size": 128, "seed": 0}
FEATURE_DIM = 128
SCALE_PROBE = 5000  # training images used to fix the feature scale


def cache_dir() -> Path:
    """``$DPIMAGES_CACHE`` or ``~/.cache/dpimages``."""
    env = os.environ.get("DPIMAGES_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "dpimages"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Exclusive lock so that two processes do not train the same network at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


class EvalCNN(nn.Module):
    """Evaluation CNN: conv 16, conv 32 (3x3, max pool), `FEATURE_DIM`-d feature layer, linear head."""

    def __init__(self, image_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        h, w, c = image_shape
        self.body = nn.Sequential(
            nn.Conv2d(c, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(32 * (h // 4) * (w // 4), FEATURE_DIM),
        )
        self.head = nn.Linear(FEATURE_DIM, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-activation output of the feature layer (before the ReLU that feeds the head)."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.body(x)))


class FeatureNet:
    """A named map from uint8 images (N, H, W, C) to feature vectors (N, D)."""

    def __init__(self, name: str, net: nn.Module, embed: Callable[[torch.Tensor], torch.Tensor], dim: int,
                 info: dict, cache: Path | None, device: torch.device, batch_size: int = 500) -> None:
        self.name, self.net, self._embed, self.dim, self.info = name, net, embed, dim, info
        self.cache, self.device, self.batch_size = cache, device, batch_size

    @torch.no_grad()
    def __call__(self, images: np.ndarray, progress: Callable[[int], None] | None = None) -> np.ndarray:
        self.net.eval()
        out = np.empty((len(images), self.dim), np.float32)
        x = torch.from_numpy(np.ascontiguousarray(images))
        for i in range(0, len(images), self.batch_size):
            out[i : i + self.batch_size] = self._embed(to_unit_range(x[i : i + self.batch_size], self.device)).cpu()
            if progress:
                progress(min(self.batch_size, len(images) - i))
        return out

    def reference_features(self, real: ImageData) -> np.ndarray:
        """Features of the real reference set, cached beside the network (keyed by the data fingerprint)."""
        if self.cache is None:
            return self(real.images)
        path = self.cache / f"ref-{real.fingerprint.removeprefix('sha256:')[:20]}.npy"
        if path.exists():
            return np.load(path)
        with _locked(path.with_suffix(".lock")):
            if path.exists():
                return np.load(path)
            feats = self(real.images)
            _atomic_save_npy(path, feats)
        return feats


def eval_net_key(train: ImageData) -> str:
    """Cache key: hash of the training data fingerprint, code version and training settings."""
    blob = json.dumps({"version": EVAL_NET_VERSION, "settings": EVAL_NET_SETTINGS, "data": train.fingerprint,
                       "shape": list(train.image_shape), "classes": train.num_classes}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def train_eval_net(train: ImageData, val: ImageData | None = None, *, device: torch.device | str = "cpu",
                   log: Callable[[str], None] | None = None) -> tuple[EvalCNN, dict]:
    """Train the evaluation CNN non-privately on `train` (evaluation only). Returns the net and facts about it."""
    s = EVAL_NET_SETTINGS
    device = torch.device(device)
    t0 = time.time()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s["seed"])
        net = EvalCNN(train.image_shape, train.num_classes).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=s["lr"])
    x, y = torch.from_numpy(train.images), torch.from_numpy(train.labels)
    gen = torch.Generator().manual_seed(s["seed"])
    for epoch in range(s["epochs"]):
        net.train()
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(order), s["batch_size"]):
            idx = order[i : i + s["batch_size"]]
            loss = F.cross_entropy(net(to_unit_range(x[idx], device)), y[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if log:
            log(f"evaluation network epoch {epoch + 1}/{s['epochs']} done ({time.time() - t0:.0f} s)")
    info = {"trained_on": train.name, "data_fingerprint": train.fingerprint, "n_train": len(train),
            "train_s": round(time.time() - t0, 1), "settings": s, "version": EVAL_NET_VERSION}
    if val is not None and val.labels is not None:
        from dpimages.eval.classifiers import accuracy

        info["val_acc"] = accuracy(net, torch.from_numpy(val.images), torch.from_numpy(val.labels), device)
        info["val_set"] = val.name
    return net.eval(), info


def eval_feature_net(train: ImageData, val: ImageData | None = None, *, device: torch.device | str = "cpu",
                     log: Callable[[str], None] | None = None) -> FeatureNet:
    """The cached evaluation network for `train`; trained (about a minute on 2 cores) on first use."""
    device = torch.device(device)
    key = eval_net_key(train)
    d = cache_dir() / "evalnet" / key
    weights, meta_path = d / "model.safetensors", d / "meta.json"
    with _locked(cache_dir() / "evalnet" / f"{key}.lock"):
        if not (weights.exists() and meta_path.exists()):
            if log:
                log(f"training the evaluation network on {train.name} (once; cached in {d})")
            net, info = train_eval_net(train, val, device=device, log=log)
            # one fixed scalar, part of the feature map: real training features get unit mean square, so
            # the cubic KID kernel (x.y / d + 1)^3 works at its intended scale
            with torch.no_grad():
                probe = to_unit_range(torch.from_numpy(train.images[:SCALE_PROBE]), device)
                info["feature_scale"] = float(net.features(probe).pow(2).mean().rsqrt())
            d.mkdir(parents=True, exist_ok=True)
            tmp = d / f"model.{os.getpid()}.tmp"
            save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, str(tmp))
            os.replace(tmp, weights)
            info["weights_sha256"] = file_sha256(weights)
            tmp_meta = d / f"meta.{os.getpid()}.tmp"
            tmp_meta.write_text(json.dumps(info, indent=1))
            os.replace(tmp_meta, meta_path)
    info = json.loads(meta_path.read_text())
    net = EvalCNN(train.image_shape, train.num_classes)
    net.load_state_dict(load_file(str(weights)))
    net = net.to(device).eval()
    scale = float(info["feature_scale"])
    name = f"evalcnn-v{EVAL_NET_VERSION}-{key[:8]}"
    return FeatureNet(name, net, lambda x: net.features(x) * scale, FEATURE_DIM, {**info, "cache": str(d)}, d, device)


def inception_feature_net(weights_path: str | Path, *, device: torch.device | str = "cpu") -> FeatureNet:
    """pytorch-fid Inception-v3 pool3 features from a user's weights file."""
    from dpimages.eval.inception import load_fid_inception

    device = torch.device(device)
    net, sha = load_fid_inception(weights_path)
    net = net.to(device)
    d = cache_dir() / "inception" / sha[:16]
    name = f"inception-v3-pytorch-fid-{sha[:8]}"
    info = {"weights": str(weights_path), "weights_sha256": sha, "cache": str(d)}
    return FeatureNet(name, net, net, 2048, info, d, device, batch_size=100)
