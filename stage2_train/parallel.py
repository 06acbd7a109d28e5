"""Process group, device, and parallelism applied to the single-device model from outside.

Order (torchtitan's): activation checkpointing -> torch.compile per block -> DDP, or FSDP2 per block then root.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from stage2_train.config import ParallelSection


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(cfg: ParallelSection, device: str) -> DistInfo:
    """Join the torchrun process group if launched by torchrun; a plain `python` run is a world of one."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but no CUDA device is visible; set device=cpu or device=auto")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if "RANK" in os.environ and not dist.is_initialized():
        backend = cfg.backend if cfg.backend != "auto" else ("nccl" if dev.type == "cuda" else "gloo")
        if backend == "nccl" and dev.type != "cuda":
            raise ValueError("parallel.backend=nccl needs CUDA; use gloo (or auto) on CPU")
        dist.init_process_group(backend, timeout=timedelta(minutes=30))
    return DistInfo(rank, world_size, local_rank, dev)


def apply_parallelism(model: nn.Module, cfg: ParallelSection, info: DistInfo) -> nn.Module:
    """Wrap the model in place as configured; returns the module the training step calls."""
    from pipeline.models import apply_activation_checkpointing

    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model, 1.0)
    if cfg.compile:
        for block in model.blocks:
            block.compile()  # in place: state-dict names stay those of the original
    if not info.distributed:
        return model
    if cfg.strategy == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(info.device.type, (info.world_size,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh, reshard_after_forward=cfg.reshard_after_forward)
        fully_shard(model, mesh=mesh, reshard_after_forward=False)  # root: gathered again right away in backward
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def grad_sync(model: nn.Module, enabled: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce on micro-steps that are not the last of an accumulation."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext() if enabled else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()


def all_reduce_mean(values: list[float], info: DistInfo) -> list[float]:
    if not info.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return (t / info.world_size).tolist()


def any_rank(flag: bool, info: DistInfo) -> bool:
    if not info.distributed:
        return flag
    t = torch.tensor([int(flag)], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()
