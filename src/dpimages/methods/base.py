"""What the methods' synthesizers share: their base classes and small helpers.

`MethodSynthesizer` is the base of every method: a device (`to`), the first
step of ``fit`` (`begin_fit`) and the checks of a ``sample`` request
(`checked_labels`). `TrainedSynthesizer` adds ``train_info``, the facts of a
training run that are saved in the checkpoint, and the DP labeller stage
(`labeller_plan`, `fit_labeller`, applied by `sample_in_batches`) that a
method whose config has the ``labeller`` keys runs in its joint plan.
Nothing here reads private data or touches the ledger except `fit_labeller`,
which trains through `dpimages.scatter_classifier` (DP-SGD, reserved plan).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch

from dpimages.data import ImageData, to_uint8
from dpimages.errors import InputError
from dpimages.methods import labeller as lab
from dpimages.methods.prior import refuse_spent_stage
from dpimages.runs import prefixed, unprefixed
from dpimages.scatter_classifier import ScatterClassifier, train_scatter_classifier
from dpimages.synthesizer import ConfigT, FitContext, Synthesizer

M = TypeVar("M", bound=torch.nn.Module)


class MethodSynthesizer(Synthesizer[ConfigT]):
    """A `Synthesizer` with a device (CPU until `fit` or `to` sets it)."""

    # attributes holding the networks used for sampling, moved by `to`
    device_modules: ClassVar[tuple[str, ...]] = ()
    # a fitted DP labeller (`TrainedSynthesizer.fit_labeller`): `sample_in_batches` relabels or filters with it
    labeller: ScatterClassifier | None = None

    def __init__(self, config: ConfigT) -> None:
        super().__init__(config)
        self.device = torch.device("cpu")

    def begin_fit(self, private: ImageData, ctx: FitContext) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The first step of `fit`: adopt ``ctx.device`` and the private data's public facts, find the checkpoint.

        Sets `device`, `num_classes`, `image_shape` and `classes` (public facts: they are in every checkpoint's
        meta). Returns the checkpoint to resume from, ``(tensors, state)``, or ``({}, {})`` for a new run.
        """
        self.device = ctx.device
        self.num_classes = private.num_classes
        self.image_shape = private.image_shape
        self.classes = list(private.classes)
        return ctx.resume_state if ctx.resume_state is not None else ({}, {})

    def to(self, device: torch.device) -> MethodSynthesizer[ConfigT]:
        """Use `device` from now on and move the networks named in `device_modules` (those that exist) there."""
        self.device = torch.device(device)
        for name in self.device_modules:
            module = getattr(self, name, None)
            if module is not None:
                module.to(self.device)
        return self

    def checked_labels(self, n: int, labels: np.ndarray | None) -> np.ndarray:
        """The labels of a request for `n` samples, checked: int64 (n,), balanced classes when `labels` is None.

        Raises InputError unless `n` is a positive integer and `labels` (when given) an integer array of
        shape (n,) with values in [0, num_classes).
        """
        if isinstance(n, bool) or int(n) != n or n < 1:
            raise InputError(f"n must be a positive integer, got {n}")
        labels = self.balanced_labels(n) if labels is None else np.asarray(labels)
        if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
            raise InputError(f"labels must be an integer array of shape ({n},), got {labels.dtype} {labels.shape}")
        if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise InputError(f"labels must be in [0, {self.num_classes})")
        return labels.astype(np.int64)


    def sample_in_batches(self, n: int, labels: np.ndarray | None, seed: int | None, batch: int,
                          generate: Callable[[torch.Tensor, torch.Generator], torch.Tensor]) -> ImageData:
        """`n` samples (balanced classes when `labels` is None): ``generate(labels, g)`` batch by batch, from one
        generator seeded with `seed` (0 when None); images in [-1, 1] (N, C, H, W) become uint8 (N, H, W, C).
        With a fitted DP labeller and ``labeller`` relabel or filter, the images are relabelled or filtered by it
        (post-processing)."""
        labels = self.checked_labels(n, labels)
        g = torch.Generator().manual_seed(int(seed or 0))

        def draw(wanted: np.ndarray) -> np.ndarray:
            out = [to_uint8(generate(torch.from_numpy(wanted[i : i + batch]), g)) for i in range(0, len(wanted), batch)]
            return np.concatenate(out) if out else np.zeros((0, *self.image_shape), np.uint8)

        mode = getattr(self.config, "labeller", "none")
        if self.labeller is None or mode == "none":
            return ImageData(draw(labels), labels, list(self.classes), f"{self.name} samples")
        images, labels = lab.label_samples(self.labeller, mode, labels, draw)
        return ImageData(images, labels, list(self.classes), f"{self.name} samples ({mode}ed by the DP labeller)")


    def save_checkpoint(self, ctx: FitContext, tensors: dict[str, torch.Tensor], *, step: int, finished: bool,
                        **state: Any) -> None:
        """The one checkpoint write of every method: `tensors` (safetensors) and state.json with `step`, `finished`,
        the noise source's state (``noise_rng``: resume checks the ledger against it), the method's own `state`
        and its meta (the public facts a reloaded run needs). Nothing without a run (tests), or on a non-writer."""
        if ctx.run is None:
            return
        ctx.run.save_checkpoint(tensors, {"step": int(step), "finished": bool(finished), **state,
                                          "noise_rng": ctx.noise_state(), **self.meta()})

    def ema_state_dict(self) -> dict[str, torch.Tensor]:
        """The sampling network (``self.ema_model``) as ``ema.*`` tensors; InputError before fit."""
        model = getattr(self, "ema_model", None)
        if model is None:
            raise InputError(f"{self.name}: nothing to save before fit")
        return prefixed("ema", model.state_dict())


