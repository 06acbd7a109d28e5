"""Stage 2's sample index at scale: open_cache time and memory, plan construction, per-worker memory after an epoch.

For each N (default 10^5 and 10^6) this writes a synthetic webdataset cache of N samples in 2048-sample shards with
the project's real index files, sidecars and manifest (shared.shard_index / shared.manifest, the files the readers
use), but zero-size payloads: the tar files are empty and the member offsets fake, since only the index is measured.
Buckets are drawn from 8 resolution buckets, keys look like stage 1's (`{stem}-{row:08d}-{md5[:12]}`).

Each measurement runs in a fresh process (so RSS is not polluted by the previous one):
  * rank:   open_cache + BucketBatchPlan (numpy) + the first epoch's plan, as CacheBatchSource.from_config does;
            time, RSS growth (VmRSS after minus before, torch/numpy already imported) and peak growth (VmHWM), and the
            pickled size of the CacheDataset that DataLoader workers receive.
  * worker: 2 forked workers (what a DataLoader does on Linux) each do the index work of every read of their share
            of one epoch for rank 0 of 8 (batch 32): global position -> shard, open the shard reader, key and member
            offsets from the mapped index. Reported: private dirty memory growth per worker (anonymous pages the
            worker wrote: copy-on-write faults from refcounts, its own arrays) and, for transparency, private clean
            growth (index pages of the page cache that only this process maps at that moment: shared by the kernel
            and reclaimable, not a per-worker cost).
The old layout (per-sample JSON sidecars, read by the code of commit LEGACY_REV, taken from git into a temporary
package) is measured the same way as the baseline, at --baseline-n sizes; where git or that commit is missing the
baseline is skipped and the issue's table applies (10^5: 0.41 s, 100 MiB RSS, 106 MiB worker; 10^6: 4.55 s,
1037 MiB, 671 MiB worker).

    python bench/scale.py [--n 100000 1000000] [--baseline-n 100000 1000000] [--out /tmp/scale_bench]

Headline (last line): `index_rank_rss_mib_at_1e6 = <RSS growth of a rank at the largest N> (goal <= 64)`; the lines
before it give open + plan time (goal <= 1 s) and worker private memory (goal <= 16 MiB).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LEGACY_REV = "641d291"  # the last commit with per-sample JSON sidecars
PER_SHARD = 2048
BUCKETS = [(1024, 1024), (768, 1280), (1280, 768), (896, 1152), (1152, 896), (640, 1536), (1536, 640), (512, 512)]
WORLD, BATCH, WORKERS = 8, 32, 2
MIB = 2**20


# ----------------------------------------------------------------------------------------------------------------------
# synthetic caches


def _shard_lists(n: int, s: int, rng) -> dict:
    import numpy as np

    rows = range(s * PER_SHARD, s * PER_SHARD + n)
    keys = [f"laion_part{s % 97:03d}-{r:08d}-{hashlib.md5(str(r).encode()).hexdigest()[:12]}" for r in rows]
    b = np.asarray(BUCKETS, dtype=np.int32)[rng.integers(0, len(BUCKETS), n)]
    clip = rng.integers(3, 78, n).astype(np.int32)
    t5 = rng.integers(2, 257, n).astype(np.int32)
    f = 10
    sizes = np.zeros((n, f), dtype=np.int64)  # zero-size payloads; offsets as a tar would space 512-byte headers
    offs = (np.arange(n * f, dtype=np.int64) * 512 + 512).reshape(n, f)
    return {
        "keys": keys,
        "buckets": b,
        "clip_lens": clip,
        "t5_lens": t5,
        "t5_unique": np.minimum(t5, 40),
        "member_offset": offs,
        "member_size": sizes,
    }


def _spec():
    from shared.schema import CacheSpec

    return CacheSpec(format="webdataset", clip_len=77, clip_dim=1024, t5_len=256, t5_dim=2048)


def write_new(root: Path, n_total: int) -> None:
    import numpy as np

    from shared.fsutil import atomic_write_bytes, atomic_write_json
    from shared.manifest import (
        Manifest,
        ShardInfo,
        shard_data_path,
        shard_index_path,
        shard_sidecar_path,
        write_manifest,
    )
    from shared.shard_index import INDEX_SUFFIX, INDEX_VERSION, encode_index, index_columns
    from shared.wds_store import ALL_FIELDS

    rng = np.random.default_rng(0)
    entries = []
    for s in range((n_total + PER_SHARD - 1) // PER_SHARD):
        n = min(PER_SHARD, n_total - s * PER_SHARD)
        name = f"part-{s:06d}"
        d = _shard_lists(n, s, rng)
        data = encode_index(
            n,
            index_columns(
                d["keys"],
                d["buckets"],
                d["clip_lens"],
                d["t5_lens"],
                d["t5_unique"],
                d["member_offset"],
                d["member_size"],
            ),
            list(ALL_FIELDS),
        )
        shard_data_path(root, name, "webdataset").parent.mkdir(parents=True, exist_ok=True)
        shard_data_path(root, name, "webdataset").write_bytes(b"")
        atomic_write_bytes(shard_index_path(root, name), data)
        info = ShardInfo(
            name=name,
            format="webdataset",
            n_samples=n,
            bytes=0,
            sha256=hashlib.sha256(b"").hexdigest(),
            field_bytes={"moments": 65536 * n},
            index={
                "file": name + INDEX_SUFFIX,
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
                "version": INDEX_VERSION,
            },
        )
        atomic_write_json(shard_sidecar_path(root, name), info.to_dict())
        entries.append(info.entry())
    write_manifest(
        root, Manifest(spec=_spec(), shards=entries, vae_scaling_factor=0.13025, buckets=[list(b) for b in BUCKETS])
    )


def write_old(root: Path, n_total: int) -> None:
    """The old layout: indent=1 JSON sidecars with every per-sample list, as the old writers wrote them."""
    import numpy as np

    from shared.fsutil import atomic_write_json
    from shared.wds_store import ALL_FIELDS

    rng = np.random.default_rng(0)
    entries = []
    (root / "shards").mkdir(parents=True, exist_ok=True)
    for s in range((n_total + PER_SHARD - 1) // PER_SHARD):
        n = min(PER_SHARD, n_total - s * PER_SHARD)
        name = f"part-{s:06d}"
        d = _shard_lists(n, s, rng)
        (root / "shards" / f"{name}.tar").write_bytes(b"")
        info = {
            "name": name,
            "format": "webdataset",
            "n_samples": n,
            "bytes": 0,
            "sha256": hashlib.sha256(b"").hexdigest(),
            "keys": d["keys"],
            "buckets": d["buckets"].tolist(),
            "clip_lens": d["clip_lens"].tolist(),
            "t5_lens": d["t5_lens"].tolist(),
            "t5_unique": d["t5_unique"].tolist(),
            "field_bytes": {"moments": 65536 * n},
            "members": {
                f: {"offset": d["member_offset"][:, j].tolist(), "size": d["member_size"][:, j].tolist()}
                for j, f in enumerate(ALL_FIELDS)
            },
            "schema_version": 1,
        }
        atomic_write_json(root / "shards" / f"{name}.json", info)
        entries.append({"name": name, "n_samples": n, "bytes": 0, "sha256": info["sha256"]})
    from shared.manifest import Manifest

    m = Manifest(
        spec=_spec(),
        shards=entries,
        vae_scaling_factor=0.13025,
        buckets=[list(b) for b in BUCKETS],
        created_utc="2026-01-01T00:00:00Z",
    ).to_dict()
    atomic_write_json(root / "manifest.json", m)


def legacy_package(dest: Path) -> bool:
    """Put the old shared/ (as package legacy_shared) and stage2_train/data.py (legacy_data) under dest."""
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "archive", LEGACY_REV, "shared", "stage2_train/data.py"],
            capture_output=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return False
    import io
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(out)) as tf:
        tf.extractall(dest, filter="data")
    (dest / "shared").rename(dest / "legacy_shared")
    (dest / "stage2_train" / "data.py").rename(dest / "legacy_data.py")
    return True


# ----------------------------------------------------------------------------------------------------------------------
# measurements (each in its own process)


def _proc_kib(field: str, path: str = "/proc/self/status") -> int:
    for line in open(path):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _private_kib() -> tuple[int, int]:
    dirty = clean = 0
    for line in open("/proc/self/smaps_rollup"):
        if line.startswith("Private_Dirty:"):
            dirty = int(line.split()[1])
        elif line.startswith("Private_Clean:"):
            clean = int(line.split()[1])
    return dirty, clean


def _worker(conn, touch, items) -> None:
    d0, c0 = _private_kib()
    touch(items)
    d1, c1 = _private_kib()
    conn.send({"private_dirty_mib": (d1 - d0) / 1024, "private_clean_mib": (c1 - c0) / 1024})
    conn.close()


def _fork_workers(touch, plan_rows) -> list[dict]:
    """WORKERS forked processes; worker w does the index work of batches w, w + WORKERS, ... (DataLoader order)."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    procs = []
    for w in range(WORKERS):
        parent, child = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_worker, args=(child, touch, plan_rows[w::WORKERS]))
        p.start()
        procs.append((p, parent))
    out = [conn.recv() for _, conn in procs]
    for p, _ in procs:
        p.join()
    return out


