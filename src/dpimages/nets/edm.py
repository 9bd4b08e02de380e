"""EDM preconditioning, training loss and samplers (Karras et al., "Elucidating the Design Space of
Diffusion-Based Generative Models", NeurIPS 2022; "EDM" below).

One model contract, as in k-diffusion: ``denoise(x, sigma, labels) -> clean image``
(EDM's ``D(x; sigma)``), for images in [-1, 1]. Everything here works on a
callable with that contract (`Denoiser`), so samplers and losses also serve
a denoiser inside ``torch.func.functional_call`` (per-example gradients).

* `EDMDenoiser` wraps a raw network ``F(c_in x, c_noise, labels)`` with
  EDM's preconditioning (Table 1, "Ours" column; Eq. 7):
  ``D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma))`` with
  ``c_skip = sd^2 / (sigma^2 + sd^2)``, ``c_out = sigma sd / sqrt(sigma^2 + sd^2)``,
  ``c_in = 1 / sqrt(sigma^2 + sd^2)``, ``c_noise = ln(sigma) / 4`` and
  ``sd = sigma_data = sqrt(1/3)`` (the standard deviation of uniform
  pixels in [-1, 1], as DPDM uses).
* Training (EDM Table 1): ``ln sigma ~ N(P_mean, P_std^2)`` with
  ``P_mean = -1.2``, ``P_std = 1.2``; loss weight
  ``lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2``; per-draw loss
  ``lambda(sigma) * mean over pixels of (D(x + sigma n; sigma) - x)^2``.
  `EDMDenoiser.loss` returns *one value per example*, the mean over K
  draws of (sigma, n) when sigma has shape (B, K): DPDM's noise
  multiplicity (Dockhorn et al., TMLR 2023, Sec. 4), which DP-SGD then clips
  per example.
* Sampling (EDM Sec. 3): the sigma schedule of Eq. 5 (`karras_sigmas`); a
  first-order Euler and the second-order Heun sampler of Algorithm 1, both
  with the optional "churn" of Algorithm 2; `sample_stochastic` is
  Algorithm 2 with churn on by default. All samplers share one signature
  and draw their noise from an explicit ``torch.Generator`` (no global RNG).
* Classifier-free guidance (Ho & Salimans 2022) with the null label:
  ``D = D(x | y) + w (D(x | y) - D(x | null))``; ``w = 0`` is no guidance.
* `EDMDenoiser.vary`: SDEdit (Meng et al., ICLR 2022): noise images to
  ``sigma_start`` and solve the ODE back to 0; the variation API of PE.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from dpimages.errors import InputError

SIGMA_DATA = math.sqrt(1.0 / 3.0)
P_MEAN = -1.2
P_STD = 1.2

# (x, sigma) -> clean image; sigma has shape (B,) (labels and guidance bound in a closure)
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# -- preconditioning and loss weight (pure functions) ----------------------------------
def edm_scalings(
    sigma: torch.Tensor, sigma_data: float = SIGMA_DATA
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """EDM Table 1 preconditioning: (c_skip, c_out, c_in, c_noise) for noise levels `sigma`."""
    s2 = sigma * sigma
    sd2 = sigma_data * sigma_data
    c_skip = sd2 / (s2 + sd2)
    c_out = sigma * sigma_data / torch.sqrt(s2 + sd2)
    c_in = 1.0 / torch.sqrt(s2 + sd2)
    c_noise = torch.log(sigma) / 4.0
    return c_skip, c_out, c_in, c_noise


def edm_loss_weight(sigma: torch.Tensor, sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    """EDM Table 1 loss weight lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2 (= 1 / c_out^2)."""
    return (sigma * sigma + sigma_data * sigma_data) / (sigma * sigma_data) ** 2


def training_sigmas(
    shape: tuple[int, ...], generator: torch.Generator, *, p_mean: float = P_MEAN, p_std: float = P_STD,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """EDM's training noise levels: ln sigma ~ N(p_mean, p_std^2), drawn from `generator` (on `device`)."""
    return torch.exp(p_mean + p_std * torch.randn(shape, generator=generator, device=device))


