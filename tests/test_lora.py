"""LoRA (training.parts=lora): only the adapter trains, counts, official file format, merge/export, resume, torchrun."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from dit_helpers import CASES, golden_model, perturbed_tiny, single_thread  # noqa: F401 (autouse fixture)
from safetensors.torch import load_file, save_file
from test_stage2_common import (
    TINY_TEXT,
    read_metrics,
    run_script,
    sigkill_after_checkpoint,
    tiny_overrides,
    torchrun_cmd,
    train_cmd,
    write_synthetic_cache,
)

from pipeline import lora
from pipeline.models import DiTConfig, HunYuanDiT
from shared.config import load_config
from stage2_train.config import TrainConfig

FIXTURE = Path(__file__).parent / "fixtures" / "lora" / "comfyui_hydit_keys_tiny_d2_r4.json"
MODEL_TEXT = dict(
    text_len=TINY_TEXT["clip_len"],
    text_states_dim=TINY_TEXT["clip_dim"],
    text_len_t5=TINY_TEXT["t5_len"],
    text_states_dim_t5=TINY_TEXT["t5_dim"],
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A synthetic cache and a 'pretrained' base: LoRA on a from-scratch DiT gets no gradient (zero-init final
    layer), so the base is a perturbed tiny model saved in the original layout."""
    root = tmp_path_factory.mktemp("lora")
    cache = write_synthetic_cache(root / "cache", n=12)
    base = root / "base.safetensors"
    save_file(perturbed_tiny(seed=3, **MODEL_TEXT).state_dict(), str(base))
    return cache, base


def _lora_args(cache: Path, base: Path, run: Path, **extra) -> list[str]:
    opts = {"training.parts": "lora", "lora.rank": 4, "model.init_from": str(base), "optim.lr": 1e-3}
    opts.update(extra)
    return tiny_overrides(cache, run, **opts)


def _cfg(setup, run: Path, **extra) -> TrainConfig:
    return load_config(TrainConfig, "configs/train/demo.yaml", _lora_args(*setup, run, **extra))


def _losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(run_dir)}


def _tiny_inputs(cfg: DiTConfig, B: int = 2, size: int = 16, seed: int = 0) -> dict:
    from pipeline.rope import RopeCache

    g = torch.Generator().manual_seed(seed)
    cos, sin = RopeCache(cfg.head_dim, cfg.patch_size, cfg.rope_img).get(size * 8, size * 8, torch.device("cpu"))
    return dict(
        x=torch.randn(B, cfg.in_channels, size, size, generator=g),
        t=torch.tensor([10.0, 700.0])[:B],
        encoder_hidden_states=torch.randn(B, cfg.text_len, cfg.text_states_dim, generator=g),
        text_embedding_mask=torch.ones(B, cfg.text_len, dtype=torch.bool),
        encoder_hidden_states_t5=torch.randn(B, cfg.text_len_t5, cfg.text_states_dim_t5, generator=g),
        text_embedding_mask_t5=torch.ones(B, cfg.text_len_t5, dtype=torch.bool),
        cos_cis_img=cos,
        sin_cis_img=sin,
    )


