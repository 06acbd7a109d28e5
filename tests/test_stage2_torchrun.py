"""`torchrun --nproc_per_node 2` on CPU (gloo): disjoint data per rank, identical replicas, checkpoint + resume
(DDP bit-exact; the same checkpoint under FSDP2); FSDP2's meta-device start-up, bf16 MixedPrecisionPolicy and
sharded (DCP) checkpoints resumed at 2 and at 1 rank."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from test_stage2_common import (
    ROOT,
    read_metrics,
    run_script,
    tiny_overrides,
    torchrun_cmd,
    write_synthetic_cache,
)


def _torchrun(*overrides: str, script: str = "stage2_train/train.py"):
    if script == "stage2_train/train.py":
        return run_script(torchrun_cmd(*overrides), timeout=300)
    return run_script(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script], timeout=300
    )


def _one_rank_in_process(*overrides: str) -> subprocess.CompletedProcess:
    """train.py's main() in this process, a world of one (no torchrun variables here), with one thread as the CLI runs
    under OMP_NUM_THREADS=1: the same code as `python stage2_train/train.py` without a second interpreter start
    (torch, and the dynamo import that torch.optim's first use pulls in: seconds on a loaded 2-core runner)."""
    from stage2_train.train import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rc = main(["--config", str(ROOT / "configs" / "train" / "demo.yaml"), *overrides])
    finally:
        torch.set_num_threads(threads)
    return subprocess.CompletedProcess(["stage2_train/train.py", *overrides], rc, "", "")


@pytest.mark.slow
@pytest.mark.exact
def test_two_ranks_disjoint_identical_and_resumable(tmp_path):
    from safetensors.torch import load_file

    cache = write_synthetic_cache(tmp_path / "cache", n=12, fmt="webdataset")
    a = tmp_path / "a"
    common = {"data.num_workers": 1, "checkpoint.every": 2, "checkpoint.keep_last": 0}
    res = _torchrun(*tiny_overrides(cache, a, steps=4, **common, **{"logging.record_samples": True}))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    # each rank read its own samples; the 4 steps are one epoch (2 buckets x 6 samples, global batch 4)
    per_rank = [
        [json.loads(line) for line in (a / "samples" / f"rank_{r:05d}.jsonl").read_text().splitlines()]
        for r in range(2)
    ]
    assert [len(x) for x in per_rank] == [4, 4]
    for r0, r1 in zip(*per_rank):
        assert r0["step"] == r1["step"] and not set(r0["key"]) & set(r1["key"])
    assert len({k for rank in per_rank for rec in rank for k in rec["key"]}) == 12

    digests = json.loads((a / "replica_digests.json").read_text())
    assert len(digests) == 2 and digests[0] == digests[1]

    # resume the step-2 checkpoint with 2 ranks: steps 3-4 are bit-identical to the uninterrupted run
    b = tmp_path / "b"
    (b / "checkpoints").mkdir(parents=True)
    shutil.copytree(a / "checkpoints" / "step_0000002", b / "checkpoints" / "step_0000002")
    res = _torchrun(*tiny_overrides(cache, b, steps=4, **common, **{"checkpoint.resume": "auto"}))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "resumed from" in res.stdout
    la = {m["step"]: m["loss"] for m in read_metrics(a)}
    lb = {m["step"]: m["loss"] for m in read_metrics(b)}
    assert sorted(lb) == [3, 4] and [lb[3], lb[4]] == [la[3], la[4]]
    wa = load_file(a / "checkpoints" / "step_0000004" / "model.safetensors")
    wb = load_file(b / "checkpoints" / "step_0000004" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)

    # the same DDP checkpoint resumed under FSDP2 (+ activation checkpointing): one checkpoint format for both;
    # FSDP2 reduces gradients differently (reduce-scatter), so equal up to float rounding (bounds below)
    c = tmp_path / "c"
    (c / "checkpoints").mkdir(parents=True)
    shutil.copytree(a / "checkpoints" / "step_0000002", c / "checkpoints" / "step_0000002")
    res = _torchrun(
        *tiny_overrides(
            cache,
            c,
            steps=4,
            **common,
            **{"checkpoint.resume": "auto", "parallel.strategy": "fsdp2", "parallel.activation_checkpointing": True},
        )
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    lc = {m["step"]: m["loss"] for m in read_metrics(c)}
    assert sorted(lc) == [3, 4]
    wc = load_file(c / "checkpoints" / "step_0000004" / "model.safetensors")
    assert set(wc) == set(wa)
    # Loss at step 3 comes from the checkpoint's weights through the same kernels (FSDP2 all-gathers the same fp32
    # values): exact by construction. The step-3/4 updates differ in rounding only (the sharded grad-norm for
    # clipping sums in another order, the optimizer runs on shards): measured, 6% of the weights differ, by at most
    # 3.3e-7 = 1.1e-3 * lr, and the step-4 loss was bit-identical. A real divergence (a lost rank gradient,
    # unsynchronised replicas, a wrong shard mapping) moves Adam updates by O(lr) on most weights. So: step-4 loss
    # within 1e-6 relative, weights within 1e-2 * lr per step since the resume (2 steps).
    assert lc[3] == la[3]
    torch.testing.assert_close(lc[4], la[4], rtol=1e-6, atol=0)
    weight_atol = 1e-2 * 3e-4 * 2  # lr of configs/train/demo.yaml
    worst = max((wa[k] - wc[k]).abs().max().item() for k in wa)
    assert worst < weight_atol, (worst, weight_atol)
    ema = load_file(c / "checkpoints" / "step_0000004" / "ema.safetensors")
    assert set(ema) == set(wa)


@pytest.mark.slow
def test_fsdp2_meta_init_and_bf16_policy_are_exact():
    """tests/fsdp2_check.py: meta-device start-up gives the seeded full build's weights bit for bit, and the bf16
    MixedPrecisionPolicy (fp32 norms and root) gives the same loss and gradients as fp32 weights under autocast."""
    res = _torchrun(script="tests/fsdp2_check.py")
    assert res.returncode == 0 and "fsdp2 check ok" in res.stdout, res.stdout[-3000:] + res.stderr[-5000:]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")  # DCP's note on the 1-rank load
def test_fsdp2_sharded_checkpoint_resumes_on_two_and_one_ranks(tmp_path):
    """A DCP checkpoint written by 2 FSDP2 ranks, resumed on 2 ranks and on 1 rank (plain process).

    2 -> 2: the same shards, shapes and reductions as the uninterrupted run: bit-identical losses and weights.
    2 -> 1: the same global batches (data.global_batch_size=4: the plan depends on the global batch only, and every
    draw on the sample), but one process computes what two did: the forward runs on a batch of 4 instead of 2 (GEMMs
    may block differently), the loss is one fp32 mean of 4 instead of the float64 mean of two fp32 means of 2, and
    the gradient is one backward instead of a reduce-scatter of two halves. Each of these changes a value by a few
    fp32 ulps: a dot product of length K changes by at most ~K*u (u = 2**-24 = 6e-8; K <= 4*64 = 256 in DiT-tiny/2:
    1.5e-5 worst case, ~sqrt(K)*u = 1e-6 typically). After one AdamW step at lr 3e-4 such relative gradient changes
    move weights by ~lr * 1e-6 = 3e-10 (Adam normalises the gradient), far below the forward's own rounding.
    So the two resumed losses agree to ~1e-6 relative; rtol=1e-5 (the bound of one worst-case dot product) leaves
    room for CPUs with other SIMD widths, and atol=0 (the losses are ~0.4, far from 0). Weights: 1e-6 absolute.
    Measured here: 2.6e-8 and 5.5e-8 relative.
    """
    from safetensors.torch import load_file

    from stage2_train.checkpointing import STATE_FILE, resolve_resume

    cache = write_synthetic_cache(tmp_path / "cache", n=12, fmt="webdataset")
    common = {
        "data.global_batch_size": 4,
        "checkpoint.every": 2,
        "checkpoint.keep_last": 0,
        "parallel.strategy": "fsdp2",
    }
    a = tmp_path / "a"
    # no consolidated export in the uninterrupted run: resuming needs nothing but dcp/
    res = _torchrun(*tiny_overrides(cache, a, steps=4, **common, **{"checkpoint.consolidated": False}))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    step2 = a / "checkpoints" / "step_0000002"
    state = json.loads((step2 / STATE_FILE).read_text())
    # each rank wrote its own shard file; the sha256 index covers them; nothing gathered on rank 0
    assert state["layout"] == "dcp"
    assert {"dcp/.metadata", "dcp/__0_0.distcp", "dcp/__1_0.distcp", "rng/rank_00001.safetensors"} <= set(
        state["files"]
    )
    assert not any((step2 / f).exists() for f in ("model.safetensors", "ema.safetensors", "optimizer.safetensors"))

    la = {m["step"]: m["loss"] for m in read_metrics(a)}
    runs = {}
    for name, launch in (("b", _torchrun), ("c", _one_rank_in_process)):
        run = tmp_path / name
        (run / "checkpoints").mkdir(parents=True)
        shutil.copytree(step2, run / "checkpoints" / step2.name)
        res = launch(*tiny_overrides(cache, run, steps=4, **{**common, "checkpoint.resume": "auto"}))
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        # b logs it; both prove it by their metrics, which hold steps 3-4 only (asserted below)
        assert name == "c" or "resumed from" in res.stdout + res.stderr
        runs[name] = (
            {m["step"]: m["loss"] for m in read_metrics(run)},
            load_file(run / "checkpoints" / "step_0000004" / "model.safetensors"),
        )
    (lb, wb), (lc, wc) = runs["b"], runs["c"]
    assert sorted(lb) == sorted(lc) == [3, 4]
    assert [lb[3], lb[4]] == [la[3], la[4]]
    torch.testing.assert_close([lc[3], lc[4]], [la[3], la[4]], rtol=1e-5, atol=0)
    # b's consolidated export (gathered from the shards) against c's single-process weights
    assert set(wc) == set(wb) and max((wb[k] - wc[k]).abs().max().item() for k in wb) < 1e-6
    assert (tmp_path / "b" / "checkpoints" / "step_0000004" / "ema.safetensors").is_file()
    # the 1-rank run wrote the consolidated layout, which a later FSDP2 run reads as before
    assert json.loads((tmp_path / "c" / "checkpoints" / "step_0000004" / STATE_FILE).read_text()).get("layout") is None

    # verified fallback: a damaged DCP shard of the newest checkpoint is named, and resume=auto takes the one before
    shard = a / "checkpoints" / "step_0000004" / "dcp" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert resolve_resume("auto", a / "checkpoints") == step2
