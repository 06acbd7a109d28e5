"""Checkpoint interop: the original HunyuanDiT key layout in, diffusers ``HunyuanDiT2DModel`` folders out (and back).

* ``load_original_state_dict``: released ``ckpts/t2i/model/pytorch_model_{ema,module,distill}.pt`` (bare state dicts),
  DeepSpeed-style dicts with a ``"module"`` or ``"ema"`` entry, ``.pt`` read with ``torch.load(weights_only=True)``
  (never a full unpickle), or ``.safetensors``.
* ``export_diffusers`` / ``import_diffusers``: a ``save_pretrained`` folder (safetensors) that diffusers'
  ``HunyuanDiT2DModel.from_pretrained`` reads, plus ``hydit_export.json`` with this project's ``DiTConfig`` and notes.

Two things diffusers does differently, recorded in ``hydit_export.json``:
1. RoPE: diffusers' ``get_2d_rotary_pos_embed`` emulates ``linspace(..., endpoint=False)`` as
   ``linspace(start, stop * (n - 1) / n, n)``, which equals the original only when ``start == 0``. For non-square
   buckets under base512/base1024 (crop offset ``start > 0``) its tables differ from the original's, which this
   project follows (``pipeline.rope``). Pass this project's tables via ``image_rotary_emb`` for identical outputs.
2. The image-size sinusoid is cast to the timestep dtype in diffusers; the original casts it to fp16 when trained
   with ``--use-fp16`` (``DiTConfig.size_cond_fp16``).
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from pipeline.models import DiTConfig, HunYuanDiT

EXPORT_NOTE_FILE = "hydit_export.json"
ROPE_NOTE = (
    "diffusers builds RoPE grids with linspace(start, stop*(n-1)/n, n) instead of the original's "
    "linspace(start, stop, n, endpoint=False); the two differ for non-square buckets whose base512/base1024 crop "
    "starts above 0. This project's RoPE (pipeline.rope) follows the original: pass its (cos, sin) tables to "
    "HunyuanDiT2DModel.forward(image_rotary_emb=...) to reproduce the training-time model exactly."
)


# --------------------------------------------------------------------------------------------- original layout in
def _unwrap_state_dict(obj: Any, source: str, key: str = "auto") -> dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping):
        raise ValueError(f"{source}: expected a state dict (a mapping of names to tensors), got {type(obj).__name__}")
    if key != "auto":
        if not isinstance(obj.get(key), Mapping):
            raise ValueError(
                f"{source}: has no {key!r} state dict (top-level entries {sorted(obj)[:5]}); "
                "use key 'auto' for a bare state dict"
            )
        return dict(obj[key])
    for wrapper in ("module", "ema"):  # DeepSpeed model_states / client_state["ema"], the original's resume order
        if isinstance(obj.get(wrapper), Mapping):
            return dict(obj[wrapper])
    non_tensors = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if non_tensors:
        raise ValueError(
            f"{source}: entries {non_tensors[:5]} are not tensors and there is no 'module' or 'ema' state dict inside"
        )
    return dict(obj)


def read_state_dict(path: str | os.PathLike, key: str = "auto") -> dict[str, torch.Tensor]:
    """Read a .pt/.pth/.bin (weights_only) or .safetensors file as a flat state dict.

    ``key``: "auto" unwraps a "module" entry, else an "ema" one, else takes the file as a bare state dict; "module"
    or "ema" takes that entry (a file may hold both).
    """
    if key not in ("auto", "module", "ema"):
        raise ValueError(f"key={key!r} is not supported; choose one of 'auto', 'module', 'ema'")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} does not exist")
    if path.suffix == ".safetensors":
        return _unwrap_state_dict(load_file(str(path)), str(path), key)
    if path.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            # e.g. a DeepSpeed *_model_states.pt also pickles argparse objects; never unpickle those blindly.
            raise ValueError(
                f"{path}: holds objects other than tensors and cannot be read with weights_only=True; extract the "
                f"state dict once in a trusted environment and save it as .safetensors ({e})"
            ) from e
        return _unwrap_state_dict(obj, str(path), key)
    raise ValueError(f"{path}: unknown checkpoint suffix {path.suffix!r}; use .pt/.pth/.bin or .safetensors")


def load_original_state_dict(
    model: HunYuanDiT, path_or_state_dict: str | os.PathLike | Mapping[str, Any], strict: bool = True
) -> dict[str, list[str]]:
    """Load weights in the original key layout into ``model``; return {"missing": [...], "unexpected": [...]}.

    With ``strict`` any missing or unexpected key raises a ValueError listing them; shapes must always match.
    """
    if isinstance(path_or_state_dict, Mapping):
        state = _unwrap_state_dict(path_or_state_dict, "state dict")
    else:
        state = read_state_dict(path_or_state_dict)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if strict and (missing or unexpected):
        hint = ""
        if "style_embedder.weight" in missing or "style_embedder.weight" in unexpected:
            hint = " (v1.1 weights have style_embedder and size conditioning: use_style_cond/size_cond)"
        raise ValueError(
            f"checkpoint does not match the model{hint}: missing keys {missing}, unexpected keys {unexpected}"
        )
    bad_shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if bad_shapes:
        raise ValueError("checkpoint shapes do not match the model config: " + "; ".join(bad_shapes))
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return {"missing": missing, "unexpected": unexpected}


# --------------------------------------------------------------------------------------------- diffusers mapping
def diffusers_config(cfg: DiTConfig) -> dict[str, Any]:
    """HunyuanDiT2DModel constructor arguments for ``cfg``; ValueError for what diffusers cannot express."""
    problems = []
    if cfg.norm != "layer":
        problems.append(f"norm={cfg.norm!r} (diffusers' HunyuanDiTBlock only has FP32 LayerNorm)")
    if not cfg.qk_norm:
        problems.append("qk_norm=False (diffusers' HunyuanDiTBlock always uses qk LayerNorm)")
    if cfg.use_style_cond != cfg.size_cond:
        problems.append(
            f"use_style_cond={cfg.use_style_cond} with size_cond={cfg.size_cond} (diffusers has one switch, "
            "use_style_cond_and_image_meta_size, for both)"
        )
    if cfg.pooler_num_heads != 8:
        problems.append(f"pooler_num_heads={cfg.pooler_num_heads} (diffusers hard-codes 8)")
    if problems:
        raise ValueError("cannot export to diffusers HunyuanDiT2DModel: " + "; ".join(problems))
    return dict(
        num_attention_heads=cfg.num_heads,
        attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_channels,
        patch_size=cfg.patch_size,
        activation_fn="gelu-approximate",
        sample_size=32,  # only sizes an unused position table (pos_embed_type=None); any input size works
        hidden_size=cfg.hidden_size,
        num_layers=cfg.depth,
        mlp_ratio=cfg.mlp_ratio,
        learn_sigma=cfg.learn_sigma,
        cross_attention_dim=cfg.text_states_dim,
        norm_type="layer_norm",
        cross_attention_dim_t5=cfg.text_states_dim_t5,
        pooled_projection_dim=cfg.pooler_out_dim,
        text_len=cfg.text_len,
        text_len_t5=cfg.text_len_t5,
        use_style_cond_and_image_meta_size=cfg.use_style_cond,
    )


# Whole-tensor renames (original -> diffusers); block keys are handled in _block_to_diffusers.
_TOP_LEVEL = {
    "text_embedding_padding": "text_embedding_padding",
    "mlp_t5.0": "text_embedder.linear_1",
    "mlp_t5.2": "text_embedder.linear_2",
    "pooler": "time_extra_emb.pooler",
    "x_embedder.proj": "pos_embed.proj",
    "t_embedder.mlp.0": "time_extra_emb.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "time_extra_emb.timestep_embedder.linear_2",
    "extra_embedder.0": "time_extra_emb.extra_embedder.linear_1",
    "extra_embedder.2": "time_extra_emb.extra_embedder.linear_2",
    "style_embedder": "time_extra_emb.style_embedder",
    "final_layer.linear": "proj_out",
}
# Inside a block. Note the swap: the original's norm3 feeds cross-attention and norm2 the MLP; diffusers names
# them the other way round.
_BLOCK = {
    "norm1": "norm1.norm",
    "default_modulation.1": "norm1.linear",
    "attn1.q_norm": "attn1.norm_q",
    "attn1.k_norm": "attn1.norm_k",
    "attn1.out_proj": "attn1.to_out.0",
    "attn2.q_proj": "attn2.to_q",
    "attn2.q_norm": "attn2.norm_q",
    "attn2.k_norm": "attn2.norm_k",
    "attn2.out_proj": "attn2.to_out.0",
    "norm3": "norm2",
    "norm2": "norm3",
    "mlp.fc1": "ff.net.0.proj",
    "mlp.fc2": "ff.net.2",
    "skip_norm": "skip_norm",
    "skip_linear": "skip_linear",
}
# Fused in the original, split in diffusers: (original module, diffusers modules in output-row order).
_SPLIT = {"attn1.Wqkv": ("attn1.to_q", "attn1.to_k", "attn1.to_v"), "attn2.kv_proj": ("attn2.to_k", "attn2.to_v")}


def _rename(name: str, table: Mapping[str, str]) -> str | None:
    for src, dst in table.items():
        if name == src or name.startswith(src + "."):
            return dst + name[len(src) :]
    return None


def to_diffusers_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original keys -> HunyuanDiT2DModel keys (splitting fused projections, swapping the final shift/scale)."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name.startswith("final_layer.adaLN_modulation.1."):
            shift, scale = tensor.chunk(2, dim=0)  # original: shift first; AdaLayerNormContinuous: scale first
            out["norm_out.linear." + name.rsplit(".", 1)[1]] = torch.cat([scale, shift], dim=0)
            continue
        if name.startswith("blocks."):
            _, idx, rest = name.split(".", 2)
            prefix = f"blocks.{idx}."
            module, param = rest.rsplit(".", 1)
            if module in _SPLIT:
                for target, part in zip(_SPLIT[module], tensor.chunk(len(_SPLIT[module]), dim=0)):
                    out[f"{prefix}{target}.{param}"] = part.clone()
                continue
            new = _rename(rest, _BLOCK)
            if new is None:
                raise ValueError(f"no diffusers name for block parameter {name!r}")
            out[prefix + new] = tensor
            continue
        new = _rename(name, _TOP_LEVEL)
        if new is None:
            raise ValueError(f"no diffusers name for parameter {name!r}")
        out[new] = tensor
    return out


def from_diffusers_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HunyuanDiT2DModel keys -> original keys (fusing q/k/v and k/v, swapping scale/shift back)."""
    inv_top = {v: k for k, v in _TOP_LEVEL.items()}
    inv_block = {v: k for k, v in _BLOCK.items()}
    split_parts = {part: (fused, i) for fused, parts in _SPLIT.items() for i, part in enumerate(parts)}
    out: dict[str, torch.Tensor] = {}
    pending: dict[str, dict[int, torch.Tensor]] = {}
    for name, tensor in state.items():
        if name.startswith("norm_out.linear."):
            scale, shift = tensor.chunk(2, dim=0)
            out["final_layer.adaLN_modulation.1." + name.rsplit(".", 1)[1]] = torch.cat([shift, scale], dim=0)
            continue
        if name.startswith("blocks."):
            _, idx, rest = name.split(".", 2)
            module, param = rest.rsplit(".", 1)
            if module in split_parts:
                fused, i = split_parts[module]
                pending.setdefault(f"blocks.{idx}.{fused}.{param}", {})[i] = tensor
                continue
            new = _rename(rest, inv_block)
            if new is None:
                raise ValueError(f"unexpected diffusers block parameter {name!r}")
            out[f"blocks.{idx}.{new}"] = tensor
            continue
        new = _rename(name, inv_top)
        if new is None:
            raise ValueError(f"unexpected diffusers parameter {name!r}")
        out[new] = tensor
    for fused_name, parts in pending.items():
        module = fused_name.split(".", 2)[2].rsplit(".", 1)[0]
        n = len(_SPLIT[module])
        if sorted(parts) != list(range(n)):
            raise ValueError(f"diffusers weights lack some of the projections fused into {fused_name!r}")
        out[fused_name] = torch.cat([parts[i] for i in range(n)], dim=0)
    return out


