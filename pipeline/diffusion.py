"""Gaussian diffusion training loss of the original HunyuanDiT (``hydit/diffusion`` @ 368280ec), rewritten.

Only what training needs: the beta schedules (float64), ``q_sample``, the three prediction targets, the learned-range
variance, and ``training_losses``, which returns per-sample ``loss = mse + vb`` exactly as the original:

* ``mse``: weight * mean over (C, H, W) of (target - model_mean_output)^2;
* ``vb``: the VLB term in bits/dim computed with the model's mean output **detached** (it trains only the variance
  channels): KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0, the discretised-Gaussian decoder NLL at t = 0;
* ``raw_loss``: unweighted mse + vb, detached (for logging).

Per-timestep coefficients are looked up in float64 and then cast to float32, like the original.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

NOISE_SCHEDULES: tuple[str, ...] = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICT_TYPES: tuple[str, ...] = ("epsilon", "sample", "v_prediction")


def make_betas(
    schedule: str, num_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.02
) -> np.ndarray:
    """float64 betas of a named schedule (``scaled_linear`` is SD's: linear in sqrt(beta))."""
    if schedule == "linear":
        scale = 1000 / num_timesteps
        return np.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=np.float64)
    if schedule == "scaled_linear":
        return np.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=np.float64) ** 2
    if schedule == "squaredcos_cap_v2":

        def alpha_bar(s: float) -> float:
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

        return np.array(
            [
                min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), 0.999)
                for i in range(num_timesteps)
            ],
            dtype=np.float64,
        )
    raise ValueError(f"noise_schedule={schedule!r} is not supported; choose one of {NOISE_SCHEDULES}")


