"""training.parts=lora in the trainer: inject the adapter, freeze the base, export the adapter at each checkpoint.

The stage-2 checkpoint stays the trainer's usual step folder (full model state, so resume is exact and needs nothing
else; the base weights appear there as ``<module>.base_layer.weight``). Beside it, each save writes the adapter in
the official layout (pipeline/lora.py) to ``<run_dir>/adapters/step_XXXXXXX/``: the file ComfyUI and the original's
merge script load. ``python -m stage2_train.merge_lora`` folds one into the base (original layout + diffusers).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline import lora
from stage2_train.checkpointing import full_model_state, is_sharded
from stage2_train.config import TrainConfig
from stage2_train.metrics import logger
from stage2_train.parallel import barrier

ADAPTERS_DIR = "adapters"
STEP_RE = re.compile(r"^step_(\d{7})$")


def validate_lora(cfg: TrainConfig) -> None:
    """ValueError naming the field for LoRA settings the run cannot honour."""
    lc = cfg.lora
    lora.lora_config(lc.rank, lc.alpha, lc.dropout, lc.target_modules)  # rank / alpha / dropout / targets
    if lc.base_dtype == "bfloat16":
        if cfg.precision.mode != "bf16":
            raise ValueError(
                f"lora.base_dtype=bfloat16 needs precision.mode=bf16 (got {cfg.precision.mode!r}): "
                "outside bf16 autocast a bf16 weight would meet fp32 activations; use "
                "lora.base_dtype=float32"
            )
        if cfg.parallel.strategy == "fsdp2":
            raise ValueError(
                "lora.base_dtype=bfloat16 with parallel.strategy=fsdp2: FSDP2 needs one dtype per "
                "sharded block (bf16 base + fp32 adapter); use ddp or lora.base_dtype=float32"
            )


def setup_lora(model: nn.Module, cfg: TrainConfig, *, resuming: bool) -> nn.Module:
    """Inject the configured adapter in place, freeze the base, load lora.init_adapter, cast the base."""
    lc = cfg.lora
    config = lora.lora_config(lc.rank, lc.alpha, lc.dropout, lc.target_modules)
    lora.inject_lora(model, config)
    if lc.init_adapter and not resuming:
        theirs, tensors = lora.read_adapter(lc.init_adapter)
        mine = (config.r, config.lora_alpha, sorted(config.target_modules))
        other = (theirs.r, theirs.lora_alpha, sorted(theirs.target_modules))
        if mine != other:
            raise ValueError(
                f"lora.init_adapter={lc.init_adapter!r} has (rank, alpha, target_modules) {other}, the "
                f"config {mine}: set lora.rank/alpha/target_modules to the adapter's"
            )
        lora.load_adapter(model, tensors)
        logger.info("LoRA: continuing from adapter %s", lc.init_adapter)
    if lc.base_dtype == "bfloat16":
        lora.cast_base(model, torch.bfloat16)
    return model


def trainable_summary(model: nn.Module) -> str:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"{trainable:,} trainable of {total:,}"


def export_adapter(trainer: Any, step: int) -> Path | None:
    """Collective (FSDP2 gathers): write <run_dir>/adapters/step_XXXXXXX/ on rank 0; keep as many as checkpoints."""
    state = full_model_state(trainer.inner) if is_sharded(trainer.inner) else None
    root = trainer.run_dir / ADAPTERS_DIR
    folder = root / f"step_{step:07d}"
    if trainer.info.is_main:
        root.mkdir(parents=True, exist_ok=True)
        lora.save_adapter(folder, trainer.inner, state, metadata={"step": str(step)})
        keep = trainer.cfg.checkpoint.keep_last
        if keep > 0:
            steps = sorted((p for p in root.iterdir() if STEP_RE.match(p.name)), key=lambda p: p.name)
            for old in steps[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    barrier(trainer.info)
    return folder if trainer.info.is_main else None
