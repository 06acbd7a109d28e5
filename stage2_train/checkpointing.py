"""Training checkpoints: <run_dir>/checkpoints/step_XXXXXXX/, written under a temp name and renamed when complete.

A step folder holds:
  model.safetensors      full fp32 weights, the original's key names (loadable by pipeline.checkpoints)
  ema.safetensors        EMA weights (if enabled), same keys
  optimizer.safetensors  AdamW state keyed by parameter name (+ param groups as JSON metadata); no pickle anywhere
  rng/rank_XXXXX.safetensors  each rank's torch (and CUDA) RNG state
  config.yaml            the resolved training config
  trainer_state.json     step, LR schedule, loss scale, counters, data position, and "files": the size and sha256
                         of every other file of the folder; written last

Resuming verifies every file against that index first (`verify_checkpoint`); `resume=auto` falls back to the newest
checkpoint that verifies, saying which ones it skipped and why.

Under FSDP2 across ranks (trainer_state.json "layout": "dcp") the weights, AdamW state and EMA are instead written
by every rank, its own shards only, with torch.distributed.checkpoint into dcp/ (one __<rank>_0.distcp per rank +
.metadata), which any world size and any strategy can load (DCP reshards on read; one process reads whole tensors).
model.safetensors / ema.safetensors are still exported, gathered on rank 0, unless checkpoint.consolidated=false;
there is no optimizer.safetensors. The file index covers dcp/ like every other file. Folders without "layout"
(DDP, single process, and FSDP2 checkpoints written before) are the consolidated layout above; every strategy reads
both.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from shared.fsutil import file_sha256, fsync_dir, fsync_tree
from stage2_train.metrics import logger
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


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be used: the message names the file and what is wrong with it."""


def read_trainer_state(path: Path) -> dict:
    """trainer_state.json of a step folder; CheckpointError naming the file if it is unreadable."""
    state_file = path / STATE_FILE
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{state_file} is missing (the checkpoint was never completed)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{state_file} is not valid JSON (truncated or damaged: {err})") from None
    missing = [
        k
        for k in ("step", "schedule", "world_size", "batch_size", "grad_accum", "seed")
        if not isinstance(state, dict) or k not in state
    ]
    if missing:
        raise CheckpointError(f"{state_file} lacks {missing}: not a stage-2 trainer state")
    return state


def _file_index(folder: Path) -> dict[str, dict[str, Any]]:
    """{relative path: {bytes, sha256}} of every file below `folder` except trainer_state.json."""
    out = {}
    for dirpath, _, names in os.walk(folder):
        for name in names:
            f = Path(dirpath) / name
            rel = f.relative_to(folder).as_posix()
            if rel != STATE_FILE:
                out[rel] = {"bytes": f.stat().st_size, "sha256": file_sha256(f)}
    return dict(sorted(out.items()))


def verify_checkpoint(path: Path) -> dict:
    """Check every file of a step folder against the index in its trainer_state.json; returns the trainer state.

    Raises CheckpointError naming the first bad file. Sizes are compared before any hashing, so a truncated file is
    caught without reading the rest; a checkpoint written before the index existed is accepted as it is.
    """
    state = read_trainer_state(path)
    files = state.get("files")
    if files is None:
        logger.warning("%s has no file checksums (written by an older version): used unverified", path)
        return state
    for rel, want in files.items():
        f = path / rel
        if not f.is_file():
            raise CheckpointError(f"{f} is missing")
        size = f.stat().st_size
        if size != want["bytes"]:
            raise CheckpointError(f"{f} has {size} bytes, the checkpoint index says {want['bytes']} (truncated?)")
    for rel, want in files.items():
        got = file_sha256(path / rel)
        if got != want["sha256"]:
            raise CheckpointError(
                f"{path / rel}: sha256 {got[:12]}... differs from the checkpoint index's "
                f"{want['sha256'][:12]}... (damaged)"
            )
    return state


