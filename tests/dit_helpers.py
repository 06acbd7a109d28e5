"""Shared by the model, RoPE, diffusion and checkpoint tests: thread pinning, the golden cases, a perturbed tiny DiT."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.models import DiTConfig, HunYuanDiT

GOLDEN = Path(__file__).parent / "fixtures" / "golden"
# Golden case name -> the DiTConfig switches the original was built with.
CASES = {"v1.2": {}, "v1.1_style_size": {"use_style_cond": True, "size_cond": True}}


@pytest.fixture(autouse=True)
def single_thread():
    """Autouse where imported: these tensors are tiny, and on a shared machine OpenMP threads only contend."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def load_case(name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata from golden.json, tensors) of one golden case."""
    meta = json.loads((GOLDEN / "golden.json").read_text())["cases"][name]
    return meta, load_file(str(GOLDEN / meta["file"]))


def golden_model(name: str) -> tuple[HunYuanDiT, dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The case's model with the original's weights loaded strictly: (model, meta, tensors, forward kwargs)."""
    meta, data = load_case(name)
    mk = meta["model_kwargs"]
    cfg = DiTConfig.from_name(
        "DiT-tiny/2",
        hidden_size=mk["hidden_size"],
        depth=mk["depth"],
        num_heads=mk["num_heads"],
        mlp_ratio=mk["mlp_ratio"],
        patch_size=mk["patch_size"],
        in_channels=mk["in_channels"],
        **CASES[name],
    )
    model = HunYuanDiT(cfg)
    state = {k[len("state_dict.") :]: v for k, v in data.items() if k.startswith("state_dict.")}
    model.load_state_dict(state, strict=True)
    inputs = {k[len("inputs.") :]: v for k, v in data.items() if k.startswith("inputs.")}
    return model.eval(), meta, data, inputs


def perturbed_tiny(seed: int = 0, **overrides) -> HunYuanDiT:
    """Tiny model with every weight moved off its init, so zero-initialised paths carry signal."""
    torch.manual_seed(seed)
    model = HunYuanDiT(DiTConfig.from_name("DiT-tiny/2", **overrides))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model