class TrainedSynthesizer(MethodSynthesizer[ConfigT]):
    """A `MethodSynthesizer` whose `train_info` (schedule, noise, times: public) is saved with its meta."""

    def __init__(self, config: ConfigT) -> None:
        super().__init__(config)
        self.train_info: dict[str, Any] = {}

    def meta(self) -> dict[str, Any]:
        return {**super().meta(), "train_info": dict(self.train_info)}

    def restore_meta(self, state: dict[str, Any]) -> None:
        super().restore_meta(state)
        self.train_info = dict(state.get("train_info", {}))

    # -- the DP labeller stage (configs with the ``labeller`` keys) -------------------------------

    def labeller_plan(self, dataset_size: int, epsilon: float, delta: float) -> lab.LabellerPlan | None:
        """The labeller stage of this fit's plan, from public facts only: None without ``labeller``, when off, or
        for one class (nothing to label)."""
        if not hasattr(self.config, "labeller") or getattr(self, "num_classes", 0) < 2:
            return None
        return lab.plan_labeller(self.config, dataset_size, epsilon, delta)

    def fit_labeller(self, plan: lab.LabellerPlan, private: ImageData, ctx: FitContext,
                     tensors: dict[str, torch.Tensor]) -> None:
        """The DP labeller: restored from the checkpoint `tensors`, or trained (its DP-SGD steps, reserved with the
        rest of the plan by the caller). A run that stopped inside the stage is refused (its steps are spent)."""
        self.train_info["labeller"] = plan.describe()
        if lab.has_labeller(tensors):
            self.labeller = lab.restore_labeller(plan.schedule, self.image_shape, self.num_classes, tensors,
                                                 self.device)
            return
        refuse_spent_stage(ctx.ledger, plan.events(), "labeller")
        self.labeller = train_scatter_classifier(
            private, plan.schedule, plan.noise_multiplier, ledger=ctx.ledger, noise=ctx.noise,
            dataset_size=ctx.public_size(private), label=lab.RELEASE_LABEL, init=ctx.seeded_init("labeller"),
            device=self.device, progress=ctx.progress, desc=f"{self.name} labeller DP-SGD steps")

    def labeller_tensors(self) -> dict[str, torch.Tensor]:
        """The labeller's weights for a checkpoint or the sampling state (none without one)."""
        return {} if self.labeller is None else lab.labeller_tensors(self.labeller)

    def load_labeller(self, tensors: dict[str, torch.Tensor]) -> None:
        """The labeller of a saved state, when the config uses one and the state holds it."""
        if getattr(self.config, "labeller", "none") != "none" and lab.has_labeller(tensors):
            self.labeller = lab.restore_labeller(lab.schedule_from(self.config), self.image_shape, self.num_classes,
                                                 tensors, self.device)


def load_frozen(new: Callable[[], M], prefix: str, tensors: dict[str, torch.Tensor], method: str,
                device: torch.device) -> M:
    """A network for sampling: ``new()`` with the ``PREFIX.*`` weights of `tensors`, frozen, in eval mode on `device`.

    Raises InputError ("METHOD checkpoint has no 'PREFIX.*' weights") before building anything when there
    are none.
    """
    weights = unprefixed(prefix, tensors)
    if not weights:
        raise InputError(f"{method} checkpoint has no '{prefix}.*' weights")
    net = new()
    net.load_state_dict(weights)
    net.requires_grad_(False)
    return net.to(device).eval()
