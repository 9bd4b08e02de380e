"""The public API in one import: the base class, the registry and the fit runner.

`dpimages.synthesizer` (`Synthesizer`, `FitContext`, `FitResult`), `dpimages.registry` (`METHOD_CLASSES`,
`methods`, `method_class`, `create`) and `dpimages.fit_runner` (`fit_run`, `load_synthesizer`) hold them; this module
only gathers them for users and scripts. Inside the package, import from those modules directly.
"""

from dpimages.fit_runner import check_distributed, fit_run, load_synthesizer, public_facts, resume_noise
from dpimages.registry import METHOD_CLASSES, create, method_class, methods
from dpimages.synthesizer import ConfigT, FitContext, FitResult, Synthesizer

__all__ = ["METHOD_CLASSES", "ConfigT", "FitContext", "FitResult", "Synthesizer", "check_distributed", "create",
           "fit_run", "load_synthesizer", "method_class", "methods", "public_facts", "resume_noise"]
