"""Training checkpoints: <run_dir>/checkpoints/step_XXXXXXX/, written under a temp name and renamed when complete.

A step folder holds:
  model.safetensors      full fp32 weights, the original's key names (loadable by pipeline.checkpoints)
  ema.safetensors        EMA weights (if enabled), same keys
  optimizer.safetensors  AdamW state keyed by parameter name (+ param groups as JSON metadata); no pickle anywhere
  rng/rank_XXXXX.safetensors  each rank's torch (and CUDA) RNG state
  config.yaml            the resolved training config
  trainer_state.json     step, LR schedule, loss scale, counters, data position; written last

Under FSDP2 the full state is gathered to rank 0 (get_model_state_dict / get_optimizer_state_dict with
full_state_dict=True), so DDP, FSDP2 and single-process runs share one format and any world size can resume.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from shared.fsutil import fsync_dir, fsync_tree
from stage2_train.parallel import DistInfo, barrier

STEP_RE = re.compile(r"^step_(\d{7})$")
TMP_PREFIX = ".tmp-"
STATE_FILE = "trainer_state.json"


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete step folders (renamed from their temp name and holding trainer_state.json), oldest first."""
    if not ckpt_root.is_dir():
        return []
    found = [p for p in ckpt_root.iterdir() if STEP_RE.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(STEP_RE.match(p.name).group(1)))


def resolve_resume(resume: str, ckpt_root: Path) -> Path | None:
    """"" -> None; "auto" -> latest complete checkpoint or None; a path -> that folder (checked)."""
    if not resume:
        return None
    if resume == "auto":
        found = list_checkpoints(ckpt_root)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        hint = f"; complete ones in {ckpt_root}: {[p.name for p in list_checkpoints(ckpt_root)]}"
        raise ValueError(f"checkpoint.resume={resume!r} is not a complete stage-2 checkpoint folder "
                         f"(no {STATE_FILE}){hint}; use checkpoint.resume=auto to pick the latest")
    return path


def is_sharded(model: nn.Module) -> bool:
    """FSDP2 parameters are DTensors."""
    return any(hasattr(p, "full_tensor") for p in model.parameters())


def full_model_state(model: nn.Module, info: DistInfo) -> dict[str, torch.Tensor]:
    """Full weights with the original key names (collective under FSDP2; rank 0 gets them)."""
    if not is_sharded(model):
        return model.state_dict()
    # torch.distributed.checkpoint takes seconds to import: only FSDP2 runs pay for it.
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, info: DistInfo) -> dict[str, Any]:
    """AdamW state keyed by parameter name, the format of DCP's get_optimizer_state_dict, for every strategy."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    names = {id(p): n for n, p in model.named_parameters()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    osd = optimizer.state_dict()
    by_index = {i: names[id(p)] for i, p in enumerate(params)}
    groups = [{**g, "params": [by_index[i] for i in g["params"]]} for g in osd["param_groups"]]
    return {"state": {by_index[i]: st for i, st in osd["state"].items()}, "param_groups": groups}


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_sd: dict, optim_sd: dict) -> None:
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions, set_model_state_dict, set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, model_sd, options=options)
        set_optimizer_state_dict(model, optimizer, optim_sd, options=options)
        return
    model.load_state_dict(model_sd)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    names = {id(p): n for n, p in model.named_parameters()}
    index = {names[id(p)]: i for i, p in enumerate(params)}
    unknown = sorted(set(optim_sd["state"]) - set(index))
    if unknown:
        raise ValueError(f"optimizer state names parameters the model lacks, e.g. {unknown[:3]}")
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in optim_sd["param_groups"]]
    optimizer.load_state_dict({"state": {index[n]: st for n, st in optim_sd["state"].items()},
                               "param_groups": groups})


def _flatten_optimizer(osd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors = {}
    for fqn, state in osd["state"].items():
        for name, value in state.items():
            tensors[f"{fqn}::{name}"] = torch.as_tensor(value).detach().cpu().contiguous()
    return tensors, {"param_groups": json.dumps(osd["param_groups"])}


def _unflatten_optimizer(path: Path) -> dict[str, Any]:
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in load_file(path).items():
        fqn, name = key.rsplit("::", 1)
        state.setdefault(fqn, {})[name] = value
    with safe_open(path, "pt") as f:
        groups = json.loads(f.metadata()["param_groups"])
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    return {"state": state, "param_groups": groups}


def save_checkpoint(
    ckpt_root: Path, step: int, *, model: nn.Module, optimizer: torch.optim.Optimizer, ema: Any, trainer_state: dict,
    config_yaml: str, info: DistInfo, keep_last: int,
) -> Path:
    """Collective: every rank must call it. Returns the final folder."""
    final = ckpt_root / step_dir_name(step)
    tmp = ckpt_root / f"{TMP_PREFIX}{final.name}"
    if info.is_main:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # debris of a save that died
        (tmp / "rng").mkdir(parents=True)
    barrier(info)

    model_sd = full_model_state(model, info)
    optim_sd = full_optimizer_state(model, optimizer, info)
    ema_sd = ema.state_dict() if ema is not None else None
    rng = {"cpu": torch.get_rng_state()}
    if info.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(info.device)
    save_file(rng, str(tmp / "rng" / f"rank_{info.rank:05d}.safetensors"))
    if info.is_main:
        meta = {"step": str(step)}
        save_file({k: v.detach().cpu().contiguous() for k, v in model_sd.items()}, str(tmp / "model.safetensors"), meta)
        if ema_sd is not None:
            save_file(ema_sd, str(tmp / "ema.safetensors"), meta)
        tensors, optim_meta = _flatten_optimizer(optim_sd)
        save_file(tensors, str(tmp / "optimizer.safetensors"), optim_meta)
        (tmp / "config.yaml").write_text(config_yaml, encoding="utf-8")
    barrier(info)  # every rank's RNG file is in place
    if info.is_main:
        (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=1), encoding="utf-8")
        fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        fsync_dir(ckpt_root)
        if keep_last > 0:
            for old in list_checkpoints(ckpt_root)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    barrier(info)
    return final


def load_checkpoint(
    path: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer, ema: Any, info: DistInfo,
) -> dict:
    """Restore weights, optimizer, EMA and this rank's RNG; returns the trainer state for the caller."""
    load_full_state(model, optimizer, load_file(path / "model.safetensors"),
                    _unflatten_optimizer(path / "optimizer.safetensors"))
    if ema is not None:
        ema_file = path / "ema.safetensors"
        if ema_file.is_file():
            ema.load_state_dict(load_file(ema_file))
        else:
            from stage2_train.metrics import logger

            logger.warning("%s has no EMA weights: the EMA starts from the resumed weights", path)
    rng_file = path / "rng" / f"rank_{info.rank:05d}.safetensors"
    if rng_file.is_file():
        rng = load_file(rng_file)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and info.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], info.device)
    return json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
