"""Rank-0 training metrics: one log line per interval, metrics.jsonl, TensorBoard, a tqdm bar."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from shared.fsutil import atomic_write_bytes

logger = logging.getLogger("stage2_train")


def init_logger(rank: int) -> logging.Logger:
    """One logger; ranks other than 0 only report warnings."""
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter(f"[%(asctime)s][rank {rank}] %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    return logger


def memory_gib(device: torch.device) -> float:
    """Peak allocated GPU memory, or the process's current resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**30
    except OSError:
        import resource  # lazy: Unix only (no such module on Windows), and only where /proc is missing

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def truncate_metrics(path: Path, last_step: int) -> int:
    """Drop the records after `last_step` (and a torn last line) from metrics.jsonl; returns how many were dropped.

    A run killed after its last checkpoint logged steps that the resumed run trains again: without this they would
    appear twice. Rewritten atomically, so a kill here leaves the old file or the new one.
    """
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            step = json.loads(line)["step"]
        except (json.JSONDecodeError, KeyError, TypeError):
            dropped += 1  # a line torn by the kill
            continue
        if step <= last_step:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        atomic_write_bytes(path, "".join(line + "\n" for line in kept).encode("utf-8"))
        logger.info(
            "%s: dropped %d records after step %d (logged by the run that was interrupted)", path, dropped, last_step
        )
    return dropped


class MetricsLogger:
    """Writes on rank 0 only; other ranks get a no-op."""

    def __init__(
        self, run_dir: Path, *, enabled: bool, tensorboard: bool, progress_bar: bool, total: int, initial: int
    ) -> None:
        self.enabled = enabled
        self.jsonl = self.tb = self.bar = None
        if not enabled:
            return
        path = run_dir / "metrics.jsonl"
        truncate_metrics(path, initial)
        self.jsonl = open(path, "a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # lazy: ~0.5 s (protobuf); runs without it skip it

            # purge_step: TensorBoard hides the events a killed run logged after the checkpoint it resumes from
            self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=initial + 1 if initial else None)
        if progress_bar:
            self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True, disable=None)

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        line = (
            f"step {step:7d} | loss {values['loss']:.4f} | mse {values['mse']:.4f} | vb {values['vb']:.4f} | "
            f"grad_norm {values['grad_norm']:.3f} | lr {values['lr']:.3g} | {values['samples_per_s']:.2f} samples/s"
            f" | data_wait {100 * values['data_wait_share']:.1f}% | mem {values['memory_gib']:.2f} GiB"
        )
        if values.get("skipped_steps"):
            line += f" | skipped {values['skipped_steps']}"
        logger.info(line)
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for name, value in values.items():
                if isinstance(value, (int, float)):
                    self.tb.add_scalar(f"train/{name}", value, step)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{values['loss']:.4f}", refresh=False)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()
