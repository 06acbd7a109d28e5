"""Validation images during training: written where promised, and invisible to training (losses, RNG, resume)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_stage2_common import read_metrics, tiny_overrides, write_synthetic_cache

from shared.config import load_config
from shared.prompts import prompt_file_path, write_prompt_file
from stage2_train.config import TrainConfig

VAE = Path(__file__).parent / "fixtures" / "cache_tiny_vae"
PROMPTS = ["first prompt", "second prompt", "third"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = write_synthetic_cache(tmp_path_factory.mktemp("valcache") / "cache", n=12)
    g = torch.Generator().manual_seed(0)
    n = len(PROMPTS)

    def fields(rows):
        clip_mask = torch.arange(8)[None] < torch.arange(2, 2 + rows)[:, None]
        t5_mask = torch.arange(12)[None] < torch.arange(3, 3 + rows)[:, None]
        return {
            "clip_states": torch.randn(rows, 8, 32, generator=g),
            "clip_mask": clip_mask,
            "t5_states": torch.randn(rows, 12, 48, generator=g).half(),
            "t5_mask": t5_mask,
        }

    manifest = json.loads((root / "manifest.json").read_text())
    write_prompt_file(
        prompt_file_path(root, "validation"),
        prompts=PROMPTS,
        negative_prompt="",
        embeds=fields(n),
        negative=fields(1),
        encoders_hash=manifest["encoders_hash"],
    )
    return root


def _cfg(cache: Path, run_dir: Path, **extra) -> TrainConfig:
    return load_config(TrainConfig, "configs/train/demo.yaml", tiny_overrides(cache, run_dir, **extra))


VAL_ON = {
    "validation.every": 2,
    "validation.vae": str(VAE),
    "validation.steps": 3,
    "validation.sizes": "[[32,32],[32,48]]",
}


def _train(cfg: TrainConfig) -> None:
    from stage2_train.trainer import Trainer

    torch.set_num_threads(1)
    Trainer(cfg).train()


def _losses(run_dir: Path) -> dict[int, tuple]:
    return {m["step"]: (m["loss"], m["mse"], m["vb"], m["grad_norm"]) for m in read_metrics(run_dir)}


@pytest.mark.exact
def test_validation_on_off_same_losses_and_exact_resume(cache, tmp_path):
    _train(_cfg(cache, tmp_path / "off", steps=4))
    _train(_cfg(cache, tmp_path / "on", steps=4, **VAL_ON))
    off, on = _losses(tmp_path / "off"), _losses(tmp_path / "on")
    assert sorted(off) == [1, 2, 3, 4] and on == off  # bit-identical losses and grad norms
    grids = sorted(p.name for p in (tmp_path / "on" / "validation").iterdir())
    assert grids == ["step_0000002.png", "step_0000004.png"]
    from PIL import Image

    img = Image.open(tmp_path / "on" / "validation" / "step_0000004.png")
    assert img.width >= 3 * 48 and img.height >= 2 * 32  # three prompts, two sizes stacked

    # stop after 2 steps (checkpoint), resume to 4, validation on throughout: same losses as the uninterrupted run
    run = tmp_path / "resumed"
    _train(_cfg(cache, run, steps=2, **VAL_ON))
    _train(_cfg(cache, run, steps=4, **{**VAL_ON, "checkpoint.resume": "auto"}))
    assert _losses(run) == on


def test_validation_touches_no_training_state(cache, tmp_path):
    """What on-vs-off losses alone cannot show (the data draws are seeded apart from the global RNG): one
    validation leaves the global RNG, the weights, the EMA, the training mode and the gradients as they were."""
    from stage2_train.trainer import Trainer

    torch.set_num_threads(1)
    t = Trainer(_cfg(cache, tmp_path / "run", steps=1, **{**VAL_ON, "validation.every": 1}))
    rng = torch.get_rng_state()
    weights = {k: v.clone() for k, v in t.inner.state_dict().items()}
    ema = t.ema.state_dict()
    seconds = t.validator.maybe_run(t, 1)
    assert seconds is not None and seconds > 0
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(weights[k], v) for k, v in t.inner.state_dict().items())
    assert all(torch.equal(ema[k], v) for k, v in t.ema.state_dict().items())
    assert t.inner.training and all(p.grad is None for p in t.inner.parameters())
    assert t.validator.use_ema  # weights: auto with ema.enable -> the EMA weights sample


def test_lora_run_validates_with_the_adapter_applied(cache, tmp_path):
    """training.parts=lora: the validation copy carries the same adapter, so it computes the trained model's output
    (a non-zero adapter changes it), and sampling runs."""
    from stage2_train.trainer import Trainer

    torch.set_num_threads(1)
    t = Trainer(
        _cfg(
            cache,
            tmp_path / "run",
            steps=1,
            **{**VAL_ON, "validation.every": 1, "training.parts": "lora", "lora.rank": 4, "ema.enable": False},
        )
    )
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a non-zero adapter (B starts at 0) and output layer (zero at init), as after training
        for name, p in t.inner.named_parameters():
            if ".lora_B." in name or name.startswith("final_layer.") or "default_modulation" in name:
                p.normal_(std=0.1, generator=g)
    assert t.validator.maybe_run(t, 1) is not None
    from test_model import tiny_inputs

    from pipeline.lora import base_state_dict
    from pipeline.models import HunYuanDiT

    kw = tiny_inputs(t.model_config, B=2, h=4, w=4)
    base = HunYuanDiT(t.model_config).eval()
    base.load_state_dict(base_state_dict(t.inner))
    t.inner.eval()
    with torch.no_grad():
        want = t.inner(**kw)["x"]
        assert torch.equal(t.validator.model(**kw)["x"], want)
        assert not torch.allclose(base(**kw)["x"], want)  # the adapter matters, and the copy applied it


def test_validation_config_errors_say_how_to_fix(cache, tmp_path):
    from stage2_train.config import validate_config

    with pytest.raises(ValueError, match="validation.vae"):
        validate_config(_cfg(cache, tmp_path, **{"validation.every": 2}))
    with pytest.raises(ValueError, match="validation.weights"):
        validate_config(_cfg(cache, tmp_path, **{**VAL_ON, "validation.weights": "ema", "ema.enable": False}))


@pytest.mark.slow
def test_fsdp2_two_ranks_validate_without_deadlock_and_fail_together(cache, tmp_path):
    """torchrun, 2 ranks on gloo, FSDP2 with EMA: validation gathers the sharded weights, writes its grids and the run
    finishes (no deadlock); a validation that fails on rank 0 (a size the sampler refuses) stops both ranks with a
    non-zero exit naming the step instead of leaving rank 1 in a collective. (On vs off losses: the in-process test
    above; a set-up failure on rank 0 is agreed on the same way, Validator.__init__.)"""
    import time

    from test_stage2_common import run_script, torchrun_cmd

    def torchrun(run: Path, **extra):
        over = tiny_overrides(cache, run, steps=4, **{"parallel.strategy": "fsdp2", **extra})
        return run_script(torchrun_cmd(*over), timeout=240)

    on = torchrun(tmp_path / "on", **VAL_ON)
    assert on.returncode == 0, on.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "on" / "validation").iterdir()) == [
        "step_0000002.png",
        "step_0000004.png",
    ]
    assert sorted(_losses(tmp_path / "on")) == [1, 2, 3, 4]
    t0 = time.monotonic()
    bad = torchrun(tmp_path / "bad", **{**VAL_ON, "validation.sizes": "[[40,40]]"})
    assert bad.returncode != 0 and "validation at step 2 failed" in bad.stdout + bad.stderr
    assert time.monotonic() - t0 < 200
