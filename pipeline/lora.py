"""LoRA on the HunyuanDiT with peft (the original's ``--training-parts lora``), in the official adapter format.

The adapter is injected in place (``peft.inject_adapter_in_model``), so the model stays a ``HunYuanDiT``: the
trainer's parallelism (activation checkpointing and FSDP2 per block, DDP) applies unchanged. A LoRA'd linear keeps
its name; its base weight becomes ``<name>.base_layer.weight`` and the adapter ``<name>.lora_A.default.weight`` /
``<name>.lora_B.default.weight`` in ``model.state_dict()``.

The file format is the one the original writes with ``PeftModel.save_pretrained`` and its ``lora/merge.py`` and
ComfyUI read (comfy/lora.py maps ``base_model.model.{key}`` for HunyuanDiT, where key is the original state-dict name
without ``.weight``)::

    <folder>/adapter_model.safetensors   base_model.model.blocks.0.attn1.Wqkv.lora_A.weight  (r, D)
                                         base_model.model.blocks.0.attn1.Wqkv.lora_B.weight  (3D, r)  ...
    <folder>/adapter_config.json         peft's LoraConfig (r, lora_alpha, target_modules, ...)

The file holds no ``.alpha`` key, so ComfyUI applies ``B @ A`` with scale 1, while peft scales by
``lora_alpha / r``. The two agree only when ``lora_alpha == r`` (the original's choice, ``lora_alpha=args.rank``),
so any other alpha is refused rather than written into a file that ComfyUI would apply at the wrong strength.

``pooler.q_proj`` matches the target ``q_proj`` (peft matches by suffix), so it is adapted and saved, as in the
original. The original's pooler reads ``q_proj.weight`` directly (``F.multi_head_attention_forward``), bypassing the
LoRA layer, so that adapter gets no gradient there and stays at its init (B = 0). Ours does the same
(``AttentionPool`` calls ``F.linear`` on the weight), and its adapter is marked frozen so DDP waits for no gradient
of it and AdamW holds no state for it. Merging applies it (B @ A = 0 for every adapter this project or the original
trains), as the original's ``merge_and_unload`` does.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

DEFAULT_TARGETS = ("Wqkv", "q_proj", "kv_proj", "out_proj")
"""The original's ``--target-modules`` default (hydit/config.py)."""
ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
PREFIX = "base_model.model."
"""What ``PeftModel`` puts before the wrapped model's names; the official files carry it."""
ADAPTER_NAME = "default"
UNUSED_IN_FORWARD = ("pooler.q_proj",)
"""Adapted modules whose forward reads ``.weight`` directly (as the original), so their adapter never trains."""


def lora_config(
    rank: int, alpha: float | None = None, dropout: float = 0.0, target_modules: Sequence[str] = DEFAULT_TARGETS
):
    """peft LoraConfig of the original's LoRA (``lora_alpha = rank``); ValueError on what the format cannot hold."""
    from peft import LoraConfig  # lazy: peft costs seconds to import; full-model training never needs it

    alpha = rank if alpha is None or alpha == 0 else alpha
    if rank < 1:
        raise ValueError(f"lora.rank={rank} is invalid: must be >= 1 (the original's --rank, 64 by default)")
    if alpha != rank:
        raise ValueError(
            f"lora.alpha={alpha} is invalid with lora.rank={rank}: the official adapter file has no alpha key, so "
            "ComfyUI applies it with scale 1 while peft scales by alpha/rank; use alpha = rank (the original's "
            "choice) or leave alpha unset"
        )
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"lora.dropout={dropout} is invalid: must be in [0, 1)")
    if not target_modules:
        raise ValueError(
            "lora.target_modules is empty: give module name suffixes, e.g. [Wqkv, q_proj, kv_proj, out_proj]"
        )
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules), bias="none")


