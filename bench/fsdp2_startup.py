"""Host memory of FSDP2 start-up: today's full build on every rank vs the meta-device build (parallel.py).

    python bench/fsdp2_startup.py                      # DiT-g/2 (1.5B, 6 GB fp32), 2 CPU ranks (gloo), both modes
    python bench/fsdp2_startup.py --preset DiT-S/2 --modes meta

Each mode is one `torchrun --nproc_per_node N` run of this file (one after the other, never both at once: DiT-g/2's
full build is ~6 GB per rank). Every rank builds the model as the trainer does and wraps it in FSDP2:
  full: torch.manual_seed + HunYuanDiT(cfg) on CPU, then fully_shard (the code before the meta-device path)
  meta: parallel.build_parallel_model(fresh=True): meta build, fully_shard, to_empty, rank 0's seeded CPU build
        scattered with set_model_state_dict(broadcast_from_rank0=True)
  meta-resume: the same with fresh=False (what a resume from a DCP checkpoint costs before the load: shards only)
and reports its peak resident set (getrusage ru_maxrss: the high-water mark of the whole process, torch import
included) and the import baseline. The headline (last line) is the peak of the ranks other than 0, meta / full;
the line before gives rank 0's ratio and the whole job's sum. meta-resume's pages are allocated but untouched until
the checkpoint load writes them, so its RSS shows only what start-up itself costs.

Measured (2 CPU ranks, gloo, shared 2-core machine; peak RSS per rank incl. ~227 MiB of torch import):
  DiT-g/2 full         rank 0 6104 MiB, rank 1 6105 MiB   82.6 s
  DiT-g/2 meta         rank 0 6112 MiB, rank 1 3223 MiB  103.8 s   -> ranks >= 1: 0.53; job 12.2 -> 9.1 GiB
  DiT-g/2 meta-resume  rank 0  320 MiB, rank 1  320 MiB   40.4 s   (+ the shards the DCP load fills: ~2.9 GiB)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def worker(mode: str, preset: str) -> None:
    sys.path.insert(0, str(ROOT))
    import torch
    import torch.distributed as dist

    from pipeline.models import DiTConfig, HunYuanDiT
    from stage2_train.config import ParallelSection
    from stage2_train.parallel import apply_parallelism, build_parallel_model, init_distributed

    par = ParallelSection(strategy="fsdp2")
    info = init_distributed(par, "cpu")
    cfg = DiTConfig.from_name(preset)
    base = _peak_mib()
    t0 = time.perf_counter()
    if mode == "full":
        torch.manual_seed(1234)
        model = HunYuanDiT(cfg)
        model = apply_parallelism(model, par, info)
    else:
        model = build_parallel_model(lambda: HunYuanDiT(cfg), par, info, seed=1234, fresh=mode == "meta")
    dist.barrier()
    seconds = time.perf_counter() - t0
    local = sum(p.to_local().numel() for p in model.parameters())
    out = [None] * info.world_size
    dist.all_gather_object(
        out, {"rank": info.rank, "import_mib": base, "peak_mib": _peak_mib(), "local_params": local, "seconds": seconds}
    )
    if info.is_main:
        print("RESULT " + json.dumps(out), flush=True)
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="DiT-g/2")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--modes", default="full,meta,meta-resume")
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.preset)
        return
    peaks = {}
    for mode in args.modes.split(","):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        res = subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc_per_node",
                str(args.nproc),
                __file__,
                "--preset",
                args.preset,
                "--worker",
                mode,
            ],
            env=env,
            capture_output=True,
            text=True,
        )
        line = [x for x in res.stdout.splitlines() if x.startswith("RESULT ")]
        if res.returncode or not line:
            sys.exit(f"{mode}: torchrun failed ({res.returncode}):\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}")
        ranks = json.loads(line[0][len("RESULT ") :])
        for r in ranks:
            print(
                f"{args.preset} {mode:11s} rank {r['rank']}: peak RSS {r['peak_mib']:8.0f} MiB (after import "
                f"{r['import_mib']:.0f}), {r['local_params']:,} local params, {r['seconds']:.1f} s",
                flush=True,
            )
        peaks[mode] = [r["peak_mib"] for r in sorted(ranks, key=lambda r: r["rank"])]
    if "full" in peaks and "meta" in peaks:
        full, meta = peaks["full"], peaks["meta"]
        print(
            f"rank 0 (builds the seeded full model, sends it): meta / full = {meta[0] / full[0]:.2f}; whole job: "
            f"{sum(meta) / 1024:.1f} GiB vs {sum(full) / 1024:.1f} GiB"
        )
        others = max(meta[1:]) / max(full[1:])
        print(
            f"fsdp2_startup_peak_rss_ratio = {others:.2f} (ranks >= 1, meta / full; goal <= {1 / args.nproc + 0.1:.2f})"
        )


if __name__ == "__main__":
    main()