def export_diffusers(model: HunYuanDiT, out_dir: str | os.PathLike) -> Path:
    """Write ``model`` as a diffusers HunyuanDiT2DModel folder (config.json + safetensors) and the notes file."""
    from diffusers import HunyuanDiT2DModel  # lazy: diffusers costs seconds to import; only the export needs it

    cfg = model.config
    dconfig = diffusers_config(cfg)
    out_dir = Path(out_dir)
    with torch.device("meta"):  # no second random init of a 1.5B model: the weights are assigned below
        target = HunyuanDiT2DModel(**dconfig)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    target.load_state_dict(to_diffusers_state_dict(state), strict=True, assign=True)
    target.save_pretrained(out_dir, safe_serialization=True)
    notes = {
        "hydit_config": cfg.to_dict(),
        "rope_note": ROPE_NOTE,
        "size_cond_note": (
            "this model casts the image-size sinusoid to fp16 (size_cond_fp16=True); diffusers casts it to the "
            "timestep dtype instead"
            if cfg.size_cond and cfg.size_cond_fp16
            else None
        ),
        "attn_backend_note": "diffusers uses its own attention processors; attn_backend is not exported",
    }
    (out_dir / EXPORT_NOTE_FILE).write_text(json.dumps(notes, indent=2) + "\n")
    return out_dir