def _extract(arr: np.ndarray, t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """arr[t] as float32, broadcastable to ``shape`` (B, 1, 1, ...)."""
    out = torch.from_numpy(arr).to(t.device)[t].float()  # (B,)
    return out.view(-1, *([1] * (len(shape) - 1)))


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=list(range(1, x.ndim)))


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """log-likelihood (nats) of x under a Gaussian discretised to 8-bit bins on [-1, 1] (ADM's decoder)."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


class GaussianDiffusion:
    """Forward process and training loss; the model returns ``{"x": (B, 2C or C, H, W)}``."""

    def __init__(
        self,
        betas: np.ndarray,
        predict_type: str = "v_prediction",
        learn_sigma: bool = True,
        mse_loss_weight_type: str = "constant",
        noise_offset: float = 0.0,
    ) -> None:
        if predict_type not in PREDICT_TYPES:
            raise ValueError(f"predict_type={predict_type!r} is not supported; choose one of {PREDICT_TYPES}")
        if mse_loss_weight_type != "constant" and not mse_loss_weight_type.startswith("min_snr_"):
            raise ValueError(f"mse_loss_weight_type={mse_loss_weight_type!r}; use 'constant' or 'min_snr_<k>'")
        if mse_loss_weight_type.startswith("min_snr_"):
            try:
                self.min_snr_k: float | None = float(mse_loss_weight_type[len("min_snr_") :])
            except ValueError:
                raise ValueError(
                    f"mse_loss_weight_type={mse_loss_weight_type!r}: <k> in min_snr_<k> must be a number"
                ) from None
        else:
            self.min_snr_k = None
        if noise_offset < 0:
            raise ValueError(f"noise_offset={noise_offset} must be >= 0")
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must be a 1-D array in (0, 1]")
        self.predict_type = predict_type
        self.learn_sigma = learn_sigma
        self.mse_loss_weight_type = mse_loss_weight_type
        self.noise_offset = noise_offset
        self.num_timesteps = len(betas)

        self.betas = betas
        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        self.log_betas = np.log(betas)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The posterior variance is 0 at t = 0; its log is clipped by reusing the t = 1 value.
        self.posterior_log_variance_clipped = np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)

    # ----------------------------------------------------------------- forward process
    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise."""
        return (
            _extract(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
            + _extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise
        )

    def q_posterior_mean_variance(
        self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = (
            _extract(self.posterior_mean_coef1, t, x_t.shape) * x_start
            + _extract(self.posterior_mean_coef2, t, x_t.shape) * x_t
        )
        return mean, _extract(self.posterior_log_variance_clipped, t, x_t.shape)

    def predict_xstart(self, x_t: torch.Tensor, t: torch.Tensor, model_output: torch.Tensor) -> torch.Tensor:
        if self.predict_type == "sample":
            return model_output
        if self.predict_type == "epsilon":
            return (
                _extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
                - _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * model_output
            )
        return (
            _extract(self.sqrt_alphas_cumprod, t, x_t.shape) * x_t
            - _extract(self.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * model_output
        )

    def target(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """What the model's mean channels regress: noise, x_0, or v = sqrt(abar) noise - sqrt(1-abar) x_0."""
        if self.predict_type == "epsilon":
            return noise
        if self.predict_type == "sample":
            return x_start
        return (
            _extract(self.sqrt_alphas_cumprod, t, x_start.shape) * noise
            - _extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * x_start
        )

    def learned_range_log_variance(self, var_values: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Model outputs in [-1, 1] interpolate log-variance between the posterior's (−1) and beta_t (+1)."""
        min_log = _extract(self.posterior_log_variance_clipped, t, var_values.shape)
        max_log = _extract(self.log_betas, t, var_values.shape)
        frac = (var_values + 1) / 2
        return frac * max_log + (1 - frac) * min_log

    def vb_terms_bpd(
        self,
        model_output: torch.Tensor,
        var_values: torch.Tensor,
        x_start: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
    ) -> torch.Tensor:
        """Per-sample VLB term in bits/dim (decoder NLL at t == 0, KL otherwise); no clipping of x_0."""
        true_mean, true_log_var = self.q_posterior_mean_variance(x_start, x_t, t)
        pred_xstart = self.predict_xstart(x_t, t, model_output)
        model_mean, _ = self.q_posterior_mean_variance(pred_xstart, x_t, t)
        model_log_var = self.learned_range_log_variance(var_values, t)
        kl = mean_flat(normal_kl(true_mean, true_log_var, model_mean, model_log_var)) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x_start, means=model_mean, log_scales=0.5 * model_log_var)
        nll = mean_flat(nll) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def mse_loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        if self.min_snr_k is None:
            return torch.ones_like(t)
        alpha = _extract(self.sqrt_alphas_cumprod, t, t.shape)
        sigma = _extract(self.sqrt_one_minus_alphas_cumprod, t, t.shape)
        snr = (alpha / sigma) ** 2
        # The original divides by snr for every predict type (the Min-SNR paper's epsilon weight), also for
        # v-prediction where the paper would use min(snr, k) / (snr + 1). Kept for parity.
        return torch.clamp(snr, max=self.min_snr_k) / snr

    # ----------------------------------------------------------------- loss
    def training_losses(
        self,
        model: Callable[..., Any],
        x_start: torch.Tensor,
        model_kwargs: dict[str, Any] | None = None,
        t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-sample ``loss``, ``mse``, ``vb`` (zeros without learn_sigma), ``raw_loss``; t ~ U{0..T-1} if None."""
        model_kwargs = model_kwargs or {}
        B, C = x_start.shape[:2]
        device = x_start.device
        if t is None:
            t = torch.randint(0, self.num_timesteps, (B,), device=device, generator=generator)
        elif t.shape != (B,) or t.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"t must be an integer tensor of shape ({B},), got {t.dtype} {tuple(t.shape)}")
        t = t.long()
        if noise is None:  # a given noise is final (offset noise included, e.g. stage2_train.data's draws)
            noise = torch.randn(x_start.shape, device=device, dtype=x_start.dtype, generator=generator)
            if self.noise_offset > 0:
                offset = torch.randn(B, C, 1, 1, device=device, dtype=x_start.dtype, generator=generator)
                noise = add_offset_noise(noise, offset, self.noise_offset)
        x_t = self.q_sample(x_start, t, noise)

        # The original hands the model float timesteps (respace's _WrappedModel).
        out = model(x_t, t.float(), **model_kwargs)
        model_output = out["x"] if isinstance(out, dict) else out
        terms: dict[str, torch.Tensor] = {}
        if self.learn_sigma:
            if model_output.shape[1] != 2 * C:
                raise ValueError(f"learn_sigma needs {2 * C} output channels, the model gave {model_output.shape[1]}")
            model_output, var_values = torch.split(model_output, C, dim=1)
            # The VLB must not move the mean prediction: it only trains the variance channels.
            terms["vb"] = self.vb_terms_bpd(model_output.detach(), var_values, x_start, x_t, t)

        target = self.target(x_start, t, noise)
        raw_mse = mean_flat((target - model_output) ** 2)
        terms["mse"] = self.mse_loss_weight(t) * raw_mse
        if "vb" in terms:
            terms["loss"] = terms["mse"] + terms["vb"]
            terms["raw_loss"] = raw_mse.detach() + terms["vb"].detach()
        else:
            terms["loss"] = terms["mse"]
            terms["raw_loss"] = raw_mse.detach()
            terms["vb"] = torch.zeros_like(raw_mse)
        return terms


def add_offset_noise(noise: torch.Tensor, offset: torch.Tensor, strength: float) -> torch.Tensor:
    """Channel-wise offset noise (crosslabs.org/blog/diffusion-with-offset-noise), as the original's training_losses
    adds it: noise + strength * offset, offset (..., C, 1, 1) standard normal; also part of the target. The one
    implementation: training_losses uses it when it draws the noise, stage2_train.data when it draws per sample."""
    return noise + strength * offset if strength > 0 else noise


def create_diffusion(
    noise_schedule: str = "scaled_linear",
    predict_type: str = "v_prediction",
    learn_sigma: bool = True,
    beta_start: float = 0.00085,
    beta_end: float = 0.02,
    mse_loss_weight_type: str = "constant",
    noise_offset: float = 0.0,
    num_timesteps: int = 1000,
) -> GaussianDiffusion:
    """The original's ``create_diffusion`` (1000 steps, MSE + learned-range VLB); defaults = its CLI defaults."""
    betas = make_betas(noise_schedule, num_timesteps, beta_start, beta_end)
    return GaussianDiffusion(betas, predict_type, learn_sigma, mse_loss_weight_type, noise_offset)
