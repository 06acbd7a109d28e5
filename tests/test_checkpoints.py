"""Checkpoint interop: original layout in (all wrappers and formats), diffusers out and back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from dit_helpers import perturbed_tiny, single_thread  # noqa: F401 (autouse fixture)
from safetensors.torch import save_file

from pipeline.checkpoints import (
    EXPORT_NOTE_FILE,
    diffusers_config,
    export_diffusers,
    import_diffusers,
    load_original_state_dict,
    read_state_dict,
)
from pipeline.models import DiTConfig, HunYuanDiT
from pipeline.rope import rope_tables


def inputs(cfg: DiTConfig, size: int = 128, B: int = 2) -> dict:
    g = torch.Generator().manual_seed(1)
    m1 = torch.ones(B, cfg.text_len, dtype=torch.long)
    m1[0, 5:] = 0
    m5 = torch.ones(B, cfg.text_len_t5, dtype=torch.long)
    m5[1, 3:] = 0
    kw = dict(
        hidden_states=torch.randn(B, 4, size // 8, size // 8, generator=g),
        timestep=torch.tensor([10.0, 500.0]),
        encoder_hidden_states=torch.randn(B, cfg.text_len, cfg.text_states_dim, generator=g),
        text_embedding_mask=m1,
        encoder_hidden_states_t5=torch.randn(B, cfg.text_len_t5, cfg.text_states_dim_t5, generator=g),
        text_embedding_mask_t5=m5,
    )
    if cfg.use_style_cond:
        kw["image_meta_size"] = torch.tensor([[1024.0, 1024.0, 1024.0, 1024.0, 0.0, 0.0]] * B)
        kw["style"] = torch.zeros(B, dtype=torch.long)
    return kw


def ours(model: HunYuanDiT, kw: dict, size: int) -> torch.Tensor:
    cos, sin = rope_tables(size, size, model.config.head_dim)
    args = dict(kw)
    x, t = args.pop("hidden_states"), args.pop("timestep")
    with torch.no_grad():
        return model(x, t, **args, cos_cis_img=cos, sin_cis_img=sin)["x"]


@pytest.mark.parametrize("overrides", [{}, {"use_style_cond": True, "size_cond": True}])
def test_diffusers_export_same_output_and_round_trip(tmp_path: Path, overrides: dict) -> None:
    from diffusers import HunyuanDiT2DModel

    model = perturbed_tiny(**overrides)
    folder = export_diffusers(model, tmp_path / "dit")
    assert (folder / "config.json").is_file() and (folder / "diffusion_pytorch_model.safetensors").is_file()
    notes = json.loads((folder / EXPORT_NOTE_FILE).read_text())
    assert "endpoint=False" in notes["rope_note"] and notes["hydit_config"]["hidden_size"] == 64

    theirs = HunyuanDiT2DModel.from_pretrained(folder).eval()
    kw = inputs(model.config)
    cos, sin = rope_tables(128, 128, model.config.head_dim)
    with torch.no_grad():
        expected = theirs(**kw, image_rotary_emb=(cos, sin)).sample
    got = ours(model, kw, 128)
    assert got.abs().max() > 0.1
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    back = import_diffusers(folder)
    assert back.config == model.config
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_export_refuses_what_diffusers_cannot_express(tmp_path: Path) -> None:
    for overrides, match in [
        ({"norm": "rms"}, "norm='rms'"),
        ({"qk_norm": False}, "qk_norm=False"),
        ({"use_style_cond": True}, "use_style_cond_and_image_meta_size"),
    ]:
        with pytest.raises(ValueError, match=match):
            diffusers_config(DiTConfig.from_name("DiT-tiny/2", **overrides))
    with pytest.raises(ValueError, match="cannot export"):
        export_diffusers(perturbed_tiny(norm="rms"), tmp_path / "x")


@pytest.mark.parametrize("wrapper", ["bare", "module", "ema"])
def test_load_pt_wrappers(tmp_path: Path, wrapper: str) -> None:
    src = perturbed_tiny(seed=1)
    state = src.state_dict()
    obj = state if wrapper == "bare" else {wrapper: state, "steps": torch.tensor(7)}
    path = tmp_path / f"pytorch_model_{wrapper}.pt"
    torch.save(obj, path)
    dst = perturbed_tiny(seed=2)
    report = load_original_state_dict(dst, path)
    assert report == {"missing": [], "unexpected": []}
    for k, v in dst.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_key_picks_module_or_ema(tmp_path: Path) -> None:
    module, ema = perturbed_tiny(seed=1).state_dict(), perturbed_tiny(seed=2).state_dict()
    both, bare = tmp_path / "both.pt", tmp_path / "bare.pt"
    torch.save({"module": module, "ema": ema}, both)
    torch.save(module, bare)
    w = "blocks.0.attn1.Wqkv.weight"
    assert torch.equal(read_state_dict(both)[w], module[w])  # auto: "module" first, as the original resumes
    assert torch.equal(read_state_dict(both, key="ema")[w], ema[w])
    assert torch.equal(read_state_dict(both, key="module")[w], module[w])
    with pytest.raises(ValueError, match="no 'ema' state dict"):
        read_state_dict(bare, key="ema")
    with pytest.raises(ValueError, match="key='emma'"):
        read_state_dict(both, key="emma")


def test_load_safetensors_and_in_memory(tmp_path: Path) -> None:
    src = perturbed_tiny(seed=1)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    assert read_state_dict(path).keys() == src.state_dict().keys()
    dst = perturbed_tiny(seed=2)
    load_original_state_dict(dst, path)
    assert torch.equal(dst.text_embedding_padding, src.text_embedding_padding)
    dst2 = perturbed_tiny(seed=3)
    load_original_state_dict(dst2, {"module": src.state_dict()})
    assert torch.equal(dst2.blocks[5].skip_linear.weight, src.blocks[5].skip_linear.weight)


def test_missing_unexpected_and_shape_errors(tmp_path: Path) -> None:
    state = perturbed_tiny().state_dict()
    model = perturbed_tiny()
    broken = dict(state)
    del broken["blocks.3.attn2.kv_proj.weight"]
    broken["extra.thing"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing keys \['blocks.3.attn2.kv_proj.weight'\].*extra.thing"):
        load_original_state_dict(model, broken)
    report = load_original_state_dict(model, broken, strict=False)
    assert report == {"missing": ["blocks.3.attn2.kv_proj.weight"], "unexpected": ["extra.thing"]}
    v11 = perturbed_tiny(use_style_cond=True, size_cond=True).state_dict()
    with pytest.raises(ValueError, match="style_embedder"):
        load_original_state_dict(model, v11)
    bad = dict(state, text_embedding_padding=torch.zeros(3, 3))
    with pytest.raises(ValueError, match="text_embedding_padding"):
        load_original_state_dict(model, bad)


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    import argparse

    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": perturbed_tiny().state_dict(), "args": argparse.Namespace(lr=1e-4)}, path)  # like DeepSpeed
    with pytest.raises(ValueError, match="weights_only"):
        read_state_dict(path)
    with pytest.raises(FileNotFoundError):
        read_state_dict(tmp_path / "nope.pt")
    (tmp_path / "w.ckpt.json").write_text("{}")
    with pytest.raises(ValueError, match="suffix"):
        read_state_dict(tmp_path / "w.ckpt.json")
