"""AdamW, the LR schedule (the original's DeepSpeed WarmupLR, or cosine) and the EMA of the weights."""

from __future__ import annotations

import math

import torch
from torch import nn

from stage2_train.config import EMASection, OptimSection, ScheduleSection

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def build_optimizer(model: nn.Module, cfg: OptimSection) -> torch.optim.AdamW:
    """One param group over every trainable parameter, as the original (utils/tools.py)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(
        params,
        lr=cfg.lr,
        betas=(cfg.betas[0], cfg.betas[1]),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        fused=cfg.fused or None,
    )


class LRSchedule:
    """LR as a pure function of the optimizer step; state is only the step, so resume is exact."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: ScheduleSection, *, base_lr: float, total_steps: int):
        self.optimizer, self.cfg, self.base_lr, self.total_steps = optimizer, cfg, base_lr, total_steps
        self.step_count = 0
        self._apply()

    def lr_at(self, step: int) -> float:
        cfg, top = self.cfg, self.base_lr
        if step < cfg.warmup_steps:
            if cfg.warmup_kind == "log":  # DeepSpeed WarmupLR(warmup_type="log"), what the original's ds_config uses
                gamma = math.log(step + 1) / math.log(max(2, cfg.warmup_steps))
            else:
                gamma = (step + 1) / cfg.warmup_steps
            return cfg.warmup_min_lr + (top - cfg.warmup_min_lr) * gamma
        if cfg.kind == "constant":
            return top
        span = max(1, self.total_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.min_lr + (top - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def _apply(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step_count)

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def state_dict(self) -> dict:
        return {"step_count": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        self._apply()


class EMA:
    """Exponential moving average of the trainable weights, updated after every optimizer step.

    Shadows have the parameters' placement (plain tensors under DDP, sharded DTensors under FSDP2), so the update
    never gathers; `state_dict()` returns full tensors keyed like the model's state dict.
    """

    def __init__(self, model: nn.Module, cfg: EMASection) -> None:
        self.decay, self.dtype = cfg.decay, DTYPES[cfg.dtype]
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        with torch.no_grad():
            self.shadow = [p.detach().to(self.dtype, copy=True) for _, p in self._params(model)]

    def _params(self, model: nn.Module) -> list[tuple[str, torch.Tensor]]:
        params = dict(model.named_parameters())
        return [(n, params[n]) for n in self.names]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for shadow, (_, p) in zip(self.shadow, self._params(model)):
            if shadow.dtype == torch.float32:
                shadow.lerp_(p.detach().float(), 1.0 - self.decay)
            else:  # low-precision storage: average in fp32, round once
                shadow.copy_(shadow.float().lerp_(p.detach().float(), 1.0 - self.decay))

    def tensors(self) -> dict[str, torch.Tensor]:
        """The live shadows keyed like the model's state dict (sharded DTensors under FSDP2), for DCP to write this
        rank's shards of, or to load into in place."""
        return dict(zip(self.names, self.shadow))

    def tensors_of(self, model: nn.Module) -> list[torch.Tensor]:
        """The model's tensors the shadows follow, in the shadows' order."""
        return [p for _, p in self._params(model)]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Full tensors on CPU (collective under FSDP2: every rank must call it)."""
        out = {}
        for name, shadow in zip(self.names, self.shadow):
            full = shadow.full_tensor() if hasattr(shadow, "full_tensor") else shadow
            out[name] = full.detach().cpu().contiguous()
        return out

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.names if n not in state]
        if missing:
            raise ValueError(f"EMA state lacks {len(missing)} weights, e.g. {missing[:3]}")
        for name, shadow in zip(self.names, self.shadow):
            full = state[name].to(self.dtype)
            if hasattr(shadow, "full_tensor"):  # sharded: take this rank's shard of the full tensor
                from torch.distributed.tensor import distribute_tensor

                full = distribute_tensor(full.to(shadow.device), shadow.device_mesh, shadow.placements)
                shadow.to_local().copy_(full.to_local())
            else:
                shadow.copy_(full)
