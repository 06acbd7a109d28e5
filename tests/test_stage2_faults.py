"""Fault injection against stage 2 (issue 11), through the real CLI with a loader worker (data.num_workers=1):

- SIGKILL at random moments (between steps, inside a checkpoint write) over several trials, each followed by a resume;
  the final weights equal an uninterrupted run's bit for bit, and metrics.jsonl holds each step once;
- a damage battery (flipped byte, truncation, deletion, swapped shards, edited manifest fields, damaged checkpoints,
  and a corrupt sample under torchrun): each ends in a clear exit naming the file, or a verified fallback, within
  60 s of the failure and never in a hang.

Each case prints one row of the table "fault | trials | outcome" (run with -s to see it).
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from test_stage2_common import ROOT, read_metrics, tiny_overrides, torchrun_cmd, train_cmd, write_synthetic_cache
from test_stage2_reliability import (
    CACHE_DAMAGE,
    VAE_FP,
    _cfg,
    _train,
    biggest_chunk,
    copy_cache,
    flip_byte,
    run_bounded,
)

pytestmark = pytest.mark.slow

STEPS = 12
# How long a damaged run may take from start to exit: start-up (seconds on an idle machine, much more on a loaded
# 2-core CI runner) plus the 60 s the issue allows between the failure and the exit.
BOUND_S = 150


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return write_synthetic_cache(tmp_path_factory.mktemp("faults") / "cache", n=12, encoders=VAE_FP)


def _weights(step_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(step_dir / "model.safetensors")


def test_sigkill_at_random_moments_then_resume_gives_identical_weights(cache, tmp_path):
    common = {"checkpoint.every": 2, "checkpoint.keep_last": 2, "data.num_workers": 1}
    _train(_cfg(cache, tmp_path / "ref", steps=STEPS, **{**common, "data.num_workers": 0}))

    run = tmp_path / "killed"
    rng = random.Random(11)
    ckpts = run / "checkpoints"
    outcomes = []
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for trial in range(6):
        mode = "in checkpoint write" if trial % 2 == 0 else "between steps"
        args = train_cmd(*tiny_overrides(cache, run, steps=STEPS, **{**common, "checkpoint.resume": "auto"}))
        before = len(read_metrics(run)) if (run / "metrics.jsonl").exists() else 0
        proc = subprocess.Popen(
            args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.monotonic() + BOUND_S
        if mode == "between steps":
            wait_lines = rng.randint(1, 2)
            while (
                proc.poll() is None
                and time.monotonic() < deadline
                and (not (run / "metrics.jsonl").exists() or len(read_metrics(run)) < before + wait_lines)
            ):
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.05))
        else:  # the moment a step folder's temp name appears: the save is under way
            while (
                proc.poll() is None
                and time.monotonic() < deadline
                and not (ckpts.is_dir() and any(p.name.startswith(".tmp-") for p in ckpts.iterdir()))
            ):
                time.sleep(0.001)
        landed = (
            "inside a write"
            if ckpts.is_dir() and any(p.name.startswith(".tmp-") for p in ckpts.iterdir())
            else "between steps"
        )
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        outcomes.append((mode, landed, proc.returncode))
        if proc.returncode == 0:
            break  # finished before the kill: nothing left to interrupt
    killed = [o for o in outcomes if o[2] == -signal.SIGKILL]
    assert len(killed) >= 5, outcomes

    res = _train(_cfg(cache, run, steps=STEPS, **{**common, "data.num_workers": 0, "checkpoint.resume": "auto"}))
    assert res["step"] == STEPS
    wa, wb = _weights(tmp_path / "ref" / "checkpoints" / f"step_{STEPS:07d}"), _weights(ckpts / f"step_{STEPS:07d}")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    ma, mb = read_metrics(tmp_path / "ref"), read_metrics(run)
    assert [m["step"] for m in mb] == list(range(1, STEPS + 1))  # each step once, after 6 kills
    assert [m["loss"] for m in mb] == [m["loss"] for m in ma]
    inside = sum(1 for o in killed if o[1] == "inside a write")
    print(
        f"\n| SIGKILL at random moments, then resume=auto | {len(killed)} ({inside} inside a checkpoint write) "
        f"| final weights bit-identical to the uninterrupted run, each step once in metrics.jsonl |"
    )


def _battery_cli(cache: Path, run: Path, **extra) -> tuple[int | None, str, float]:
    args = train_cmd(*tiny_overrides(cache, run, steps=6, **{"data.num_workers": 1, **extra}))
    return run_bounded(args, timeout=BOUND_S)


# Through the CLI: three of the cache damages (test_stage2_reliability checks all of them in-process, faster).
@pytest.mark.parametrize("damage", ["deleted shard", "swapped shards", "edited vae_scaling_factor"])
def test_damaged_cache_exits_naming_the_file(cache, tmp_path, damage):
    c = copy_cache(cache, tmp_path / "cache")
    named = CACHE_DAMAGE[damage](c)
    rc, out, took = _battery_cli(c, tmp_path / "run")
    assert rc is not None, f"hung:\n{out[-2000:]}"
    assert rc == 2 and named in out and "Traceback" not in out, out[-2000:]
    print(f"\n| {damage} | 1 | exit {rc} in {took:.1f} s naming {named!r}, no traceback |")


def test_flipped_sample_byte_mid_run_exits_naming_shard_and_sample(cache, tmp_path):
    c = copy_cache(cache, tmp_path / "cache")
    flip_byte(biggest_chunk(c / "shards" / "part-00001.zarr"))
    rc, out, took = _battery_cli(c, tmp_path / "run", **{"data.max_corrupt_samples": 0})
    assert rc is not None, f"hung:\n{out[-2000:]}"
    assert rc == 1 and re.search(r"shard 'part-00001' sample 'syn-", out), out[-2000:]
    print(
        f"\n| flipped byte in a shard (met mid-run, limit 0) | 1 | exit {rc} in {took:.1f} s naming shard and sample |"
    )


def test_flipped_sample_byte_under_torchrun_exits_on_every_rank(cache, tmp_path):
    c = copy_cache(cache, tmp_path / "cache")
    flip_byte(biggest_chunk(c / "shards" / "part-00001.zarr"))
    args = torchrun_cmd(
        *tiny_overrides(c, tmp_path / "run", steps=20, **{"data.num_workers": 1, "data.max_corrupt_samples": 0})
    )
    rc, out, took = run_bounded(args, timeout=2 * BOUND_S)
    assert rc is not None, f"hung:\n{out[-3000:]}"
    assert rc != 0 and "shard 'part-00001' sample 'syn-" in out, out[-3000:]
    print(
        f"\n| flipped byte in a shard, torchrun x2 ranks | 1 | torchrun exit {rc} in {took:.1f} s (both ranks "
        "gone), the failing rank names shard and sample |"
    )


@pytest.mark.parametrize("what", ["flipped byte in model.safetensors", "truncated trainer_state.json"])
def test_damaged_checkpoint_falls_back_to_a_verified_one(cache, tmp_path, what):
    run = tmp_path / "run"
    _train(_cfg(cache, run, steps=4, **{"checkpoint.every": 2, "checkpoint.keep_last": 0}))
    newest = run / "checkpoints" / "step_0000004"
    if what.startswith("flipped"):
        flip_byte(newest / "model.safetensors")
    else:
        f = newest / "trainer_state.json"
        f.write_text(f.read_text()[:30])
    rc, out, took = _battery_cli(cache, run, **{"checkpoint.resume": "auto", "checkpoint.every": 2})
    assert rc == 0, out[-2000:]
    assert "skipping step_0000004" in out and "resumed from" in out and "step_0000002" in out, out[-2000:]
    print(
        f"\n| damaged checkpoint: {what} | 1 | resume=auto skipped step_0000004 (named the file), resumed "
        f"step_0000002, exit 0 in {took:.1f} s |"
    )