def child(kind: str, root: Path, legacy_dir: str) -> dict:
    import numpy as np
    import torch  # noqa: F401  (imported before the baseline reading, as in the trainer)

    if kind == "old":
        sys.path.insert(0, legacy_dir)
        from legacy_data import BucketBatchPlan, CacheDataset, DrawSettings
        from legacy_shared.cache import open_cache
    else:
        from shared.cache import open_cache
        from stage2_train.data import BucketBatchPlan, CacheDataset, DrawSettings
    rss0, hwm0 = _proc_kib("VmRSS"), _proc_kib("VmHWM")
    t0 = time.perf_counter()
    reader = open_cache(root)
    t_open = time.perf_counter() - t0
    t0 = time.perf_counter()
    if kind == "old":
        plan = BucketBatchPlan(
            [tuple(b) for b in reader.meta["bucket"].tolist()], batch_size=BATCH, world_size=WORLD, seed=0
        )
        plan.epoch_batches(0)
    else:
        plan = BucketBatchPlan(reader.buckets(), batch_size=BATCH, world_size=WORLD, seed=0)
        plan.epoch_arrays(0)
    t_plan = time.perf_counter() - t0
    rss1, hwm1 = _proc_kib("VmRSS"), _proc_kib("VmHWM")
    settings = DrawSettings(
        seed=0, random_flip=False, uncond_p=0.0, uncond_p_t5=0.0, num_timesteps=1000, scaling_factor=0.13025
    )
    pickled = len(pickle.dumps(CacheDataset(reader, settings)))
    rows = [np.asarray([i for _, _, i in plan.rank_items(step, 0)]) for step in range(plan.batches_per_epoch)]

    if kind == "old":
        from legacy_shared.wds_store import ALL_FIELDS

        def touch(items):
            for row in items:
                for g in row.tolist():
                    s, loc = int(reader._all["shard"][g]), int(reader._all["local"][g])
                    info = reader._readers[s].info
                    info.keys[loc], [int(info.members[f]["offset"][loc]) for f in ALL_FIELDS]
    else:

        def touch(items):
            for row in items:
                for g in row.tolist():
                    s, loc = reader.locate(g)
                    reader._reader(int(s)).members(int(loc))

    workers = _fork_workers(touch, rows)
    return {
        "open_s": t_open,
        "plan_s": t_plan,
        "rss_mib": (rss1 - rss0) / 1024,
        "peak_mib": max(0, hwm1 - max(hwm0, rss0)) / 1024,
        "pickle_mib": pickled / MIB,
        "worker_private_dirty_mib": max(w["private_dirty_mib"] for w in workers),
        "worker_private_clean_mib": max(w["private_clean_mib"] for w in workers),
        "samples_per_worker": sum(len(r) for r in rows) // WORKERS,
    }