def _randomise_adapter(model: torch.nn.Module, seed: int = 0) -> None:
    """A non-trivial adapter (B != 0) as training leaves it; the pooler's stays at B = 0 as training leaves it
    (its forward bypasses the adapter, see pipeline/lora.py)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if lora.is_adapter_key(name) and not name.startswith("pooler."):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


def _forward(model, kw) -> torch.Tensor:
    kw = dict(kw)
    with torch.no_grad():
        return model(kw.pop("x"), kw.pop("t"), **kw)["x"]


# ------------------------------------------------------------------------------------------------ training
def test_only_the_adapter_trains_and_counts(setup, tmp_path):
    from stage2_train.trainer import Trainer

    torch.set_num_threads(1)
    cfg = _cfg(setup, tmp_path / "run", steps=4, **{"checkpoint.every": 2})
    trainer = Trainer(cfg)
    assert trainer.ema is None  # demo.yaml enables EMA; LoRA turns it off as the original
    before = {k: v.clone() for k, v in trainer.inner.state_dict().items()}
    plain = HunYuanDiT(trainer.model_config)
    trainable = sum(p.numel() for p in trainer.inner.parameters() if p.requires_grad)
    assert trainable == lora.expected_adapter_params(plain, 4) > 0
    n_opt = sum(p.numel() for g in trainer.optimizer.param_groups for p in g["params"])
    assert n_opt == trainable  # no optimizer state for the base
    trainer.train()
    after = trainer.inner.state_dict()
    base_keys = [k for k in before if not lora.is_adapter_key(k)]
    assert all(torch.equal(before[k], after[k]) for k in base_keys)  # every base weight bit-identical
    moved = [k for k in before if lora.is_adapter_key(k) and not torch.equal(before[k], after[k])]
    expected_moved = [k for k in before if lora.is_adapter_key(k) and not k.startswith("pooler.")]
    assert sorted(moved) == sorted(expected_moved)
    # the adapter went out beside each checkpoint, in the official layout, and holds the trained values
    folders = sorted(p.name for p in (tmp_path / "run" / "adapters").iterdir())
    assert folders == ["step_0000002", "step_0000004"]
    saved = load_file(tmp_path / "run" / "adapters" / "step_0000004" / lora.ADAPTER_FILE)
    assert saved.keys() == lora.adapter_state_dict(trainer.inner).keys()
    k = "base_model.model.blocks.0.attn1.Wqkv.lora_B.weight"
    assert torch.equal(saved[k], after["blocks.0.attn1.Wqkv.lora_B.default.weight"])
    conf = json.loads((tmp_path / "run" / "adapters" / "step_0000004" / lora.CONFIG_FILE).read_text())
    assert (conf["r"], conf["lora_alpha"], conf["peft_type"]) == (4, 4, "LORA")
    assert sorted(conf["target_modules"]) == sorted(lora.DEFAULT_TARGETS)


def test_official_key_layout_matches_comfyui_mapping():
    fixture = json.loads(FIXTURE.read_text())
    model = HunYuanDiT(DiTConfig.from_name(fixture["model"]["preset"], depth=fixture["model"]["depth"]))
    plain_keys = set(model.state_dict())
    lora.inject_lora(model, lora.lora_config(fixture["rank"]))
    saved = lora.adapter_state_dict(model)
    assert {k: list(v.shape) for k, v in saved.items()} == fixture["keys"]  # exact names and shapes
    assert not any(k.endswith(".alpha") for k in saved)  # ComfyUI: no alpha key -> scale 1 = peft's alpha/r
    for k in saved:  # ComfyUI's rule: base_model.model.{x} -> diffusion_model.{x}.weight must be a real weight
        x = k[len("base_model.model.") :].rsplit(".lora_", 1)[0]
        assert f"{x}.weight" in plain_keys, k


def test_loss_goes_down(setup, tmp_path):
    """Training-loss windows are noisy (random timesteps), so the decrease is also shown on the deterministic
    evaluation loss (stage2_train.eval_loss: 12 samples x 16 fixed timesteps, fixed noise): two evaluations of the
    same weights are bit-identical, so the before/after difference is the adapter's. Measured: 0.5225 -> 0.3495
    (33.1% lower); the training-loss windows 0.524 -> 0.388 (26%)."""
    from stage2_train.eval_loss import eval_loss
    from stage2_train.trainer import Trainer

    torch.set_num_threads(1)
    cfg = _cfg(setup, tmp_path / "run", steps=30, **{"data.batch_size": 4, "optim.lr": 3e-3, "lora.rank": 8})
    trainer = Trainer(cfg)
    rng = torch.get_rng_state()
    before = eval_loss(trainer, timesteps=16)
    assert torch.equal(torch.get_rng_state(), rng)  # the eval draws nothing from the global RNG
    assert eval_loss(trainer, timesteps=16) == before  # deterministic: same weights, same number, bit for bit
    assert before["samples"] == 12 and trainer.model.training
    trainer.train()
    after = eval_loss(trainer, timesteps=16)
    losses = [m["loss"] for m in read_metrics(tmp_path / "run")]
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    print(
        f"\nLoRA mean loss steps 1-10: {first:.4f}, steps 21-30: {last:.4f} ({100 * (1 - last / first):.0f}% lower);"
        f" eval loss {before['loss']:.4f} -> {after['loss']:.4f} ({100 * (1 - after['loss'] / before['loss']):.1f}%"
        " lower)"
    )
    assert last < 0.8 * first
    assert after["loss"] < 0.85 * before["loss"]


def test_exact_resume_after_sigkill(setup, tmp_path):
    from stage2_train.trainer import Trainer

    torch.set_num_threads(1)
    n = 3
    Trainer(_cfg(setup, tmp_path / "full", steps=2 * n)).train()
    run = tmp_path / "killed"
    args = train_cmd(*_lora_args(*setup, run, steps=2 * n, **{"checkpoint.every": n, "checkpoint.keep_last": 0}))
    sigkill_after_checkpoint(args, run, n)
    Trainer(_cfg(setup, run, steps=2 * n, **{"checkpoint.resume": "auto"})).train()
    a, b = _losses(tmp_path / "full"), _losses(run)
    assert [b[s] for s in range(n + 1, 2 * n + 1)] == [a[s] for s in range(n + 1, 2 * n + 1)]  # bit-identical
    wa = load_file(tmp_path / "full" / "adapters" / f"step_{2 * n:07d}" / lora.ADAPTER_FILE)
    wb = load_file(run / "adapters" / f"step_{2 * n:07d}" / lora.ADAPTER_FILE)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_continue_from_an_existing_adapter(setup, tmp_path):
    from stage2_train.trainer import Trainer

    torch.set_num_threads(1)
    Trainer(_cfg(setup, tmp_path / "a", steps=2)).train()
    adapter = tmp_path / "a" / "adapters" / "step_0000002"
    t = Trainer(_cfg(setup, tmp_path / "b", steps=3, **{"lora.init_adapter": str(adapter)}))
    mine, theirs = lora.adapter_state_dict(t.inner), load_file(adapter / lora.ADAPTER_FILE)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    with pytest.raises(ValueError, match="rank, alpha, target_modules"):
        Trainer(_cfg(setup, tmp_path / "c", steps=3, **{"lora.init_adapter": str(adapter), "lora.rank": 8}))


def test_user_errors_name_the_field(setup, tmp_path):
    from stage2_train.trainer import Trainer

    with pytest.raises(ValueError, match="lora.alpha=8"):
        Trainer(_cfg(setup, tmp_path / "a", **{"lora.alpha": 8}))
    with pytest.raises(ValueError, match="lora.base_dtype=bfloat16 needs precision.mode=bf16"):
        Trainer(_cfg(setup, tmp_path / "b", **{"lora.base_dtype": "bfloat16"}))
    with pytest.raises(ValueError, match="matched no"):
        lora.inject_lora(perturbed_tiny(), lora.lora_config(4, target_modules=["nope"]))
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "adapter_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(FileNotFoundError, match="pickle"):
        lora.read_adapter(tmp_path / "bin")


def test_bf16_base_computes_as_fp32_base_under_bf16_autocast():
    """Autocast casts each fp32 linear weight to bf16 (round to nearest) in the op; storing it as bf16 rounds the same
    way once, so the two forwards run the same kernels on the same bits: exact equality."""
    kw = _tiny_inputs(perturbed_tiny().config)
    outs = []
    for dtype in (None, torch.bfloat16):
        model = perturbed_tiny(seed=1)
        lora.inject_lora(model, lora.lora_config(4))
        _randomise_adapter(model)
        if dtype is not None:
            assert lora.cast_base(model, dtype) > 0
            assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if lora.is_adapter_key(n))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs.append(_forward(model, kw).float())
    assert outs[0].abs().max() > 0.1
    assert torch.equal(outs[0], outs[1])


# ------------------------------------------------------------------------------------------------ merge / export
@pytest.mark.parametrize("case", list(CASES))
def test_merge_reload_and_diffusers_export_on_golden(case, tmp_path):
    from diffusers import HunyuanDiT2DModel

    from pipeline.checkpoints import export_diffusers

    base, meta, data, inputs = golden_model(case)
    kw = dict(inputs)
    x, t = data["x"], data["t"]
    with torch.no_grad():
        plain_out = base(x, t, **kw)["x"]
    lora.inject_lora(base, lora.lora_config(4))
    _randomise_adapter(base, seed=1)
    with torch.no_grad():
        adapted = base(x, t, **kw)["x"]
    assert (adapted - plain_out).abs().max() > 1e-3  # the adapter changes the output

    # saved and reloaded onto a fresh base with peft: the same computation, so the same bits
    folder = lora.save_adapter(tmp_path / "adapter", base)
    fresh = lora.apply_adapter(golden_model(case)[0], folder)
    with torch.no_grad():
        assert torch.equal(fresh(x, t, **kw)["x"], adapted)

    # merged: W + B @ A folded in fp32; the unmerged forward adds x A^T B^T instead, so the two differ by rounding
    # of the reassociated sum (~1e-7 relative per matmul through a few layers): 1e-5 relative.
    merged = lora.merge_lora(fresh)
    assert not lora.has_lora(merged) and merged.state_dict().keys() == golden_model(case)[0].state_dict().keys()
    with torch.no_grad():
        merged_out = merged(x, t, **kw)["x"]
    torch.testing.assert_close(merged_out, adapted, rtol=1e-5, atol=1e-5 * adapted.abs().max().item())

    # the merged model in diffusers (Wqkv split into to_q/to_k/to_v) gives the same output (export tolerance as in
    # tests/test_checkpoints.py: other attention kernels)
    out_dir = export_diffusers(merged, tmp_path / "diffusers")
    theirs = HunyuanDiT2DModel.from_pretrained(out_dir).eval()
    sd = load_file(out_dir / "diffusion_pytorch_model.safetensors")
    assert "blocks.0.attn1.to_q.weight" in sd and not any("Wqkv" in k for k in sd)
    d = merged.config.hidden_size
    qkv = merged.state_dict()["blocks.0.attn1.Wqkv.weight"]
    assert torch.equal(sd["blocks.0.attn1.to_k.weight"], qkv[d : 2 * d])
    dkw = dict(
        hidden_states=x,
        timestep=t,
        encoder_hidden_states=kw["encoder_hidden_states"],
        text_embedding_mask=kw["text_embedding_mask"],
        encoder_hidden_states_t5=kw["encoder_hidden_states_t5"],
        text_embedding_mask_t5=kw["text_embedding_mask_t5"],
        image_rotary_emb=(kw["cos_cis_img"], kw["sin_cis_img"]),
    )
    if merged.config.size_cond:
        dkw["image_meta_size"], dkw["style"] = kw["image_meta_size"], kw["style"]
    with torch.no_grad():
        theirs_out = theirs(**dkw).sample
    torch.testing.assert_close(theirs_out, merged_out, rtol=1e-5, atol=1e-5)


def test_merge_cli_writes_original_layout_and_diffusers(setup, tmp_path, capsys):
    """The CLI's main() with its argv, run in this process: `python -m stage2_train.merge_lora` runs exactly this
    main(), and a subprocess spends nearly all its time importing torch and peft (peft pulls in transformers,
    DTensor and dynamo: 41 s of a 70 s CLI run on the loaded 2-core box) for a merge of well under a second."""
    from stage2_train.merge_lora import main as merge_main
    from stage2_train.trainer import Trainer

    torch.set_num_threads(1)
    Trainer(_cfg(setup, tmp_path / "run", steps=2)).train()
    out = tmp_path / "merged"
    adapters = tmp_path / "run" / "adapters"
    common = ["--config", str(tmp_path / "run" / "config.yaml"), "--out", str(out)]
    assert merge_main([*common, "--adapter", str(adapters / "step_0000009")]) == 2  # a user error: exit 2, named
    assert "step_0000009" in capsys.readouterr().err and not out.exists()
    rc = merge_main([*common, "--adapter", str(adapters / "step_0000002"), "--diffusers"])
    assert rc == 0, capsys.readouterr().err[-3000:]
    merged = load_file(out / "model.safetensors")
    base = load_file(setup[1])
    assert merged.keys() == base.keys()
    changed = [k for k in base if not torch.equal(base[k], merged[k])]
    assert changed and all(k.endswith(".weight") and any(t in k for t in lora.DEFAULT_TARGETS) for k in changed)
    assert (out / "diffusers" / "config.json").is_file()


# ------------------------------------------------------------------------------------------------ torchrun
@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_ranks_with_lora(setup, tmp_path, strategy):
    run = tmp_path / "run"
    res = run_script(torchrun_cmd(*_lora_args(*setup, run, steps=3, **{"parallel.strategy": strategy})), timeout=300)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    saved = load_file(run / "adapters" / "step_0000003" / lora.ADAPTER_FILE)
    assert any(v.abs().max() > 0 for k, v in saved.items() if "lora_B" in k)
    state = load_file(run / "checkpoints" / "step_0000003" / "model.safetensors")
    base = load_file(setup[1])
    ckpt_base = {k.replace(".base_layer.", "."): v for k, v in state.items() if not lora.is_adapter_key(k)}
    assert ckpt_base.keys() == base.keys()
    assert all(torch.equal(ckpt_base[k], base[k]) for k in base)  # the base went through 2-rank training untouched


def test_porcelain_preset_is_the_original_lora_recipe():
    from stage2_train.config import validate_config
    from stage2_train.trainer import build_model_config

    cfg = load_config(TrainConfig, "configs/train/lora-porcelain.yaml")
    validate_config(cfg)
    m = build_model_config(cfg)
    assert (m.hidden_size, m.depth) == (1408, 40)
    assert (cfg.training.parts, cfg.lora.rank, sorted(cfg.lora.target_modules)) == (
        "lora",
        128,
        sorted(lora.DEFAULT_TARGETS),
    )
    assert (cfg.optim.lr, cfg.steps, cfg.data.batch_size, cfg.checkpoint.every, cfg.seed) == (1e-4, 2000, 2, 100, 999)
    assert (cfg.diffusion.beta_end, cfg.data.uncond_p, cfg.data.uncond_p_t5, cfg.data.random_flip) == (
        0.018,
        0.0,
        0.0,
        True,
    )
    assert cfg.parallel.activation_checkpointing and not cfg.ema.enable


def test_pooler_bypasses_its_adapter_as_the_original():
    """The original's AttentionPool passes q_proj.weight to F.multi_head_attention_forward, so a LoRA on pooler.q_proj
    (matched by the q_proj suffix) takes no part in the forward: no gradient reaches it; the blocks' adapters get
    one."""
    model = perturbed_tiny()
    lora.inject_lora(model, lora.lora_config(4))
    for p in model.parameters():
        p.requires_grad_(True)
    _randomise_adapter(model)
    with torch.no_grad():
        model.pooler.q_proj.lora_B["default"].weight.normal_()
    kw = _tiny_inputs(model.config)
    x, t = kw.pop("x"), kw.pop("t")
    model(x, t, **kw)["x"].square().mean().backward()
    assert model.pooler.q_proj.lora_A["default"].weight.grad is None
    assert model.pooler.q_proj.lora_B["default"].weight.grad is None
    assert model.pooler.q_proj.base_layer.weight.grad.abs().max() > 0
    assert model.blocks[0].attn1.Wqkv.lora_B["default"].weight.grad.abs().max() > 0
