"""Diffusion loss: golden parity with the original's training_losses, schedules, and each loss branch."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from dit_helpers import CASES, golden_model, single_thread  # noqa: F401 (autouse fixture)

from pipeline.diffusion import (
    GaussianDiffusion,
    add_offset_noise,
    create_diffusion,
    discretized_gaussian_log_likelihood,
    make_betas,
    normal_kl,
)


@pytest.mark.exact
@pytest.mark.parametrize("case", list(CASES))
def test_golden_training_losses(case: str) -> None:
    model, meta, data, kwargs = golden_model(case)
    d = meta["diffusion"]
    diffusion = create_diffusion(
        noise_schedule=d["noise_schedule"],
        predict_type=d["predict_type"],
        learn_sigma=d["learn_sigma"],
        beta_start=d["beta_start"],
        beta_end=d["beta_end"],
        mse_loss_weight_type=d["mse_loss_weight_type"],
        noise_offset=d["noise_offset"],
    )
    losses = diffusion.training_losses(model, data["x"], kwargs, t=data["loss_t"], noise=data["loss_noise"])
    for key in ("loss", "mse", "vb", "raw_loss"):
        assert losses[key].shape == (2,)
        torch.testing.assert_close(losses[key].detach(), data[f"losses.{key}"], rtol=1e-5, atol=1e-6, msg=key)
    losses["loss"].mean().backward()  # the loss is differentiable end to end
    assert model.final_layer.linear.weight.grad is not None


def test_betas_schedules() -> None:
    from diffusers import DDPMScheduler

    betas = make_betas("scaled_linear", 1000, 0.00085, 0.018)
    assert betas.dtype == np.float64 and betas.shape == (1000,)
    assert np.cumprod(1 - betas)[-1] == pytest.approx(4.853e-4, rel=1e-3)
    assert np.cumprod(1 - make_betas("scaled_linear", 1000, 0.00085, 0.02))[-1] == pytest.approx(2.300e-4, rel=1e-3)
    ref = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.018).betas.double().numpy()
    assert np.abs(betas - ref).max() < 1e-8
    np.testing.assert_allclose(make_betas("linear", 1000, 1e-4, 0.02), np.linspace(1e-4, 0.02, 1000))
    cos = make_betas("squaredcos_cap_v2", 1000)
    assert cos.max() == pytest.approx(0.999) and cos[0] < 1e-4
    with pytest.raises(ValueError, match="noise_schedule"):
        make_betas("cosine")


def _fake_model(out: torch.Tensor):
    def model(x, t, **kw):
        assert t.dtype == torch.float32  # the original hands the model float timesteps
        return {"x": out}

    return model


def test_decoder_nll_at_t0_and_kl_elsewhere() -> None:
    g = torch.Generator().manual_seed(0)
    diffusion = create_diffusion(beta_end=0.018)
    x0 = torch.randn(2, 4, 4, 4, generator=g).clamp(-0.9, 0.9)
    noise = torch.randn(2, 4, 4, 4, generator=g)
    out = torch.randn(2, 8, 4, 4, generator=g) * 0.1
    t = torch.tensor([0, 500])
    losses = diffusion.training_losses(_fake_model(out), x0, {}, t=t, noise=noise)
    # Recompute both branches by hand for each sample.
    x_t = diffusion.q_sample(x0, t, noise)
    mean_out, var_values = out[:, :4], out[:, 4:]
    pred_x0 = diffusion.predict_xstart(x_t, t, mean_out)
    model_mean, _ = diffusion.q_posterior_mean_variance(pred_x0, x_t, t)
    log_var = diffusion.learned_range_log_variance(var_values, t)
    true_mean, true_log_var = diffusion.q_posterior_mean_variance(x0, x_t, t)
    nll = -discretized_gaussian_log_likelihood(x0, means=model_mean, log_scales=0.5 * log_var)
    kl = normal_kl(true_mean, true_log_var, model_mean, log_var)
    assert losses["vb"][0].item() == pytest.approx(nll[0].mean().item() / math.log(2), rel=1e-5)
    assert losses["vb"][1].item() == pytest.approx(kl[1].mean().item() / math.log(2), rel=1e-5)
    # v target: sqrt(abar) eps - sqrt(1 - abar) x0
    abar = torch.tensor(diffusion.alphas_cumprod[[0, 500]], dtype=torch.float32).view(2, 1, 1, 1)
    v = abar.sqrt() * noise - (1 - abar).sqrt() * x0
    torch.testing.assert_close(losses["mse"], ((v - mean_out) ** 2).mean(dim=(1, 2, 3)))
    torch.testing.assert_close(losses["loss"], losses["mse"] + losses["vb"])


def test_vb_trains_only_the_variance_channels() -> None:
    diffusion = create_diffusion()
    out = torch.randn(2, 8, 4, 4, requires_grad=True)
    losses = diffusion.training_losses(_fake_model(out), torch.randn(2, 4, 4, 4), {}, t=torch.tensor([3, 900]))
    losses["vb"].sum().backward()
    assert torch.count_nonzero(out.grad[:, :4]) == 0 and torch.count_nonzero(out.grad[:, 4:]) > 0


@pytest.mark.parametrize("predict_type,target", [("epsilon", "noise"), ("sample", "x0")])
def test_other_prediction_targets(predict_type: str, target: str) -> None:
    diffusion = create_diffusion(predict_type=predict_type, learn_sigma=False)
    x0, noise = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    out = torch.zeros(2, 4, 4, 4)
    losses = diffusion.training_losses(_fake_model(out), x0, {}, t=torch.tensor([1, 2]), noise=noise)
    expected = (noise if target == "noise" else x0).square().mean(dim=(1, 2, 3))
    torch.testing.assert_close(losses["mse"], expected)
    torch.testing.assert_close(losses["loss"], expected)
    assert torch.count_nonzero(losses["vb"]) == 0


def test_min_snr_weight_keeps_the_originals_quirk() -> None:
    diffusion = create_diffusion(mse_loss_weight_type="min_snr_5", beta_end=0.018)
    t = torch.tensor([10, 999])
    abar = diffusion.alphas_cumprod[[10, 999]]
    snr = abar / (1 - abar)
    expected = np.minimum(snr, 5.0) / snr  # divided by snr even for v-prediction (paper: / (snr + 1))
    np.testing.assert_allclose(diffusion.mse_loss_weight(t).numpy(), expected, rtol=1e-5)
    with pytest.raises(ValueError, match="min_snr"):
        create_diffusion(mse_loss_weight_type="min_snr_x")
    with pytest.raises(ValueError, match="mse_loss_weight_type"):
        create_diffusion(mse_loss_weight_type="snr")


def test_noise_offset_is_channelwise_and_in_the_target() -> None:
    """Drawn noise gets the channel-wise offset (once); a given noise is final (stage 2 draws the offset per sample
    with add_offset_noise, so the trainer can pass its real noise_offset without the offset being added twice)."""
    diffusion = create_diffusion(predict_type="epsilon", learn_sigma=False, noise_offset=0.1)
    x0 = torch.zeros(2, 4, 4, 4)
    seen = {}

    def model(x, t, **kw):
        seen["x_t"] = x
        return {"x": torch.zeros_like(x)}

    t = torch.tensor([500, 500])
    losses = diffusion.training_losses(model, x0, {}, t=t, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    base = torch.randn(2, 4, 4, 4, generator=g)
    offset = torch.randn(2, 4, 1, 1, generator=g)
    noise = add_offset_noise(base, offset, 0.1)
    torch.testing.assert_close(noise - base, (0.1 * offset).expand_as(base))  # constant over H, W per channel
    # the target (the offset noise) equals x_t / sqrt(1 - abar)
    torch.testing.assert_close(seen["x_t"], noise * math.sqrt(1 - diffusion.alphas_cumprod[500]))
    torch.testing.assert_close(losses["mse"], noise.square().mean(dim=(1, 2, 3)))
    diffusion.training_losses(model, x0, {}, t=t, noise=torch.zeros(2, 4, 4, 4))
    assert not seen["x_t"].any(), "a given noise must be used as is"


def test_random_t_and_noise_are_reproducible_with_a_generator() -> None:
    diffusion = create_diffusion()
    out = torch.randn(3, 8, 4, 4)
    x0 = torch.randn(3, 4, 4, 4)
    a = diffusion.training_losses(_fake_model(out), x0, {}, generator=torch.Generator().manual_seed(1))
    b = diffusion.training_losses(_fake_model(out), x0, {}, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a["loss"], b["loss"])
    with pytest.raises(ValueError, match="integer tensor"):
        diffusion.training_losses(_fake_model(out), x0, {}, t=torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="predict_type"):
        GaussianDiffusion(make_betas("linear"), predict_type="x0")
