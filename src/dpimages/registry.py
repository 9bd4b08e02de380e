"""The method registry: the one place a method is registered, and how a name becomes a class or a synthesizer.

Nothing else imports a method package: `method_class` imports a method's module on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from dpimages.config import resolve_config
from dpimages.errors import InputError
from dpimages.synthesizer import Synthesizer

# The one place a method is registered: name -> "module:Class". Only methods that really train and sample, each
# held to the contract by `dpimages.testing.check_method` (tests/methods/test_contract.py runs it for every name).
METHOD_CLASSES: dict[str, str] = {
    "dp-mepf": "dpimages.methods.dp_mepf.method:DPMEPF",
    "dpdfd": "dpimages.methods.dpdfd.method:DPDFD",
    "dpdm": "dpimages.methods.dpdm.method:DPDM",
    "dpaf": "dpimages.methods.dpaf.method:DPAF",
    "dpaf-noagg": "dpimages.methods.dpaf.method:DPAFNoAggregation",
    "pe": "dpimages.methods.pe.method:PE",
}


def methods() -> list[str]:
    return sorted(METHOD_CLASSES)


def method_class(name: str) -> type[Synthesizer]:
    """The registered class called `name` (its module is imported on first use); InputError for another name."""
    if name not in METHOD_CLASSES:
        raise InputError(f"unknown method {name!r}; available: {', '.join(methods()) or 'none yet'}")
    module, attr = METHOD_CLASSES[name].split(":")
    cls = getattr(importlib.import_module(module), attr)
    if cls.name != name:
        raise RuntimeError(f"registry: {METHOD_CLASSES[name]} is named {cls.name!r}, not {name!r}")
    return cls


def create(name: str, preset: str | None = None, *, image_shape: tuple[int, int, int] | None = None,
           **overrides: Any) -> Synthesizer:
    """A `name` synthesizer at `preset` with `overrides`; `image_shape` scales the preset's image-sized keys."""
    cls = method_class(name)
    return cls(resolve_config(cls.Config, preset, overrides, image_shape=image_shape))