# -- the denoiser --------------------------------------------------------------------------
class EDMDenoiser(nn.Module):
    """EDM-preconditioned denoiser ``D(x; sigma, labels)`` around a raw network ``net(x_in, c_noise, labels)``.

    `net` must return a tensor shaped like its input and may take labels in
    ``[0, num_classes]`` where ``num_classes`` is the null label (see
    `dpimages.nets.unet.UNet`). The module's only parameters are the
    network's, so ``functional_call(denoiser, params, (x, sigma, labels))``
    works as the model of a per-example-gradient engine.
    """

    def __init__(self, net: nn.Module, sigma_data: float = SIGMA_DATA, p_mean: float = P_MEAN,
                 p_std: float = P_STD) -> None:
        super().__init__()
        if not sigma_data > 0 or not p_std > 0:
            raise InputError(f"sigma_data and p_std must be > 0, got {sigma_data}, {p_std}")
        self.net = net
        self.sigma_data = float(sigma_data)
        self.p_mean = float(p_mean)
        self.p_std = float(p_std)
        self.null_label = int(getattr(net, "null_label", 0))

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """D(x; sigma): x (B, C, H, W) noisy images, sigma (B,) noise levels, labels (B,) or None (null label)."""
        sigma = sigma.to(x.dtype).reshape(-1)
        c_skip, c_out, c_in, c_noise = (c.reshape(-1, 1, 1, 1) for c in edm_scalings(sigma, self.sigma_data))
        f = self.net(x * c_in, c_noise.reshape(-1), labels)
        return c_skip * x + c_out * f

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Alias of `forward`: the clean-image estimate D(x; sigma)."""
        return self(x, sigma, labels)

    # -- training -------------------------------------------------------------------------
    def loss(
        self, x: torch.Tensor, labels: torch.Tensor | None, sigma: torch.Tensor, noise: torch.Tensor
    ) -> torch.Tensor:
        """Per-example EDM loss (see `edm_loss`) with this module as the denoiser."""
        return edm_loss(self, x, labels, sigma, noise, self.sigma_data)

    def training_sigmas(self, shape: tuple[int, ...], generator: torch.Generator,
                        device: torch.device | str = "cpu") -> torch.Tensor:
        return training_sigmas(shape, generator, p_mean=self.p_mean, p_std=self.p_std, device=device)

    # -- sampling ----------------------------------------------------------------------------
    def guided(self, labels: torch.Tensor | None, guidance: float = 0.0) -> Denoiser:
        """A `Denoiser` (x, sigma) -> D for fixed `labels`, with classifier-free guidance weight `guidance`."""
        return guided_denoiser(self, labels, self.null_label, guidance)

    @torch.no_grad()
    def generate(
        self, labels: torch.Tensor | None, shape: tuple[int, int, int], *, steps: int = 18, sampler: str = "heun",
        guidance: float = 0.0, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
        generator: torch.Generator | None = None, n: int | None = None, **sampler_options: float,
    ) -> torch.Tensor:
        """New images (B, C, H, W) in about [-1, 1] for `labels` (B,) (or `n` unconditional ones) from pure noise."""
        if labels is None and n is None:
            raise InputError("generate needs labels or n")
        b = int(labels.shape[0]) if labels is not None else int(n)  # type: ignore[arg-type]
        dev = next(self.parameters()).device
        sigmas = karras_sigmas(steps, sigma_min, sigma_max, rho, device=dev)
        x = torch.randn((b, *shape), generator=generator).to(dev) * sigmas[0]
        return get_sampler(sampler)(self.guided(labels, guidance), x, sigmas, generator=generator, **sampler_options)

    @torch.no_grad()
    def vary(
        self, images: torch.Tensor, labels: torch.Tensor | None, sigma_start: float, *, steps: int = 18,
        sampler: str = "heun", guidance: float = 0.0, sigma_min: float = 0.002, rho: float = 7.0,
        generator: torch.Generator | None = None, **sampler_options: float,
    ) -> torch.Tensor:
        """SDEdit variations: add N(0, sigma_start^2) noise to `images` ([-1, 1]) and denoise back to 0.

        A larger `sigma_start` gives variations further from the input; `steps`
        solver steps go from `sigma_start` to `sigma_min` (then 0).
        """
        if not sigma_start > sigma_min:
            raise InputError(f"sigma_start must be > sigma_min = {sigma_min}, got {sigma_start}")
        if images.ndim != 4:
            raise InputError(f"images must have shape (B, C, H, W), got {tuple(images.shape)}")
        dev = next(self.parameters()).device
        sigmas = karras_sigmas(steps, sigma_min, sigma_start, rho, device=dev)
        noise = torch.randn(images.shape, generator=generator).to(dev)
        x = images.to(dev) + sigma_start * noise
        return get_sampler(sampler)(self.guided(labels, guidance), x, sigmas, generator=generator, **sampler_options)


def edm_loss(
    denoiser: Callable[..., torch.Tensor], x: torch.Tensor, labels: torch.Tensor | None, sigma: torch.Tensor,
    noise: torch.Tensor, sigma_data: float = SIGMA_DATA,
) -> torch.Tensor:
    """One EDM loss value per example, averaged over K noise draws (noise multiplicity).

    Args:
        denoiser: ``denoiser(x, sigma, labels) -> D`` (the module or its functional form).
        x: clean images (B, C, H, W) in [-1, 1].
        labels: (B,) or (B, K) int64 labels (the null label where dropped for CFG), or None.
        sigma: (B,) one noise level per example, or (B, K) K levels per example.
        noise: standard normal noise, (B, C, H, W) or (B, K, C, H, W) matching `sigma`.

    Returns:
        (B,): ``mean_k lambda(sigma_k) * mean_pixels (D(x + sigma_k n_k; sigma_k) - x)^2``.
        With DP-SGD, the gradient of each of these values is clipped as a
        whole, so one example contributes at most C whatever K is.
    """
    b = x.shape[0]
    if sigma.ndim == 1:
        sigma, noise = sigma.unsqueeze(1), noise.unsqueeze(1)
        labels = None if labels is None else labels.reshape(b, 1)
    if sigma.ndim != 2 or sigma.shape[0] != b or noise.shape != (b, sigma.shape[1], *x.shape[1:]):
        raise InputError(f"edm_loss: x {tuple(x.shape)} needs sigma (B,) or (B, K) and noise (B, K, C, H, W); "
                         f"got sigma {tuple(sigma.shape)}, noise {tuple(noise.shape)}")
    k = sigma.shape[1]
    xk = x.unsqueeze(1).expand(b, k, *x.shape[1:]).reshape(b * k, *x.shape[1:])
    sk = sigma.reshape(b * k)
    if labels is not None:
        labels = (labels.reshape(b, 1).expand(b, k) if labels.ndim == 1 or labels.shape[-1] == 1 else labels)
        labels = labels.reshape(b * k)
    noisy = xk + sk.reshape(-1, 1, 1, 1) * noise.reshape(b * k, *x.shape[1:])
    d = denoiser(noisy, sk, labels)
    per_draw = edm_loss_weight(sk, sigma_data) * (d - xk).pow(2).flatten(1).mean(dim=1)
    return per_draw.reshape(b, k).mean(dim=1)


def guided_denoiser(
    denoiser: Callable[..., torch.Tensor], labels: torch.Tensor | None, null_label: int, guidance: float = 0.0
) -> Denoiser:
    """Bind `labels`; with ``guidance != 0``: D = D(x|y) + guidance * (D(x|y) - D(x|null)) (one batched call)."""

    def fn(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if labels is None or guidance == 0.0:
            return denoiser(x, sigma, labels)
        null = torch.full_like(labels, null_label)
        both = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([labels, null]))
        cond, uncond = both.chunk(2)
        return cond + guidance * (cond - uncond)

    return fn


# -- schedule (pure) -----------------------------------------------------------------------------
def karras_sigmas(
    steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """EDM Eq. 5: `steps` levels from sigma_max to sigma_min, evenly spaced in sigma^(1/rho), then a final 0."""
    if int(steps) != steps or steps < 1:
        raise InputError(f"steps must be a positive integer, got {steps}")
    if not 0 < sigma_min < sigma_max:
        raise InputError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    if steps == 1:
        ramp = torch.zeros(1, dtype=torch.float64)
    else:
        ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sig = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sig, torch.zeros(1, dtype=torch.float64)]).to(device=device, dtype=torch.float32)


# -- samplers (one signature) -------------------------------------------------------------------
def _churn(x: torch.Tensor, sigma: torch.Tensor, n_steps: int, generator: torch.Generator | None, s_churn: float,
           s_tmin: float, s_tmax: float, s_noise: float) -> tuple[torch.Tensor, torch.Tensor]:
    """EDM Algorithm 2 lines 4-6: raise the noise level from sigma to sigma_hat = sigma (1 + gamma)."""
    gamma = min(s_churn / n_steps, math.sqrt(2.0) - 1.0) if s_tmin <= float(sigma) <= s_tmax else 0.0
    if gamma <= 0.0:
        return x, sigma
    sigma_hat = sigma * (1.0 + gamma)
    eps = torch.randn(x.shape, generator=generator).to(x.device, x.dtype) * s_noise
    return x + eps * torch.sqrt(sigma_hat**2 - sigma**2), sigma_hat


def _solve(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, generator: torch.Generator | None,
           progress: bool, second_order: bool, s_churn: float, s_tmin: float, s_tmax: float,
           s_noise: float) -> torch.Tensor:
    n = len(sigmas) - 1
    ones = x.new_ones(x.shape[0])
    for i in tqdm(range(n), disable=not progress, desc="sampling", leave=False):
        x, sigma = _churn(x, sigmas[i], n, generator, s_churn, s_tmin, s_tmax, s_noise)
        sigma_next = sigmas[i + 1]
        d = (x - denoiser(x, sigma * ones)) / sigma  # dx/dsigma of the probability-flow ODE (EDM Eq. 4)
        x_next = x + (sigma_next - sigma) * d
        if second_order and sigma_next > 0:  # Heun's correction (Algorithm 1 lines 9-11)
            d_next = (x_next - denoiser(x_next, sigma_next * ones)) / sigma_next
            x_next = x + (sigma_next - sigma) * 0.5 * (d + d_next)
        x = x_next
    return x


@torch.no_grad()
def sample_euler(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, generator: torch.Generator | None = None,
    progress: bool = False, s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"),
    s_noise: float = 1.0,
) -> torch.Tensor:
    """Euler steps of the probability-flow ODE (EDM Algorithm 1 without its 2nd-order correction).

    `x` is pure noise scaled by ``sigmas[0]`` (or a noised image for SDEdit);
    ``s_churn > 0`` adds EDM Algorithm 2's stochastic churn. One denoiser call per step.
    """
    return _solve(denoiser, x, sigmas, generator, progress, False, s_churn, s_tmin, s_tmax, s_noise)


@torch.no_grad()
def sample_heun(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, generator: torch.Generator | None = None,
    progress: bool = False, s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"),
    s_noise: float = 1.0,
) -> torch.Tensor:
    """EDM Algorithm 1 (deterministic Heun, 2nd order; the last step is Euler): 2N-1 denoiser calls.

    With ``s_churn > 0`` it is EDM Algorithm 2 (stochastic sampler).
    """
    return _solve(denoiser, x, sigmas, generator, progress, True, s_churn, s_tmin, s_tmax, s_noise)


@torch.no_grad()
def sample_stochastic(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, generator: torch.Generator | None = None,
    progress: bool = False, s_churn: float = 10.0, s_tmin: float = 0.05, s_tmax: float = 50.0,
    s_noise: float = 1.003,
) -> torch.Tensor:
    """EDM Algorithm 2 (stochastic Heun sampler) with churn on by default (EDM's ImageNet S_tmin/S_tmax/S_noise)."""
    return _solve(denoiser, x, sigmas, generator, progress, True, s_churn, s_tmin, s_tmax, s_noise)


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "euler": sample_euler,
    "heun": sample_heun,
    "stochastic": sample_stochastic,
}


def get_sampler(name: str) -> Callable[..., torch.Tensor]:
    if name not in SAMPLERS:
        raise InputError(f"sampler must be one of {', '.join(SAMPLERS)}, got {name!r}")
    return SAMPLERS[name]
