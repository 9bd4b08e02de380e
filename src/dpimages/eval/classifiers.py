"""Downstream classifiers trained on (synthetic) images, selected on validation, tested once.

Protocols (BENCHMARK.md):
- ``default`` (every preset, DPDM-style): a small CNN, an MLP and logistic
  regression, Adam, early stopping on the held-out validation images.
- ``wrn`` (GPU runs, DPImageBench-style): WRN-40-4 and a ResNet-18-style
  network, Adam lr 0.01, 50 epochs, epoch and architecture chosen on the
  validation images.

Model selection never looks at the test set: each network is evaluated on
the test images exactly once, with the weights of its best validation epoch.
Images enter as uint8 (N, H, W, C) arrays and become [-1, 1] floats per batch
through `dpimages.data.to_unit_range`.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dpimages.data import to_unit_range

# -- networks ------------------------------------------------------------------------


class CNN(nn.Module):
    """Two 3x3 conv layers (16, 32 channels) with max pooling, a 128-unit hidden layer, dropout."""

    def __init__(self, image_shape: tuple[int, int, int], num_classes: int, widths: tuple[int, int] = (16, 32)) -> None:
        super().__init__()
        h, w, c = image_shape
        c1, c2 = widths
        self.features = nn.Sequential(
            nn.Conv2d(c, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Linear(c2 * (h // 4) * (w // 4), 128), nn.ReLU(), nn.Dropout(0.25),
                                  nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class MLP(nn.Module):
    """Two hidden layers of 256 ReLU units."""

    def __init__(self, image_shape: tuple[int, int, int], num_classes: int, hidden: int = 256) -> None:
        super().__init__()
        d = int(np.prod(image_shape))
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class LogReg(nn.Module):
    """Multinomial logistic regression on raw pixels."""

    def __init__(self, image_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(int(np.prod(image_shape)), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


class _WideBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.shortcut = None if (cin == cout and stride == 1) else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(x))
        y = self.conv1(o)
        y = self.conv2(self.dropout(F.relu(self.bn2(y))))
        return y + (x if self.shortcut is None else self.shortcut(o))


class WideResNet(nn.Module):
    """WRN-depth-k (Zagoruyko and Komodakis 2016); WRN-40-4 by default."""

    def __init__(self, image_shape: tuple[int, int, int], num_classes: int, depth: int = 40, widen: int = 4,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        layers: list[nn.Module] = [nn.Conv2d(image_shape[2], widths[0], 3, 1, 1, bias=False)]
        for g, stride in enumerate((1, 2, 2)):
            for i in range(n):
                layers.append(_WideBlock(widths[g] if i == 0 else widths[g + 1], widths[g + 1], stride if i == 0 else 1,
                                         dropout))
        layers += [nn.BatchNorm2d(widths[3]), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(widths[3], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity() if (cin == cout and stride == 1) else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet-18 layout for small images (3x3 stem, no initial max pool)."""

    def __init__(self, image_shape: tuple[int, int, int], num_classes: int, blocks: tuple[int, ...] = (2, 2, 2, 2),
                 base: int = 64) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(image_shape[2], base, 3, 1, 1, bias=False), nn.BatchNorm2d(base),
                                   nn.ReLU()]
        cin = base
        for g, nblocks in enumerate(blocks):
            cout = base * 2**g
            for i in range(nblocks):
                layers.append(_BasicBlock(cin, cout, 2 if (i == 0 and g > 0) else 1))
                cin = cout
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


# -- protocols -----------------------------------------------------------------------


@dataclass(frozen=True)
class TrainSpec:
    """How one classifier is trained: architecture factory and optimisation settings."""

    name: str
    factory: Callable[[tuple[int, int, int], int], nn.Module]
    epochs: int
    lr: float
    batch_size: int = 128
    patience: int | None = 3  # epochs without validation improvement before stopping; None: run all epochs
    weight_decay: float = 0.0


