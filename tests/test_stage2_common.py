"""Shared helpers for the stage-2 tests (no tests here): tiny synthetic caches and configs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TINY_TEXT = dict(clip_len=8, clip_dim=32, t5_len=12, t5_dim=48)


def write_synthetic_cache(
    root: Path,
    *,
    n: int = 12,
    buckets=((32, 32), (32, 48)),
    fmt: str = "zarr",
    views=("plain", "flip"),
    seed: int = 0,
    scaling_factor: float = 0.13025,
    shards: int = 2,
    encoders: dict | None = None,
) -> Path:
    """A small valid cache with structured (learnable) latents; text states random but fixed per sample."""
    from shared.inspection import write_synthetic_cache as write
    from shared.schema import CacheSpec

    spec = CacheSpec(format=fmt, views=tuple(views), **TINY_TEXT)
    write(
        root,
        spec,
        n_samples=n,
        n_shards=shards,
        buckets=buckets,
        seed=seed,
        scaling_factor=scaling_factor,
        encoders=encoders or {},
        latents="structured",
        shard_names="part-{:05d}",
    )
    return root


def tiny_overrides(cache: Path, run_dir: Path, **extra) -> list[str]:
    """Overrides for configs/train/demo.yaml that make a fast deterministic CPU run."""
    base = {
        "data.cache": str(cache),
        "run_dir": str(run_dir),
        "data.num_workers": 0,
        "data.batch_size": 2,
        "logging.every": 1,
        "logging.tensorboard": False,
        "logging.progress_bar": False,
        "checkpoint.every": 0,
        "checkpoint.resume": "",
        "device": "cpu",
        "precision.mode": "fp32",
    }  # the model's text sizes come from the synthetic cache's manifest
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_script(args: list[str], *, env_extra: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(env_extra or {})
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def train_cmd(*overrides: str, config: str = "configs/train/demo.yaml") -> list[str]:
    return [sys.executable, "stage2_train/train.py", "--config", config, *overrides]


def torchrun_cmd(*overrides: str, nproc: int = 2, config: str = "configs/train/demo.yaml") -> list[str]:
    """`torchrun --standalone --nproc_per_node N stage2_train/train.py --config ... overrides` (gloo on CPU)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        "stage2_train/train.py",
        "--config",
        config,
        *overrides,
    ]


def sigkill_after_checkpoint(args: list[str], run_dir: Path, step: int, timeout: float = 120) -> None:
    """Start the training command `args`, SIGKILL it as soon as run_dir's checkpoint of `step` has its
    trainer_state.json, and check that it was killed, not finished."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ckpt = run_dir / "checkpoints" / f"step_{step:07d}" / "trainer_state.json"
    deadline = time.time() + timeout
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
