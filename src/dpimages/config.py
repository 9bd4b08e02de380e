"""Method configs: dataclasses with presets, key=value overrides and YAML files.

A method's `Config` is a dataclass; its class attribute `presets` maps a
preset name (``smoke``, ``cpu``, ``gpu``, ``gpu-short``) to field values.
Presets change sizes, never code paths. Unknown keys and values of the wrong
type are refused with `InputError` (exit code 2).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import yaml

from dpimages.errors import InputError
from dpimages.privacy.dpsgd import PER_EXAMPLE_METHODS  # how the engine forms per-example clipped sums (speed only)

PRESETS = ("smoke", "cpu", "gpu", "gpu-short")
REFERENCE_PIXELS = 28 * 28  # presets are sized for 28x28 images (Fashion-MNIST)


@dataclasses.dataclass(frozen=True)
class Constraint:
    """A per-field check: `ok(value)` must hold, else ``InputError("NAME TEXT, got VALUE")`` (exit 2)."""

    ok: Callable[[Any], bool]
    text: str


def at_least(low: float, note: str = "") -> Constraint:
    """value >= low (an int count or a finite float); `note` explains a special value, e.g. "(0: no limit)"."""
    return Constraint(lambda v: math.isfinite(v) and v >= low, f"must be >= {low:g}" + (f" {note}" if note else ""))


def positive() -> Constraint:
    """A finite number > 0."""
    return Constraint(lambda v: math.isfinite(v) and v > 0, "must be a finite number > 0")


def in_range(low: float, high: float, closed: str = "left") -> Constraint:
    """low <= value < high (``closed`` = "left"), both ends ("both") or neither ("neither")."""
    lo_ok = (lambda v: v >= low) if closed in ("left", "both") else (lambda v: v > low)
    hi_ok = (lambda v: v <= high) if closed in ("right", "both") else (lambda v: v < high)
    brackets = {"left": "[)", "right": "(]", "both": "[]", "neither": "()"}[closed]
    return Constraint(lambda v: math.isfinite(v) and lo_ok(v) and hi_ok(v),
                      f"must be in {brackets[0]}{low:g}, {high:g}{brackets[1]}")


def one_of(*options: Any) -> Constraint:
    return Constraint(lambda v: v in options, f"must be one of {', '.join(map(str, options))}")


def positive_ints() -> Constraint:
    """A non-empty sequence of integers >= 1 (channel lists)."""
    return Constraint(lambda v: len(v) > 0 and all(int(x) == x and x >= 1 for x in v), "must be positive ints")



# run-control fields: checked for every config that has them
RUN_CONTROL_CONSTRAINTS: dict[str, Constraint] = {
    "log_every": at_least(1), "grid_every": at_least(1), "checkpoint_every": at_least(1), "eval_every": at_least(1),
    "sample_batch": at_least(1), "physical_batch": at_least(1), "per_example": one_of(*PER_EXAMPLE_METHODS),
    "max_minutes": at_least(0, "(0: no limit)"), "steps_per_run": at_least(0, "(0: no limit)"),
}


def non_negative_ints(note: str = "") -> Constraint:
    """A non-empty sequence of integers >= 0."""
    return Constraint(lambda v: len(v) > 0 and all(int(x) == x and x >= 0 for x in v),
                      "must be ints >= 0" + (f" {note}" if note else ""))


# feature-network fields (dp-mepf, pe): checked for every config that has them, with `check_feature_source`
FEATURE_CONSTRAINTS: dict[str, Constraint] = {
    "feature_channels": positive_ints(), "public_epochs": at_least(0),
    "feature_pool": non_negative_ints("(0: full map, 1: channel means)"),
}
# a method's DP labeller (`dpimages.methods.labeller`): checked for every config that declares the keys
LABELLER_CONSTRAINTS: dict[str, Constraint] = {
    "labeller": one_of("none", "relabel", "filter"), "labeller_share": in_range(0, 1, "neither"),
    "labeller_batch": at_least(1), "labeller_epochs": positive(), "labeller_lr": positive(),
    "labeller_clip": positive(),
}


@dataclasses.dataclass
class MethodConfig:
    """Base of every method's config: plain-type `to_dict`, and per-field constraints checked once.

    A subclass declares its fields, `presets`, `constraints` (field -> `Constraint`, as scikit-learn's
    ``_parameter_constraints``) and, for checks across fields, `check`. The run-control fields
    (`RUN_CONTROL_CONSTRAINTS`: log_every, grid_every, checkpoint_every, sample_batch, physical_batch,
    max_minutes, steps_per_run) and feature-network fields (`FEATURE_CONSTRAINTS`, `check_feature_source`)
    are checked for every config that declares them.
    """

    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    # keys whose work grows with the image area: on images larger than 28x28 the default or preset value is scaled
    # by 28*28 / (H*W) (never below the floor given here), so a fit stays within its preset's time; a value the
    # user sets (KEY=VALUE or --config) is kept as it is
    image_scaled: ClassVar[dict[str, int]] = {}
    # keys that only steer sampling from a fitted model (post-processing): `dpimages sample` may override them
    sampling_keys: ClassVar[tuple[str, ...]] = ()
    constraints: ClassVar[dict[str, Constraint]] = {}

    def __post_init__(self) -> None:
        names = {f.name for f in dataclasses.fields(self)}
        for name, rule in {**RUN_CONTROL_CONSTRAINTS, **FEATURE_CONSTRAINTS, **LABELLER_CONSTRAINTS,
                           **self.constraints}.items():
            if name not in names:
                continue
            value = getattr(self, name)
            try:
                fine = value is not None and rule.ok(value)
            except (TypeError, ValueError):
                fine = False
            if not fine:
                shown = list(value) if isinstance(value, tuple) else value
                raise InputError(f"{name} {rule.text}, got {shown!r}" if isinstance(value, str) else
                                 f"{name} {rule.text}, got {shown}")
        if "features" in names:
            check_feature_source(self.features, self.feature_path)  # type: ignore[attr-defined]
        self.check()

    def check(self) -> None:
        """Checks across fields (InputError, one line); the per-field ones are in `constraints`."""

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (tuples as lists), so config.yaml round-trips and --resume compares equal."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def _coerce(name: str, value: Any, annotation: Any) -> Any:
    """Coerce a string or YAML value to the field's declared type."""
    hint = annotation if not isinstance(annotation, str) else eval(annotation, vars(typing))  # noqa: S307
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(name, value, a)
            except InputError:
                continue
        raise InputError(f"{name} must be one of {[getattr(a, '__name__', a) for a in args]}, got {value!r}")
    if origin in (list, tuple):
        items = value.split(",") if isinstance(value, str) else list(value)
        inner = args[0] if args else str
        out = [_coerce(name, v.strip() if isinstance(v, str) else v, inner) for v in items if v != ""]
        return tuple(out) if origin is tuple else out
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if hint is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if hint is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if hint is str:
            return str(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be {getattr(hint, '__name__', hint)}, got {value!r}") from None
    return value


FEATURE_SOURCES = ("random", "public", "path", "scatter", "random+scatter")


def check_feature_source(features: str, feature_path: str | None) -> None:
    """Validate a method's `features` / `feature_path` pair (dp-mepf's and pe's feature networks); exit 2 if not."""
    if features not in FEATURE_SOURCES:
        raise InputError(f"features must be one of {', '.join(FEATURE_SOURCES)}, got {features!r}")
    if features == "path" and not feature_path:
        raise InputError("features=path needs feature_path=DIR_OR_FILE")
    if features != "path" and feature_path:
        raise InputError(f"feature_path is only used with features=path, got features={features}")


def parse_overrides(items: list[str]) -> dict[str, str]:
    """KEY=VALUE strings to {key: value} (dashes in keys read as underscores); malformed items exit 2."""
    values: dict[str, str] = {}
    for item in items:
        key, sep, val = item.partition("=")
        if not sep or not key:
            raise InputError(f"override must look like key=value, got {item!r}")
        values[key.strip().replace("-", "_")] = val
    return values


def area_scale(image_shape: Sequence[int] | None) -> float:
    """28*28 / (H*W) for images larger than 28x28, else 1: how much less work per image a preset can afford."""
    if image_shape is None:
        return 1.0
    return min(1.0, REFERENCE_PIXELS / float(image_shape[0] * image_shape[1]))


def resolve_config(
    config_cls: type[MethodConfig],
    preset: str | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
    yaml_path: str | Path | None = None,
    image_shape: Sequence[int] | None = None,
) -> MethodConfig:
    """Defaults, then the preset (its `image_scaled` keys scaled to `image_shape`, (H, W, C), when the images are
    larger than 28x28), then a YAML file, then key=value overrides."""
    values: dict[str, Any] = {}
    if preset is not None:
        if preset not in config_cls.presets:
            raise InputError(f"unknown preset {preset!r}; this method has: {', '.join(config_cls.presets) or 'none'}")
        values.update(config_cls.presets[preset])
    scale = area_scale(image_shape)
    if scale < 1.0:
        defaults = {f.name: f.default for f in dataclasses.fields(config_cls)}
        for key, floor in config_cls.image_scaled.items():
            base = values.get(key, defaults[key])
            values[key] = min(base, max(floor, round(base * scale)))  # never above the preset
    if yaml_path is not None:
        try:
            loaded = yaml.safe_load(Path(yaml_path).read_text())
        except OSError:
            raise InputError(f"config file not found: {yaml_path}") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise InputError(f"{yaml_path}: invalid YAML{where}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise InputError(f"{yaml_path}: expected a mapping of key: value, got {type(loaded).__name__}")
        values.update(loaded)
    values.update(overrides if isinstance(overrides, dict) else parse_overrides(overrides or []))
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise InputError(
            f"unknown config key {unknown[0]!r} for {config_cls.__name__}; known keys: {', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(config_cls)
    coerced = {k: _coerce(k, v, hints[k]) for k, v in values.items()}
    return config_cls(**coerced)


@dataclasses.dataclass
class LabellerKeys:
    """A method's DP labeller (`dpimages.methods.labeller`): ``labeller`` none, relabel or filter; the share of
    epsilon its DP-SGD steps are calibrated to, and its schedule (chosen on Fashion-MNIST's validation split with
    benchmarks/scatter_classifier.py). Mixed into the configs of the methods that run it."""

    labeller: str = "none"
    labeller_share: float = 0.25
    labeller_batch: int = 8192
    labeller_epochs: float = 40.0
    labeller_lr: float = 4.0
    labeller_clip: float = 0.1


# the smoke presets' labeller: a step or two (tests)
LABELLER_SMOKE: dict[str, Any] = {"labeller_batch": 64, "labeller_epochs": 0.01}


@dataclasses.dataclass
class RunControl(MethodConfig):
    """The run-control fields of a method that trains in checkpointed steps (dp-mepf, dpdfd, dpdm).

    ``log_every`` / ``grid_every`` / ``checkpoint_every``: every how many steps to log a metrics line, draw a
    sample grid and save a checkpoint; ``max_minutes`` (0: no limit): wall time of one process's share of the
    run (what happens then is the method's: pause and ``--resume``, or finish early). A method redeclares a
    field only to change its default.
    """

    log_every: int = 10
    grid_every: int = 500
    checkpoint_every: int = 200
    max_minutes: float = 0.0
