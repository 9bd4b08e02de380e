"""dpimages: differentially private synthetic images.

Three lines from a private folder of images to shareable synthetic ones::

    >>> import dpimages
    >>> run = dpimages.fit("dp-mepf", "folder:/data/scans", epsilon=10, run_dir="runs/scans")   # doctest: +SKIP
    >>> synth = dpimages.load("runs/scans")                                                    # doctest: +SKIP
    >>> images = synth.sample(1000)            # an ImageData: uint8 (N, H, W, C), labels     # doctest: +SKIP

``dpimages.methods()`` lists the methods; ``dpimages.evaluate(images, real=...)``
measures utility against real data (outside the privacy guarantee: it uses
the real data without noise). The implementation is `dpimages.api`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from dpimages.api import FitResult, Synthesizer
    from dpimages.data import ImageData


def methods() -> list[str]:
    """The registered methods (each really trains and samples)."""
    from dpimages.api import methods as _methods

    return _methods()


def create(name: str, preset: str | None = None, **overrides: Any) -> Synthesizer:
    """An unfitted synthesizer of method `name` with the preset's config and KEY=value overrides."""
    from dpimages.api import create as _create

    return _create(name, preset, **overrides)


def fit(method: str, data: str | ImageData, *, epsilon: float, delta: float = 1e-5, run_dir: str,
        preset: str = "cpu", public: str | ImageData | None = None, seed: int = 0, progress: bool = True,
        **config: Any) -> FitResult:
    """Fit `method` on private `data` (a SPEC such as ``folder:PATH`` or an `ImageData`) under (epsilon, delta).

    Writes the run directory `run_dir` (ledger, report, samples, checkpoints) and returns a `FitResult`
    (``.synthesizer``, ``.ledger``, ``.run``). `config`: the method's keys, e.g. ``steps=500``. Privacy noise
    comes from the OS CSPRNG; `seed` seeds everything else.
    """
    from dpimages.api import fit_run

    return fit_run(method, data, epsilon=epsilon, delta=delta, run_dir=run_dir, preset=preset, public=public,
                   overrides=dict(config), seed=seed, progress=progress)


def load(run_dir: str, device: str | None = None) -> Synthesizer:
    """The fitted synthesizer of a finished run: ``.sample(n, labels=None, seed=None)`` and ``.report()``."""
    from dpimages.api import load_synthesizer

    return load_synthesizer(run_dir, device)


def split(data: str | ImageData, held_out: float = 0.1, seed: int = 0) -> tuple[ImageData, ImageData]:
    """(training part, held-out part) of your data (a SPEC or an ImageData), split by each image's content (adding
    an image moves no other): fit on the first, evaluate against the second. Both parts are private."""
    from dpimages.data import held_out_split
    from dpimages.data import load as _load

    return held_out_split(_load(data) if isinstance(data, str) else data, held_out, seed)


def evaluate(images: ImageData | str, *, real: str | ImageData, test: str | ImageData | None = None,
             smoke: bool = False, seed: int = 0) -> dict:
    """Utility of labelled synthetic `images` (an ImageData or a SPEC) against `real` data (a SPEC or the training
    part of `split`).

    Trains classifiers on the images and tests them on real test images (`test`: your held-out part, needed unless
    `real` is fashion-mnist or cifar10); also FID and memorization. These figures use the real data without
    noise: they are for you, not to share.
    """
    from dpimages.data import load as _load
    from dpimages.eval import EvalOptions, load_real
    from dpimages.eval import evaluate as _evaluate

    data = _load(images) if isinstance(images, str) else images
    return _evaluate(data, load_real(real, test), options=EvalOptions(smoke=smoke, seed=seed, progress=False))


__all__ = ["__version__", "create", "evaluate", "fit", "load", "methods", "split"]