def resolve_resume(resume: str, ckpt_root: Path) -> Path | None:
    """ "" -> None; "auto" -> newest checkpoint that verifies, or None if there is none; a path -> that folder,
    verified. Raises CheckpointError when checkpoints exist but none verifies (starting fresh would silently throw
    the training away)."""
    if not resume:
        return None
    if resume == "auto":
        found = list_checkpoints(ckpt_root)
        skipped = []
        for path in reversed(found):
            try:
                verify_checkpoint(path)
            except CheckpointError as err:
                logger.warning("checkpoint.resume=auto: skipping %s: %s", path.name, err)
                skipped.append(str(err))
                continue
            if skipped:
                logger.warning(
                    "checkpoint.resume=auto: resuming from %s, the newest checkpoint that verifies "
                    "(skipped %d damaged)",
                    path.name,
                    len(skipped),
                )
            return path
        if skipped:
            raise CheckpointError(
                f"checkpoint.resume=auto: no checkpoint in {ckpt_root} verifies:\n  "
                + "\n  ".join(skipped)
                + "\nDelete them to start fresh, or restore a good copy"
            )
        return None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        hint = f"; complete ones in {ckpt_root}: {[p.name for p in list_checkpoints(ckpt_root)]}"
        raise CheckpointError(
            f"checkpoint.resume={resume!r} is not a complete stage-2 checkpoint folder "
            f"(no {STATE_FILE}){hint}; use checkpoint.resume=auto to pick the latest"
        )
    verify_checkpoint(path)
    return path


def is_sharded(model: nn.Module) -> bool:
    """FSDP2 parameters are DTensors."""
    return any(hasattr(p, "full_tensor") for p in model.parameters())


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full weights with the original key names (collective under FSDP2; rank 0 gets them)."""
    if not is_sharded(model):
        return model.state_dict()
    # lazy: torch.distributed.checkpoint takes seconds to import; only FSDP2 runs and the dcp layout pay for it.
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """AdamW state keyed by parameter name, the format of DCP's get_optimizer_state_dict, for every strategy."""
    if is_sharded(model):
        # lazy: DCP, see full_model_state
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(
            model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
    names = {id(p): n for n, p in model.named_parameters()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    osd = optimizer.state_dict()
    by_index = {i: names[id(p)] for i, p in enumerate(params)}
    groups = [{**g, "params": [by_index[i] for i in g["params"]]} for g in osd["param_groups"]]
    return {"state": {by_index[i]: st for i, st in osd["state"].items()}, "param_groups": groups}


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_sd: dict, optim_sd: dict) -> None:
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import (  # lazy: DCP, see full_model_state
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
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
    optimizer.load_state_dict({"state": {index[n]: st for n, st in optim_sd["state"].items()}, "param_groups": groups})


def _flatten_optimizer(osd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors = {}
    for fqn, state in osd["state"].items():
        for name, value in state.items():
            tensors[f"{fqn}::{name}"] = torch.as_tensor(value).detach().cpu().contiguous()
    return tensors, {"param_groups": json.dumps(osd["param_groups"])}


def _unflatten_optimizer(path: Path) -> dict[str, Any]:
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in _load_safetensors(path).items():
        fqn, name = key.rsplit("::", 1)
        state.setdefault(fqn, {})[name] = value
    with safe_open(path, "pt") as f:
        groups = json.loads(f.metadata()["param_groups"])
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    return {"state": state, "param_groups": groups}


DCP_DIR = "dcp"
DCP_LAYOUT = "dcp"


def _dcp_state(model: nn.Module, optimizer: torch.optim.Optimizer, ema: Any, *, with_ema: bool) -> dict[str, Any]:
    """{"model", "optim"[, "ema"]}: this rank's view (DTensor shards under FSDP2, whole tensors otherwise), keyed by
    parameter name, to save from or to load into in place. A fresh AdamW gets its (zero) state created first."""
    from torch.distributed.checkpoint.state_dict import get_state_dict  # lazy: DCP, see full_model_state

    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    if with_ema and ema is not None:
        state["ema"] = ema.tensors()
    return state


def _save_dcp(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, ema: Any) -> None:
    import torch.distributed.checkpoint as dcp  # lazy: DCP, see full_model_state

    dcp.save(_dcp_state(model, optimizer, ema, with_ema=True), checkpoint_id=str(folder))


def _load_dcp(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, ema: Any) -> None:
    # lazy: DCP, see full_model_state
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    folder = path / DCP_DIR
    try:
        saved = dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    except Exception as err:
        raise CheckpointError(f"{folder}/.metadata is not a readable DCP index ({type(err).__name__}: {err})") from None
    has_ema = any(k.startswith("ema.") for k in saved)
    if ema is not None and not has_ema:
        logger.warning("%s has no EMA weights: the EMA starts from the resumed weights", path)
    state = _dcp_state(model, optimizer, ema, with_ema=has_ema)
    try:
        dcp.load(state, checkpoint_id=str(folder))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    except Exception as err:  # DCP wraps per-rank failures in its own CheckpointException
        raise CheckpointError(
            f"{folder} does not fit this model or is damaged ({type(err).__name__}: {str(err)[:2000]})"
        ) from None
    if ema is not None and not has_ema:
        with torch.no_grad():
            for shadow, value in zip(ema.shadow, ema.tensors_of(model)):
                shadow.copy_(value.detach().to(shadow.dtype))


def save_checkpoint(
    ckpt_root: Path,
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: Any,
    trainer_state: dict,
    config_yaml: str,
    info: DistInfo,
    keep_last: int,
    consolidated: bool = True,
) -> Path:
    """Collective: every rank must call it. Returns the final folder."""
    final = ckpt_root / step_dir_name(step)
    tmp = ckpt_root / f"{TMP_PREFIX}{final.name}"
    sharded = is_sharded(model)
    if info.is_main:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # debris of a save that died
        (tmp / "rng").mkdir(parents=True)
        if sharded:
            (tmp / DCP_DIR).mkdir()
    barrier(info)

    if sharded:
        # every rank writes its own shards in parallel; nothing is gathered for resuming
        _save_dcp(tmp / DCP_DIR, model, optimizer, ema)
        trainer_state = {**trainer_state, "layout": DCP_LAYOUT}
        model_sd = full_model_state(model) if consolidated else None
        optim_sd = None
        ema_sd = ema.state_dict() if ema is not None and consolidated else None
    else:
        model_sd = full_model_state(model)
        optim_sd = full_optimizer_state(model, optimizer)
        ema_sd = ema.state_dict() if ema is not None else None
    rng = {"cpu": torch.get_rng_state()}
    if info.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(info.device)
    save_file(rng, str(tmp / "rng" / f"rank_{info.rank:05d}.safetensors"))
    if info.is_main:
        meta = {"step": str(step)}
        if model_sd is not None:
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in model_sd.items()}, str(tmp / "model.safetensors"), meta
            )
        if ema_sd is not None:
            save_file(ema_sd, str(tmp / "ema.safetensors"), meta)
        if optim_sd is not None:
            tensors, optim_meta = _flatten_optimizer(optim_sd)
            save_file(tensors, str(tmp / "optimizer.safetensors"), optim_meta)
        (tmp / "config.yaml").write_text(config_yaml, encoding="utf-8")
    barrier(info)  # every rank's RNG file is in place
    if info.is_main:
        # Hashing re-reads what was just written (from the page cache): seconds per 10 GB, paid once per save.
        state = {**trainer_state, "files": _file_index(tmp)}
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1), encoding="utf-8")
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


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except Exception as err:  # safetensors raises its own SafetensorError (not an OSError) on a bad header
        raise CheckpointError(f"{path} is not a readable safetensors file ({type(err).__name__}: {err})") from None