def _read_diffusers_weights(folder: Path) -> dict[str, torch.Tensor]:
    single = folder / "diffusion_pytorch_model.safetensors"
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if single.is_file():
        return load_file(str(single))
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(str(folder / shard)))
        return state
    raise FileNotFoundError(f"{folder}: no diffusion_pytorch_model.safetensors (or its .index.json) found")


def import_diffusers(folder: str | os.PathLike, **config_overrides: Any) -> HunYuanDiT:
    """Build a HunYuanDiT from a diffusers HunyuanDiT2DModel folder (safetensors weights only)."""
    folder = Path(folder)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder}: no config.json; expected a HunyuanDiT2DModel save_pretrained folder")
    dc = json.loads(config_file.read_text())
    if dc.get("_class_name", "HunyuanDiT2DModel") != "HunyuanDiT2DModel":
        raise ValueError(f"{config_file}: _class_name is {dc.get('_class_name')!r}, expected 'HunyuanDiT2DModel'")
    heads, head_dim = dc.get("num_attention_heads", 16), dc.get("attention_head_dim", 88)
    if dc.get("hidden_size", 1152) != heads * head_dim:
        raise ValueError(
            f"{config_file}: hidden_size {dc.get('hidden_size')} != num_attention_heads*attention_head_dim "
            f"({heads}*{head_dim}); such a model has no HunYuanDiT equivalent"
        )
    if dc.get("activation_fn", "gelu-approximate") != "gelu-approximate":
        raise ValueError(f"{config_file}: activation_fn {dc.get('activation_fn')!r}; HunYuanDiT uses gelu-approximate")
    style_size = bool(dc.get("use_style_cond_and_image_meta_size", True))
    fields: dict[str, Any] = dict(
        hidden_size=heads * head_dim,
        depth=dc.get("num_layers", 28),
        num_heads=heads,
        mlp_ratio=dc.get("mlp_ratio", 4.0),
        patch_size=dc["patch_size"],
        in_channels=dc["in_channels"],
        learn_sigma=dc.get("learn_sigma", True),
        text_states_dim=dc.get("cross_attention_dim", 1024),
        text_len=dc.get("text_len", 77),
        text_states_dim_t5=dc.get("cross_attention_dim_t5", 2048),
        text_len_t5=dc.get("text_len_t5", 256),
        use_style_cond=style_size,
        size_cond=style_size,
        pooler_out_dim=dc.get("pooled_projection_dim", 1024),
    )
    notes_file = folder / EXPORT_NOTE_FILE
    if notes_file.is_file():
        # Keep what diffusers cannot hold (rope_img, attn_backend, size_cond_fp16) from our own export.
        saved = json.loads(notes_file.read_text()).get("hydit_config", {})
        for key in ("rope_img", "attn_backend", "size_cond_fp16"):
            if key in saved:
                fields[key] = saved[key]
    fields.update(config_overrides)
    model = HunYuanDiT(DiTConfig(**fields))
    load_original_state_dict(model, from_diffusers_state_dict(_read_diffusers_weights(folder)), strict=True)
    return model