def check_config(config) -> None:
    """Refuse adapter configs this project cannot train or write faithfully (alpha != r, DoRA, rsLoRA)."""
    if getattr(config, "peft_type", None) is None or str(config.peft_type).split(".")[-1] != "LORA":
        raise ValueError(f"adapter is a {config.peft_type} adapter; only LoRA is supported")
    if config.lora_alpha != config.r or getattr(config, "use_rslora", False):
        raise ValueError(
            f"adapter has r={config.r}, lora_alpha={config.lora_alpha}, use_rslora="
            f"{getattr(config, 'use_rslora', False)}: only lora_alpha == r (scale 1, what ComfyUI "
            "applies to the official format) is supported"
        )
    if getattr(config, "use_dora", False):
        raise ValueError("adapter uses DoRA (use_dora=true); only plain LoRA is supported")


def inject_lora(model: nn.Module, config) -> nn.Module:
    """Add the adapter in place, freeze every base weight; returns the same module."""
    from peft import inject_adapter_in_model  # lazy: peft, see lora_config

    check_config(config)
    try:
        inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    except ValueError as err:  # peft's "Target modules {...} not found in the base model"
        raise ValueError(
            f"lora.target_modules={sorted(config.target_modules)} matched no linear layer of the DiT "
            f"({err}); the original's are {list(DEFAULT_TARGETS)}"
        ) from None
    for name, p in model.named_parameters():
        p.requires_grad_(is_adapter_key(name) and not _unused(name))
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"lora.target_modules={list(config.target_modules)} matched no trainable linear layer")
    return model


def _unused(name: str) -> bool:
    return any(name.startswith(m + ".") for m in UNUSED_IN_FORWARD)