def load_checkpoint(
    path: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: Any,
    info: DistInfo,
) -> dict:
    """Restore weights, optimizer, EMA and this rank's RNG; returns the trainer state for the caller.

    The folder should have passed `verify_checkpoint` (resolve_resume does that); a file that still cannot be read
    or does not fit the model raises CheckpointError naming it.
    """
    state = read_trainer_state(path)
    if state.get("layout") == DCP_LAYOUT:
        _load_dcp(path, model, optimizer, ema)
        _load_rng(path, info)
        return state
    if state.get("layout") is not None:
        raise CheckpointError(f"{path / STATE_FILE}: unknown layout {state['layout']!r} (written by a newer version?)")
    model_file, optim_file = path / "model.safetensors", path / "optimizer.safetensors"
    model_sd = _load_safetensors(model_file)
    try:
        optim_sd = _unflatten_optimizer(optim_file)
    except CheckpointError:
        raise
    except Exception as err:
        raise CheckpointError(f"{optim_file} is not a stage-2 optimizer state ({type(err).__name__}: {err})") from None
    try:
        load_full_state(model, optimizer, model_sd, optim_sd)
    except (RuntimeError, ValueError, KeyError) as err:
        raise CheckpointError(
            f"{path}: model.safetensors / optimizer.safetensors do not fit this model ({type(err).__name__}: {err})"
        ) from None
    if ema is not None:
        ema_file = path / "ema.safetensors"
        if ema_file.is_file():
            ema.load_state_dict(_load_safetensors(ema_file))
        else:
            logger.warning("%s has no EMA weights: the EMA starts from the resumed weights", path)
    _load_rng(path, info)
    return state


def _load_rng(path: Path, info: DistInfo) -> None:
    rng_file = path / "rng" / f"rank_{info.rank:05d}.safetensors"
    if rng_file.is_file():
        rng = _load_safetensors(rng_file)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and info.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], info.device)
