"""Process group, device, and parallelism applied to the single-device model from outside.

Order (torchtitan's): activation checkpointing -> torch.compile per block -> DDP, or FSDP2 per block then root.

Under FSDP2 with several ranks the model is built on the meta device and only this rank's shards are allocated
(`build_parallel_model`); a fresh run's weights are made on rank 0 exactly as a single process makes them (seeded
construction, or model.init_from) and scattered from there, so the initial weights are bit-identical to DDP's.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.nn.parallel import DistributedDataParallel

from pipeline.models import apply_activation_checkpointing
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


def uses_meta_init(cfg: ParallelSection, info: DistInfo) -> bool:
    """FSDP2 across ranks: build on meta and materialise shards; every other setup keeps the full build."""
    return info.distributed and cfg.strategy == "fsdp2"


def fp32_island_modules(block: nn.Module) -> list[nn.Module]:
    """Modules of a block whose parameters must stay fp32 under a bf16 parameter policy: everything holding
    parameters that is not a Linear/Conv (norm weights and biases: FP32LayerNorm, RMSNorm, qk-norm LayerNorms).

    Linear/Conv weights are cast to bf16 by autocast anyway, so storing them in bf16 changes no value; a norm's
    weight is read in fp32 (FP32LayerNorm's weight.float(), autocast's fp32 layer_norm), and a bf16 copy would round it.
    """
    out = []
    for module in block.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        if any(True for _ in module.parameters(recurse=False)):
            out.append(module)
    return out


def apply_parallelism(model: nn.Module, cfg: ParallelSection, info: DistInfo, *, precision: str = "fp32") -> nn.Module:
    """Wrap the model in place as configured; returns the module the training step calls.

    FSDP2 with precision="bf16": each block's Linears are all-gathered in bf16 (MixedPrecisionPolicy, gradients
    reduce-scattered in fp32), the block's norms in their own fp32 group, and the root (embedders, pooler, text
    padding, final layer: ~2% of DiT-g/2) stays fp32. Autocast stays on around the forward, so every op sees the
    dtypes it sees today: autocast's bf16 cast of an fp32 weight and an all-gathered bf16 weight are the same
    round-to-nearest value, and fp32 ops (layer_norm, softmax, RoPE, sinusoids) read fp32 parameters as today.
    Forward inputs are not cast (cast_forward_inputs=False): the RoPE tables and timesteps must stay fp32.
    """
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model, 1.0)
    if cfg.compile:
        for block in model.blocks:
            block.compile()  # in place: state-dict names stay those of the original
    if not info.distributed:
        return model
    if cfg.strategy == "fsdp2":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # lazy: pulls DTensor (seconds); DDP skips

        mesh = init_device_mesh(info.device.type, (info.world_size,))
        bf16 = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)
            if precision == "bf16"
            else None
        )
        fp32 = MixedPrecisionPolicy(cast_forward_inputs=False)
        for block in model.blocks:
            if bf16 is not None:
                islands = fp32_island_modules(block)
                if islands:  # one group (one all-gather) for all the block's norms
                    fully_shard(islands, mesh=mesh, reshard_after_forward=cfg.reshard_after_forward, mp_policy=fp32)
            fully_shard(block, mesh=mesh, reshard_after_forward=cfg.reshard_after_forward, mp_policy=bf16 or fp32)
        # root: gathered again right away in backward
        fully_shard(model, mesh=mesh, reshard_after_forward=False, mp_policy=fp32)
        return model
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def build_parallel_model(
    build: Callable[[], nn.Module],
    cfg: ParallelSection,
    info: DistInfo,
    *,
    seed: int,
    fresh: bool,
    init_weights: Callable[[nn.Module], None] | None = None,
    precision: str = "fp32",
) -> nn.Module:
    """Build, initialise and wrap the model; returns what apply_parallelism returns.

    Single process and DDP: the full model on every rank (seeded construction + init_weights), as before.
    FSDP2 across ranks: `build()` under torch.device("meta") (no memory), fully_shard from outside, to_empty (only
    this rank's shards are allocated), then:
      - fresh run: rank 0 alone builds the full model on CPU exactly as a single process does (torch.manual_seed(seed),
        construction, init_weights) and scatters it, one tensor at a time, into the shards (scatter_from_rank0).
        Rank 0's seeded CPU build rather than a per-parameter init of each shard: the model's init draws every
        tensor from one sequential RNG stream (each Linear's default init, then xavier_uniform / normal, randn),
        which a shard cannot reproduce without drawing every tensor before it, and bit-identical initial weights to
        DDP / single-process runs are the project's promise. Only rank 0 holds the full fp32 model in host memory
        (once: it frees each tensor as it is sent); the other ranks hold their shards only.
      - resume (fresh=False): the shards are left uninitialised; the caller loads every parameter from the
        checkpoint (DCP reads this rank's shards only).
    """
    if not uses_meta_init(cfg, info):
        torch.manual_seed(seed)  # identical initial weights on every rank, also without DDP's broadcast
        model = build()
        if fresh and init_weights is not None:
            init_weights(model)
        model.to(info.device).train()
        return apply_parallelism(model, cfg, info, precision=precision)
    with torch.device("meta"):
        model = build()
    model = apply_parallelism(model, cfg, info, precision=precision)
    model.to_empty(device=info.device)
    model.train()
    if fresh:
        full: dict[str, torch.Tensor] | None = None
        if info.is_main:
            torch.manual_seed(seed)
            with torch.device("cpu"):
                reference = build()
            if init_weights is not None:
                init_weights(reference)
            full = dict(reference.state_dict())
            del reference
        scatter_from_rank0(model, full, info)
    return model


@torch.no_grad()
def scatter_from_rank0(model: nn.Module, full: dict[str, torch.Tensor] | None, info: DistInfo) -> None:
    """Fill every sharded tensor of `model` from rank 0's full state dict (`full`, None on other ranks), one tensor
    at a time: rank 0 drops each full tensor once it is sent, and the other ranks never hold more than this rank's
    shards, so no rank's host memory exceeds the full model (rank 0) or its shards plus one tensor (the rest).
    (set_model_state_dict(broadcast_from_rank0=True) does the same job but receives every full tensor at once.)"""
    from torch.distributed.tensor import DTensor, distribute_tensor  # lazy: seconds to import; FSDP2 runs only

    targets = model.state_dict()
    if info.is_main:
        assert full is not None and set(full) == set(targets), sorted(set(full or {}) ^ set(targets))[:5]
    for name, target in targets.items():
        if info.is_main:
            value = full.pop(name).to(device=info.device, dtype=target.dtype)
        else:  # only the shape matters: distribute_tensor scatters rank 0's data
            value = torch.empty(target.shape, dtype=target.dtype, device=info.device)
        if isinstance(target, DTensor):
            local = distribute_tensor(value, target.device_mesh, target.placements, src_data_rank=0).to_local()
            target.to_local().copy_(local)
        else:
            dist.broadcast(value, src=0)
            target.copy_(value)
        del value


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
