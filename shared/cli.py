"""`python -m shared.cli inspect|verify|upgrade-index CACHE` (installed as `hydit-cache`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .cache import open_cache
from .storage import is_remote
from .upgrade_index import upgrade_index
from .verify import report_json, verify_cache

HELP = """Inspect or verify a feature cache written by stage 1 (a folder with manifest.json and shards/).

  inspect CACHE                      print samples, buckets, token lengths, bytes per sample by field, rejects
  inspect CACHE --grid g.png --vae ckpts/t2i/sdxl-vae-fp16-fix
                                     also decode a few samples through the VAE into a captioned PNG grid
  verify CACHE                       re-read every shard: sha256 against the manifest, every sample's crc and
                                     schema, the empty-caption file, leftover temp files; exits 1 naming the bad
                                     shard and sample, 0 if all is well
  upgrade-index CACHE                convert a cache written before the columnar index (per-sample JSON sidecars)
                                     in place: writes shards/<name>.index, slims the sidecars, updates the
                                     manifest; shards are not touched; safe to re-run after an interruption
"""


def _parse_bucket(s: str) -> tuple[int, int]:
    try:
        h, w = s.lower().split("x")
        return int(h), int(w)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bucket must look like 1024x768 (HxW), got {s!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hydit-cache", description=HELP, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    pi = sub.add_parser(
        "inspect",
        help="summary of a cache (and an optional grid of decoded samples)",
        description="Print a summary of a cache; with --grid and --vae also decode samples "
        "(posterior mean through the VAE decoder) into a captioned PNG grid. Exit 2 if the cache "
        "cannot be opened.",
    )
    pi.add_argument(
        "cache",
        type=_cache_arg,
        help="the cache folder (holds manifest.json and shards/) or its "
        "s3://bucket/prefix URL (endpoint from AWS_ENDPOINT_URL)",
    )
    pi.add_argument("--grid", type=Path, default=None, help="write a PNG grid of decoded samples here")
    pi.add_argument("--vae", type=Path, default=None, help="AutoencoderKL folder used to decode (needed for --grid)")
    pi.add_argument("-n", "--num", type=int, default=8, help="samples in the grid (default 8)")
    pi.add_argument("--bucket", type=_parse_bucket, default=None, help="only samples of this bucket, HxW")
    pv = sub.add_parser(
        "verify",
        help="check every shard and sample; non-zero exit on any problem",
        description="Re-read every shard listed in manifest.json: sha256 and size, every sample's "
        "crc (CRC-32C per part; crc32 in old caches) and shapes, the empty-caption file; warn about leftover "
        "temp files and unlisted shards. Exit 0 if all is well, 1 naming each bad shard and sample, 2 if CACHE is "
        "not a folder.",
    )
    pv.add_argument(
        "cache",
        type=_cache_arg,
        help="the cache folder (holds manifest.json and shards/) or its "
        "s3://bucket/prefix URL (downloaded whole to a temporary folder)",
    )
    pv.add_argument("--no-progress", action="store_true", help="no progress bar")
    pv.add_argument("--json", action="store_true", help="print the report as JSON")
    pu = sub.add_parser(
        "upgrade-index",
        help="convert an old-layout cache (per-sample JSON sidecars) in place",
        description="Write each shard's columnar index file from its old JSON sidecar, replace the "
        "sidecar by the per-shard one, and add index_sha256 to the manifest's entries. Shards are "
        "not read or changed. Exit 0 when done, 2 if CACHE is not a cache folder.",
    )
    pu.add_argument("cache", type=Path, help="the cache folder (holds manifest.json and shards/)")
    return p


def _cache_arg(value: str):
    return value if is_remote(value) else Path(value)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd == "verify":
        try:
            rep = verify_cache(args.cache, progress=not args.no_progress)
        except OSError as e:  # a missing folder or object, or the store failing after its retries
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(report_json(rep) if args.json else str(rep))
        return 0 if rep.ok else 1

    if args.cmd == "upgrade-index":
        try:
            upgrade_index(args.cache)
        except (FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0

    try:
        cache = open_cache(args.cache, vae=args.vae)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.bucket is not None:
        cache = cache.filter(bucket=args.bucket)
    print(cache.summary())
    if args.grid is not None:
        if args.vae is None:
            print(
                "error: --grid needs --vae PATH (the AutoencoderKL folder, e.g. ckpts/t2i/sdxl-vae-fp16-fix)",
                file=sys.stderr,
            )
            return 2
        n = min(args.num, len(cache))
        idx = [int(round(i * (len(cache) - 1) / max(1, n - 1))) for i in range(n)] if n else []
        try:
            cache.grid(idx).save(args.grid)
        except ValueError as e:  # CorruptSampleError names the shard and sample
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"wrote {args.grid} ({n} samples):")
        for i in idx:
            key, caption = cache.meta["key"][i], cache[i]["caption"]
            print(f"  {key}  {caption}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
