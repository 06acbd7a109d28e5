"""Shared helpers for the stage-2 tests (no tests here): tiny synthetic caches and configs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

TINY_TEXT = dict(clip_len=8, clip_dim=32, t5_len=12, t5_dim=48)


def write_synthetic_cache(root: Path, *, n: int = 12, buckets=((32, 32), (32, 48)), fmt: str = "zarr",
                          views=("plain", "flip"), seed: int = 0, scaling_factor: float = 0.13025,
                          shards: int = 2, encoders: dict | None = None) -> Path:
    """A small valid cache with structured (learnable) latents; text states random but fixed per sample."""
    from shared.cache import open_shard_writer, write_empty_caption
    from shared.manifest import manifest_from_shards, write_manifest
    from shared.schema import CacheSpec

    spec = CacheSpec(format=fmt, views=tuple(views), **TINY_TEXT)
    rng = np.random.default_rng(seed)
    per_shard = int(np.ceil(n / shards))
    for s in range(shards):
        w = open_shard_writer(root, f"part-{s:05d}", spec)
        for i in range(s * per_shard, min(n, (s + 1) * per_shard)):
            h, wd = buckets[i % len(buckets)]
            lh, lw = h // 8, wd // 8
            yy, xx = np.meshgrid(np.linspace(-1, 1, lh), np.linspace(-1, 1, lw), indexing="ij")
            base = np.stack([np.sin(3 * xx + i), np.cos(2 * yy - i), xx * yy, xx - yy]).astype(np.float32)
            mean = np.stack([base, base[:, :, ::-1]])  # (V, C, h, w): flip view mirrored
            logvar = np.full_like(mean, -4.0)
            moments = np.concatenate([mean, logvar], axis=1)[: len(views)]
            n_clip, n_t5 = 2 + i % 5, 1 + i % 7
            clip_mask = np.arange(8) < n_clip
            t5_mask = np.arange(12) < n_t5
            clip_states = rng.standard_normal((8, 32)).astype(np.float32) * clip_mask[:, None]
            t5_states = rng.standard_normal((12, 48)).astype(np.float16)
            w.add({
                "key": f"syn-{i:08d}-{i:012x}", "caption": f"caption {i}",
                "bucket": np.array([h, wd], np.int32),
                "image_meta_size": np.array([wd, h, wd, h, 0, 0], np.int32),
                "moments": moments.astype(np.float32),
                "clip_ids": np.where(clip_mask, 5 + i, 0).astype(np.int32), "clip_mask": clip_mask,
                "clip_states": clip_states,
                "t5_ids": np.where(t5_mask, 7 + i, 1).astype(np.int32), "t5_mask": t5_mask, "t5_states": t5_states,
            })
        w.close()
    em_clip = np.arange(8) < 2
    em_t5 = np.arange(12) < 1
    sha = write_empty_caption(
        root, spec, clip_ids=np.where(em_clip, 3, 0).astype(np.int32), clip_mask=em_clip,
        clip_states=(rng.standard_normal((8, 32)) * em_clip[:, None]).astype(np.float32),
        t5_ids=np.where(em_t5, 2, 1).astype(np.int32), t5_mask=em_t5,
        t5_states=rng.standard_normal((12, 48)).astype(np.float16),
    )
    m = manifest_from_shards(root, spec, vae_scaling_factor=scaling_factor, buckets=[list(b) for b in buckets],
                             empty_caption_sha256=sha, encoders=encoders or {})
    write_manifest(root, m)
    return root


def tiny_overrides(cache: Path, run_dir: Path, **extra) -> list[str]:
    """Overrides for configs/train/demo.yaml that make a fast deterministic CPU run."""
    base = {
        "data.cache": str(cache), "run_dir": str(run_dir), "data.num_workers": 0, "data.batch_size": 2,
        "logging.every": 1, "logging.tensorboard": False, "logging.progress_bar": False, "checkpoint.every": 0,
        "checkpoint.resume": "", "device": "cpu", "precision.mode": "fp32",
        # the synthetic cache's text sizes, whatever the preset's model overrides say
        "model.overrides.text_len": TINY_TEXT["clip_len"], "model.overrides.text_states_dim": TINY_TEXT["clip_dim"],
        "model.overrides.text_len_t5": TINY_TEXT["t5_len"], "model.overrides.text_states_dim_t5": TINY_TEXT["t5_dim"],
    }
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