def run_child(kind: str, root: Path, legacy_dir: str) -> dict:
    r = subprocess.run(
        [sys.executable, __file__, "--child", kind, "--root", str(root), "--legacy", legacy_dir],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    if r.returncode != 0:
        raise RuntimeError(f"{kind} measurement failed:\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--baseline-n", type=int, nargs="*", default=[100_000, 1_000_000])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--child", choices=["new", "old"], default=None)
    ap.add_argument("--root", type=Path, default=None)
    ap.add_argument("--legacy", default="")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.root, args.legacy)))
        return

    out = args.out or Path(tempfile.mkdtemp(prefix="scale_bench_"))
    out.mkdir(parents=True, exist_ok=True)
    legacy_dir = out / "legacy_code"
    shutil.rmtree(legacy_dir, ignore_errors=True)
    legacy_dir.mkdir()
    have_legacy = legacy_package(legacy_dir)
    if not have_legacy:
        print(f"(no git or no commit {LEGACY_REV}: the old layout is not measured; compare with the issue's table)")
    results = {}
    try:
        for n in args.n:
            for kind in ["new"] + (["old"] if have_legacy and n in args.baseline_n else []):
                root = out / f"{kind}-{n}"
                shutil.rmtree(root, ignore_errors=True)
                t0 = time.perf_counter()
                (write_new if kind == "new" else write_old)(root, n)
                t_write = time.perf_counter() - t0
                r = run_child(kind, root, str(legacy_dir))
                r["write_s"] = t_write
                r["index_mib_on_disk"] = (
                    sum(p.stat().st_size for p in (root / "shards").iterdir() if p.suffix in (".index", ".json")) / MIB
                )
                results[(kind, n)] = r
                print(
                    f"{kind:>3} N={n:>9,}: open {r['open_s']:.3f} s  plan {r['plan_s']:.3f} s  "
                    f"rank RSS +{r['rss_mib']:.1f} MiB (peak +{r['peak_mib']:.1f})  "
                    f"worker private dirty +{r['worker_private_dirty_mib']:.1f} MiB "
                    f"(clean +{r['worker_private_clean_mib']:.1f}, {r['samples_per_worker']:,} reads)  "
                    f"dataset pickle {r['pickle_mib']:.3f} MiB  index on disk {r['index_mib_on_disk']:.1f} MiB  "
                    f"(synthesis {t_write:.1f} s)",
                    flush=True,
                )
                shutil.rmtree(root, ignore_errors=True)
    finally:
        if args.out is None:
            shutil.rmtree(out, ignore_errors=True)
    big = max(args.n)
    r = results[("new", big)]
    old = results.get(("old", big))
    if old:
        print(
            f"at N={big:,}: open+plan {old['open_s'] + old['plan_s']:.2f} s -> {r['open_s'] + r['plan_s']:.3f} s, "
            f"rank RSS {old['rss_mib']:.0f} -> {r['rss_mib']:.1f} MiB, worker private "
            f"{old['worker_private_dirty_mib']:.0f} -> {r['worker_private_dirty_mib']:.1f} MiB, pickle "
            f"{old['pickle_mib']:.0f} -> {r['pickle_mib']:.3f} MiB"
        )
    print(f"open_plus_plan_s_at_{big:.0e} = {r['open_s'] + r['plan_s']:.3f} (goal <= 1)".replace("+0", ""))
    print(f"worker_private_mib_at_{big:.0e} = {r['worker_private_dirty_mib']:.1f} (goal <= 16)".replace("+0", ""))
    print(f"index_rank_rss_mib_at_{big:.0e} = {r['rss_mib']:.1f} (goal <= 64)".replace("+0", ""))


if __name__ == "__main__":
    main()
