"""Stage-2 trainer: exact resume, SIGTERM, loss goes down, non-finite steps, precisions, user errors."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_stage2_common import (
    ROOT,
    read_metrics,
    sigkill_after_checkpoint,
    tiny_overrides,
    train_cmd,
    write_synthetic_cache,
)

from shared.config import ConfigError, load_config
from stage2_train.config import TrainConfig


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return write_synthetic_cache(tmp_path_factory.mktemp("s2cache") / "cache", n=12)


def _cfg(cache: Path, run_dir: Path, **extra) -> TrainConfig:
    return load_config(TrainConfig, "configs/train/demo.yaml", tiny_overrides(cache, run_dir, **extra))


def _losses(run_dir: Path) -> dict[int, float]:
    """step -> loss; a resumed run appends, so the last record of a step wins."""
    return {m["step"]: m["loss"] for m in read_metrics(run_dir)}


def _train_in_process(cfg: TrainConfig) -> None:
    from stage2_train.trainer import Trainer

    torch.set_num_threads(1)  # as OMP_NUM_THREADS=1 in the subprocess: same reduction order, same bits
    Trainer(cfg).train()


@pytest.mark.exact
def test_exact_resume_after_sigkill(cache, tmp_path):
    n = 4
    _train_in_process(_cfg(cache, tmp_path / "full", steps=2 * n))

    run = tmp_path / "killed"
    args = train_cmd(*tiny_overrides(cache, run, steps=2 * n, **{"checkpoint.every": n, "checkpoint.keep_last": 0}))
    sigkill_after_checkpoint(args, run, n)
    done = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert f"step_{2 * n:07d}" not in done

    _train_in_process(_cfg(cache, run, steps=2 * n, **{"checkpoint.resume": "auto"}))
    a, b = _losses(tmp_path / "full"), _losses(run)
    assert sorted(a) == sorted(b) == list(range(1, 2 * n + 1))
    assert [b[s] for s in range(n + 1, 2 * n + 1)] == [a[s] for s in range(n + 1, 2 * n + 1)]  # bit-identical
    from safetensors.torch import load_file

    wa = load_file(tmp_path / "full" / "checkpoints" / f"step_{2 * n:07d}" / "model.safetensors")
    wb = load_file(run / "checkpoints" / f"step_{2 * n:07d}" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(cache, tmp_path):
    import os

    run = tmp_path / "term"
    args = train_cmd(*tiny_overrides(cache, run, steps=10_000, **{"data.num_workers": 1}))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # own process group, signalled as a whole like torchrun and schedulers do: loader workers get SIGTERM too
    proc = subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while (not metrics.exists() or len(metrics.read_text().splitlines()) < 2) and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    assert "stopped by SIGTERM" in out
    saved = [p for p in (run / "checkpoints").iterdir() if p.name.startswith("step_")]
    assert len(saved) == 1
    state = json.loads((saved[0] / "trainer_state.json").read_text())
    assert 2 <= state["step"] < 10_000 and state["step"] == max(_losses(run))
    assert {"model.safetensors", "ema.safetensors", "optimizer.safetensors", "config.yaml"} <= {
        p.name for p in saved[0].iterdir()
    }


def test_loss_goes_down(cache, tmp_path):
    from stage2_train.trainer import Trainer

    torch.set_num_threads(1)
    cfg = _cfg(
        cache,
        tmp_path / "run",
        steps=40,
        **{"data.batch_size": 4, "optim.lr": 1e-3, "logging.every": 1, "data.uncond_p": 0.0, "data.uncond_p_t5": 0.0},
    )
    trainer = Trainer(cfg)
    trainer.train()
    records = read_metrics(tmp_path / "run")
    assert [m["step"] for m in records] == list(range(1, 41))
    for m in records:  # what the log line prints, as the trainer measured it
        assert all(np.isfinite(m[k]) for k in LOGGED), m
        assert m["grad_norm"] > 0 and 0 < m["lr"] <= 1e-3 and m["samples_per_s"] > 0 and m["memory_gib"] > 0
        assert 0 <= m["data_wait_share"] <= 1 and m["mse"] + m["vb"] == pytest.approx(m["loss"], rel=1e-5)
    losses = [m["loss"] for m in records]
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    print(f"\nmean loss steps 1-10: {first:.4f}, steps 31-40: {last:.4f} ({100 * (1 - last / first):.0f}% lower)")
    assert last < 0.7 * first


LOGGED = ("loss", "mse", "vb", "grad_norm", "lr", "samples_per_s", "data_wait_share", "memory_gib")


def test_log_line_carries_every_metric(tmp_path):
    import logging

    from stage2_train.metrics import MetricsLogger, logger

    values = dict(zip(LOGGED, (0.5, 0.375, 0.125, 1.25, 1e-4, 12.5, 0.015, 1.5)), skipped_steps=2)
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        metrics = MetricsLogger(tmp_path, enabled=True, tensorboard=False, progress_bar=False, total=10, initial=0)
        metrics.log(7, values)
        metrics.close()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert lines == [
        "step       7 | loss 0.5000 | mse 0.3750 | vb 0.1250 | grad_norm 1.250 | lr 0.0001 | "
        "12.50 samples/s | data_wait 1.5% | mem 1.50 GiB | skipped 2"
    ]
    assert read_metrics(tmp_path) == [{"step": 7, **values}]


class _Poisoned:
    """Makes every batch from step `start` on non-finite."""

    def __init__(self, source, start):
        self.source, self.start = source, start

    def batches(self, a, b):
        for i, batch in enumerate(self.source.batches(a, b), start=a):
            if i >= self.start:
                batch["x_start"] = batch["x_start"] * float("nan")
            yield batch


def test_non_finite_steps_are_skipped_then_stop(cache, tmp_path):
    from stage2_train.trainer import Trainer

    cfg = _cfg(cache, tmp_path / "run", steps=20, max_bad_steps=3)
    trainer = Trainer(cfg, batch_source_factory=lambda t: _Poisoned(t.cache_source(), 2))
    with pytest.raises(RuntimeError, match="non-finite"):
        trainer.train()
    assert trainer.skipped_steps == 4 and trainer.step == 5  # the 4th bad step in a row raised
    assert all(torch.isfinite(p).all() for p in trainer.inner.parameters()), "a NaN update was applied"


@pytest.mark.parametrize("mode", ["bf16", "fp16"])
def test_mixed_precision_modes_train(cache, tmp_path, mode):
    from stage2_train.trainer import Trainer

    trainer = Trainer(_cfg(cache, tmp_path / mode, steps=3, **{"precision.mode": mode}))
    trainer.train()
    losses = [m["loss"] for m in read_metrics(tmp_path / mode)]
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert (trainer.scaler is not None) == (mode == "fp16")


def test_grad_accum_and_warmup_schedule(cache, tmp_path):
    from stage2_train.trainer import Trainer

    cfg = _cfg(
        cache,
        tmp_path / "acc",
        steps=3,
        grad_accum=2,
        **{"schedule.warmup_steps": 2, "schedule.warmup_kind": "log", "optim.lr": 1e-3},
    )
    trainer = Trainer(cfg)
    trainer.train()
    rec = read_metrics(tmp_path / "acc")
    # DeepSpeed WarmupLR(log): min + (max - min) * ln(it + 1) / ln(warmup), then constant
    assert [round(r["lr"], 12) for r in rec] == [1e-6, round(1e-6 + (1e-3 - 1e-6) * np.log(2) / np.log(2), 12), 1e-3]
    assert trainer.schedule.step_count == 3


def test_user_errors_say_how_to_fix(cache, tmp_path):
    from stage2_train.trainer import Trainer

    with pytest.raises(ConfigError, match="precision.mode"):
        load_config(TrainConfig, "configs/train/demo.yaml", ["precision.mode=fp8"])
    with pytest.raises(ConfigError, match="unknown key optim.learning_rate"):
        load_config(TrainConfig, "configs/train/demo.yaml", ["optim.learning_rate=1"])
    with pytest.raises(ValueError, match=r"model\.clip_dim=64 but data\.cache=.* was encoded with clip_dim=32"):
        Trainer(_cfg(cache, tmp_path / "a", **{"model.clip_dim": 64}))
    with pytest.raises(ValueError, match=r"model\.overrides\.text_states_dim=64: .* now model\.clip_dim"):
        Trainer(_cfg(cache, tmp_path / "a2", **{"model.overrides.text_states_dim": 64}))
    with pytest.raises(FileNotFoundError, match="model.init_from"):
        Trainer(_cfg(cache, tmp_path / "b", **{"model.init_from": str(tmp_path / "nope.pt")}))
    with pytest.raises(FileNotFoundError, match="data.cache"):
        Trainer(_cfg(tmp_path / "no_cache", tmp_path / "c"))
    with pytest.raises(ValueError, match="checkpoint.resume"):
        Trainer(_cfg(cache, tmp_path / "d", **{"checkpoint.resume": str(tmp_path)}))
    with pytest.raises(ValueError, match="global_batch_size=6 is not divisible"):
        Trainer(_cfg(cache, tmp_path / "f", grad_accum=4, **{"data.global_batch_size": 6}))
    with pytest.raises(ValueError, match="uncond_p"):
        Trainer(_cfg(cache, tmp_path / "e", **{"data.uncond_p": 1.5}))


def test_the_manifest_supplies_the_model_geometry(tmp_path):
    """Text and latent sizes the preset does not have come from the cache; config.yaml records them; a set value
    that agrees is accepted."""
    from shared.inspection import write_synthetic_cache as write
    from shared.schema import CacheSpec
    from stage2_train.trainer import Trainer

    spec = CacheSpec(format="zarr", views=("plain",), clip_len=10, clip_dim=24, t5_len=14, t5_dim=40)
    write(tmp_path / "c", spec, n_samples=4, n_shards=1, buckets=((32, 32),), latents="structured")
    t = Trainer(_cfg(tmp_path / "c", tmp_path / "r", **{"model.t5_len": 14}))
    m = t.model_config
    assert (m.text_len, m.text_states_dim, m.text_len_t5, m.text_states_dim_t5, m.in_channels) == (10, 24, 14, 40, 4)
    saved = load_config(TrainConfig, tmp_path / "r" / "config.yaml").model
    assert (saved.clip_len, saved.clip_dim, saved.t5_len, saved.t5_dim, saved.latent_channels) == (10, 24, 14, 40, 4)
    t.close()


def test_encoder_identity_is_pinned_and_checked_on_resume(tmp_path):
    from shared.manifest import encoders_hash
    from stage2_train.trainer import Trainer

    enc_a, enc_b = {"vae": {"weights": {"a": "1"}}}, {"vae": {"weights": {"a": "2"}}}
    cache_a = write_synthetic_cache(tmp_path / "a", n=4, encoders=enc_a)
    cache_b = write_synthetic_cache(tmp_path / "b", n=4, encoders=enc_b)
    with pytest.raises(ValueError, match="encoders_hash"):
        Trainer(_cfg(cache_a, tmp_path / "pinned", **{"data.encoders_hash": encoders_hash(enc_b)}))
    Trainer(_cfg(cache_a, tmp_path / "pinned_ok", **{"data.encoders_hash": encoders_hash(enc_a)})).close()

    _train_in_process(_cfg(cache_a, tmp_path / "run", steps=1, **{"checkpoint.every": 1}))
    with pytest.raises(ValueError, match="trained on a cache made by other encoders"):
        Trainer(_cfg(cache_b, tmp_path / "run", steps=2, **{"checkpoint.resume": "auto"}))
    resumed = Trainer(_cfg(cache_a, tmp_path / "run", steps=2, **{"checkpoint.resume": "auto"}))
    assert resumed.step == 1
    resumed.close()


def test_cli_start_up_errors_exit_2_with_the_message(cache, tmp_path, capsys):
    from stage2_train.train import main

    assert main(["--config", "configs/train/demo.yaml", "precision.mode=fp8"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: precision.mode") and err.count("\n") == 1
    assert (
        main(
            [
                "--config",
                "configs/train/demo.yaml",
                *tiny_overrides(cache, tmp_path / "r"),
                "model.overrides.text_states_dim=64",
            ]
        )
        == 2
    )
    assert "model.overrides" in capsys.readouterr().err


def test_init_from_original_checkpoint_and_keep_last(cache, tmp_path):
    from safetensors.torch import load_file

    from pipeline.models import DiTConfig, HunYuanDiT
    from stage2_train.trainer import Trainer

    torch.manual_seed(123)
    src = HunYuanDiT(DiTConfig.from_name("DiT-tiny/2"))
    torch.save({"module": src.state_dict()}, tmp_path / "pytorch_model_module.pt")
    cfg = _cfg(
        cache,
        tmp_path / "run",
        steps=4,
        **{
            "model.init_from": str(tmp_path / "pytorch_model_module.pt"),
            "checkpoint.every": 1,
            "checkpoint.keep_last": 2,
        },
    )
    trainer = Trainer(cfg)
    for k, v in src.state_dict().items():
        assert torch.equal(trainer.inner.state_dict()[k], v)
    trainer.train()
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert kept == ["step_0000003", "step_0000004"]
    saved = load_file(tmp_path / "run" / "checkpoints" / "step_0000004" / "model.safetensors")
    assert set(saved) == set(src.state_dict())  # the original key layout
    with pytest.raises(ValueError, match=r"model\.init_key='ema'.*no 'ema' state dict"):
        Trainer(
            _cfg(
                cache,
                tmp_path / "ema",
                **{"model.init_from": str(tmp_path / "pytorch_model_module.pt"), "model.init_key": "ema"},
            )
        )


def test_presets_load_and_v12_is_the_released_recipe():
    from stage2_train.trainer import build_model_config

    demo = load_config(TrainConfig, "configs/train/demo.yaml")
    assert build_model_config(demo).hidden_size == 64
    cfg = load_config(TrainConfig, "configs/train/hunyuandit-v1.2.yaml")
    m = build_model_config(cfg)
    assert (m.hidden_size, m.depth, m.num_heads, m.learn_sigma, m.text_len, m.text_len_t5) == (
        1408,
        40,
        16,
        True,
        77,
        256,
    )
    d, o, s = cfg.diffusion, cfg.optim, cfg.schedule
    assert (d.noise_schedule, d.beta_start, d.beta_end, d.predict_type) == (
        "scaled_linear",
        0.00085,
        0.018,
        "v_prediction",
    )
    assert (o.lr, o.betas, o.eps, o.weight_decay, o.grad_clip) == (1e-4, [0.9, 0.999], 1e-8, 0.0, 1.0)
    assert (s.kind, s.warmup_steps, cfg.data.uncond_p, cfg.data.uncond_p_t5, cfg.data.batch_size) == (
        "constant",
        0,
        0.0,
        0.0,
        1,
    )
    assert cfg.model.init_from == "ckpts/t2i/model/pytorch_model_distill.pt" and cfg.precision.mode == "bf16"