def default_specs(smoke: bool = False) -> list[TrainSpec]:
    """CNN, MLP and logistic regression (every preset)."""
    if smoke:
        return [TrainSpec("cnn", CNN, 2, 1e-3), TrainSpec("mlp", MLP, 2, 1e-3), TrainSpec("logreg", LogReg, 2, 1e-3)]
    return [
        TrainSpec("cnn", CNN, 10, 1e-3),
        TrainSpec("mlp", MLP, 15, 1e-3),
        TrainSpec("logreg", LogReg, 15, 1e-3, batch_size=256),
    ]


def wrn_specs(smoke: bool = False) -> list[TrainSpec]:
    """DPImageBench protocol: WRN-40-4 and ResNet, Adam lr 0.01, 50 epochs, best epoch on validation."""
    epochs = 1 if smoke else 50
    return [TrainSpec("wrn", WideResNet, epochs, 0.01, batch_size=256, patience=None),
            TrainSpec("resnet", ResNet, epochs, 0.01, batch_size=256, patience=None)]


@dataclass
class ClassifierResult:
    """Outcome of one classifier: test accuracy of the best-validation weights and how it was chosen."""

    name: str
    test_acc: float
    val_acc: float
    best_epoch: int
    epochs_run: int
    n_train: int
    n_val: int
    n_test: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def accuracy(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, device: torch.device,
             batch_size: int = 1000) -> float:
    """Top-1 accuracy of `net` on uint8 NHWC `images`."""
    net.eval()
    correct = 0
    for i in range(0, len(images), batch_size):
        x = to_unit_range(images[i : i + batch_size], device)
        correct += int((net(x).argmax(1).cpu() == labels[i : i + batch_size]).sum())
    return correct / max(len(images), 1)


def train_classifier(
    spec: TrainSpec,
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    num_classes: int,
    *,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: Callable[[str], None] | None = None,
) -> ClassifierResult:
    """Train `spec` on `train`, keep the weights of the best validation epoch, test them once.

    Each pair is (uint8 images (N, H, W, C), int64 labels (N,)). Seeded: the
    weight init and batch order come from `seed`, not from global state.
    """
    t0 = time.time()
    device = torch.device(device)
    xtr, ytr = torch.from_numpy(np.ascontiguousarray(train[0])), torch.from_numpy(train[1])
    xva, yva = torch.from_numpy(np.ascontiguousarray(val[0])), torch.from_numpy(val[1])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = spec.factory(tuple(train[0].shape[1:]), num_classes).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    best_acc, best_epoch, best_state, since_best, epoch = -1.0, 0, None, 0, 0
    for epoch in range(1, spec.epochs + 1):
        net.train()
        order = torch.randperm(len(xtr), generator=gen)
        for i in range(0, len(order), spec.batch_size):
            idx = order[i : i + spec.batch_size]
            if len(idx) < 2 and any(isinstance(m, nn.BatchNorm2d) for m in net.modules()):
                continue
            loss = F.cross_entropy(net(to_unit_range(xtr[idx], device)), ytr[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        val_acc = accuracy(net, xva, yva, device)
        if progress:
            progress(f"{spec.name} epoch {epoch}/{spec.epochs}: val {val_acc:.4f}")
        if val_acc > best_acc:
            best_acc, best_epoch, since_best = val_acc, epoch, 0
            best_state = copy.deepcopy(net.state_dict())
        else:
            since_best += 1
            if spec.patience is not None and since_best >= spec.patience:
                break
    assert best_state is not None
    net.load_state_dict(best_state)
    test_acc = accuracy(net, torch.from_numpy(np.ascontiguousarray(test[0])), torch.from_numpy(test[1]), device)
    return ClassifierResult(spec.name, test_acc, best_acc, best_epoch, epoch, len(xtr), len(xva), len(test[0]),
                            round(time.time() - t0, 2))
