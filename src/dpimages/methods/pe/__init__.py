"""Private Evolution (`pe`): noisy nearest-neighbour votes of private images steer a public generative model.

One module per role, as in Microsoft's ``pe`` library: `api` (the
`ImageAPI` interface: ``random`` and ``variation``), `diffusion_api` (our
own public EDM U-Net, SDEdit variations), `diffusers_api` (a user's local
diffusers pipeline), `public_model` (its training command), `release`
(the only access to private data: votes, their noisy release and the
resampling; the privacy contract), `method` (the `PE` synthesizer),
`report` (its report.md section) and `config` (presets).
"""

from dpimages.methods.pe.config import PEConfig, PublicModelConfig
from dpimages.methods.pe.image_api import ImageAPI
from dpimages.methods.pe.method import PE

__all__ = ["PE", "ImageAPI", "PEConfig", "PublicModelConfig"]
