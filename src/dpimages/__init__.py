"""dpimages: differentially private synthetic images.

    >>> import dpimages
    >>> dpimages.methods()          # the methods that really train and sample
"""

__version__ = "0.1.0"


def methods() -> list[str]:
    from dpimages.api import methods as _methods

    return _methods()


def create(name: str, preset: str | None = None, **overrides):  # noqa: ANN201
    from dpimages.api import create as _create

    return _create(name, preset, **overrides)


__all__ = ["__version__", "create", "methods"]