def is_adapter_key(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def lora_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from peft.tuners.lora import LoraLayer  # lazy: peft, see lora_config

    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def has_lora(model: nn.Module) -> bool:
    return bool(lora_modules(model))


def expected_adapter_params(
    model: nn.Module, rank: int, targets: Iterable[str] = DEFAULT_TARGETS, *, trainable_only: bool = True
) -> int:
    """r * (in + out) summed over the plain model's ``nn.Linear`` whose name ends with a target (peft's rule)."""
    targets = tuple(targets)
    total = 0
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            if trainable_only and name in UNUSED_IN_FORWARD:
                continue
            total += rank * (m.in_features + m.out_features)
    return total


KEEP_FP32 = ("pooler.",)
"""Modules whose weights enter einsums and additions directly (AttentionPool), where autocast would not round
them as a linear layer does: kept fp32 so a bf16 base computes exactly as the fp32 one (58 MB for DiT-g/2)."""


def cast_base(model: nn.Module, dtype: torch.dtype) -> int:
    """Hold the frozen weights of linear/conv layers in ``dtype`` (bf16 on GPU); norms, embeddings and the adapter
    stay fp32. Under bf16 autocast each linear casts its fp32 weight to bf16 anyway, so the forward is unchanged.
    Returns the number of elements cast."""
    n = 0
    for mname, m in model.named_modules():
        if not isinstance(m, (nn.Linear, nn.Conv2d)) or is_adapter_key(mname + "."):  # lora_A/B are Linears too
            continue
        if mname.startswith(KEEP_FP32):
            continue
        for p in m.parameters(recurse=False):
            assert not p.requires_grad, f"{mname} is trainable: cast_base is for LoRA's frozen base only"
            p.data = p.data.to(dtype)
            n += p.numel()
    return n


# ------------------------------------------------------------------------------------------------ the file format
def adapter_state_dict(model: nn.Module, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The adapter in the official layout: ``base_model.model.<module>.lora_{A,B}.weight`` (CPU, contiguous).

    ``state`` is the model's full state dict when already gathered (FSDP2); else ``model.state_dict()``."""
    from peft import get_peft_model_state_dict  # lazy: peft, see lora_config

    sd = get_peft_model_state_dict(model, state_dict=state, adapter_name=ADAPTER_NAME)
    return {PREFIX + k: v.detach().cpu().contiguous() for k, v in sd.items()}


def adapter_config(model: nn.Module):
    return model.peft_config[ADAPTER_NAME]


def save_adapter(
    folder: str | os.PathLike,
    model: nn.Module,
    state: dict[str, torch.Tensor] | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write ``adapter_model.safetensors`` + ``adapter_config.json`` atomically (temp folder, then rename)."""
    folder = Path(folder)
    tmp = folder.with_name(f".tmp-{folder.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = adapter_state_dict(model, state)
    save_file(
        {k: v.float() if v.dtype != torch.float32 else v for k, v in tensors.items()},
        str(tmp / ADAPTER_FILE),
        {"format": "pt", **(metadata or {})},
    )
    config = adapter_config(model).to_dict()
    config["target_modules"] = sorted(config["target_modules"])
    config["peft_type"] = "LORA"
    (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder


def read_adapter(path: str | os.PathLike):
    """(LoraConfig, official-layout tensors) from an adapter folder (or its safetensors file, config beside it)."""
    from peft import LoraConfig  # lazy: peft, see lora_config

    path = Path(path)
    folder, weights = (path, path / ADAPTER_FILE) if path.is_dir() else (path.parent, path)
    if not weights.is_file():
        bins = sorted(p.name for p in folder.glob("adapter_model*.bin")) if folder.is_dir() else []
        hint = f"; {bins} is a pickle, which this project never loads: convert it to safetensors first" if bins else ""
        raise FileNotFoundError(f"{weights}: no LoRA adapter (expected {ADAPTER_FILE} + {CONFIG_FILE}){hint}")
    if not (folder / CONFIG_FILE).is_file():
        raise FileNotFoundError(
            f"{folder / CONFIG_FILE}: missing; an adapter folder holds {ADAPTER_FILE} and "
            f"{CONFIG_FILE} (peft's save_pretrained layout)"
        )
    config = LoraConfig.from_pretrained(str(folder))
    check_config(config)
    try:
        tensors = load_file(str(weights))
    except Exception as err:  # safetensors raises its own error types for truncated/damaged files
        raise ValueError(f"{weights}: not a readable safetensors file ({err})") from None
    bad = sorted(k for k in tensors if not (k.startswith(PREFIX) and is_adapter_key(k)))
    if bad:
        raise ValueError(
            f"{weights}: {len(bad)} keys outside the official layout "
            f"'{PREFIX}<module>.lora_A.weight' / '.lora_B.weight', e.g. {bad[:3]}"
        )
    return config, tensors


def load_adapter(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy official-layout adapter tensors into a model that already carries the adapter (same rank/targets)."""
    own = adapter_state_dict(model)
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"adapter keys do not fit this model and lora.target_modules: {len(missing)} missing "
            f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})"
        )
    for k, v in tensors.items():
        if v.shape != own[k].shape:
            raise ValueError(
                f"adapter {k} has shape {tuple(v.shape)}, the model expects {tuple(own[k].shape)} "
                "(another rank or model size)"
            )
    from peft import set_peft_model_state_dict  # lazy: peft, see lora_config

    result = set_peft_model_state_dict(
        model, {k[len(PREFIX) :]: v for k, v in tensors.items()}, adapter_name=ADAPTER_NAME
    )
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if is_adapter_key(k)]
    assert not unexpected, f"peft did not place adapter keys {unexpected[:3]}"


def apply_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Inject the adapter stored at ``path`` (its own rank/targets) into a plain model and load its weights."""
    config, tensors = read_adapter(path)
    inject_lora(model, config)
    load_adapter(model, tensors)
    return model


# ------------------------------------------------------------------------------------------------ merge / export
@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W + scale * B @ A, peft's merge) and remove the LoRA layers, in
    place: the result is a plain HunYuanDiT with the original key names, what the original's merge.py saves."""
    for name, module in lora_modules(model):
        module.merge(safe_merge=True, adapter_names=[ADAPTER_NAME])
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def base_state_dict(model: nn.Module) -> dict[str, Any]:
    """The frozen base weights under the original names (``x.base_layer.weight`` -> ``x.weight``), adapter dropped."""
    out = {}
    for k, v in model.state_dict().items():
        if is_adapter_key(k):
            continue
        out[k.replace(".base_layer.", ".")] = v
    return out
