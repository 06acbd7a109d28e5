"""Bytes per sample of the cache layout vs the naive exact layout, and read throughput of both formats.

Geometry: 1024x1024 images (latent 4x128x128, moments 8x128x128), BERT 77x1024, mT5 256x2048, all fp16 in both
layouts so only the layout differs. Naive exact layout = dense moments + all 77 BERT rows + all 256 mT5 rows, raw
fp16 (1,468,416 bytes; ids/masks not even counted, which flatters the naive side).

What is real and what is synthetic (read this before quoting the numbers):
  * mT5 states: a real T5EncoderModel forward (transformers) at mT5-XL width (d_model 2048) with mT5's relative
    attention (32 buckets, max distance 128, bidirectional, gated-gelu), random weights, 2 layers, computed in fp32
    and cast to fp16 (the original runs mT5 in fp16). Token ids are random, padded with id 1 / mask 0 exactly like
    the original's T5 tokenisation. So the padded-row duplication pattern is the genuine relative-attention one;
    the values are a random-weight encoder's, not mT5-XL's.
  * Caption lengths: assumed, not measured (no corpus here). BERT-Chinese tokenises per character, so
    Lc = chars + 2 ~ round(N(40, 15)) clipped to [3, 77]; mT5's sentencepiece merges CJK characters, so
    Lt ~ round(0.7 * (Lc - 2) + 1 + N(0, 3)) clipped to [2, 256]. A long-caption case (Lc = 77, Lt ~ 85) is shown
    too.
  * VAE moments and BERT states: i.i.d. Gaussian fp16, i.e. incompressible. Real latents (smooth mean, near-flat
    logvar) compress better, so the ratio here is pessimistic on that part.
Throughput is on whatever disk holds --out, with the files in the page cache (just written): cache[i] in one
process, and a DataLoader with 2 workers and batches of 8 (default collate), both with full decode to logical
samples (crc check, dense BERT, all 256 mT5 rows), compared with a single-process sequential read of the same
files (which decodes nothing).

    python bench/cache_size.py [--n 48] [--out /tmp/cache_bench] [--seed 0]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared.cache import open_cache, open_shard_writer, write_empty_caption  # noqa: E402
from shared.manifest import manifest_from_shards, write_manifest  # noqa: E402
from shared.schema import CacheSpec  # noqa: E402

H = W = 1024
LC, DC, LT, DT, C = 77, 1024, 256, 2048, 4
NAIVE = (2 * C * (H // 8) * (W // 8) + LC * DC + LT * DT) * 2


def caption_lengths(n: int, rng: np.random.Generator, long: bool = False) -> tuple[np.ndarray, np.ndarray]:
    if long:
        lc = np.full(n, LC)
        lt = np.clip(np.round(85 + rng.normal(0, 8, n)), 2, LT).astype(int)
        return lc, lt
    lc = np.clip(np.round(rng.normal(40, 15, n)), 3, LC).astype(int)
    lt = np.clip(np.round(0.7 * (lc - 2) + 1 + rng.normal(0, 3, n)), 2, LT).astype(int)
    return lc, lt


def t5_states(lengths: np.ndarray, seed: int) -> np.ndarray:
    """(n, 256, 2048) fp16 hidden states of a random-weight T5 encoder with mT5's relative attention."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    cfg = T5Config(
        vocab_size=1024,
        d_model=DT,
        d_kv=64,
        d_ff=1024,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
    )
    model = T5EncoderModel(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    out = []
    for chunk in np.array_split(lengths, max(1, len(lengths) // 8)):
        ids = torch.ones(len(chunk), LT, dtype=torch.long)  # pad id 1 (= </s>), as the original trainer
        mask = torch.zeros(len(chunk), LT, dtype=torch.long)
        for k, L in enumerate(chunk):
            ids[k, : L - 1] = torch.randint(2, 1024, (int(L) - 1,), generator=g)
            mask[k, :L] = 1
        with torch.inference_mode():
            h = model(input_ids=ids, attention_mask=mask).last_hidden_state
        out.append(h.to(torch.float16).numpy())
    return np.concatenate(out)


def make_samples(n: int, seed: int, long: bool = False) -> list[dict]:
    rng = np.random.default_rng(seed)
    lc, lt = caption_lengths(n, rng, long)
    t5 = t5_states(lt, seed)
    samples = []
    for i in range(n):
        cm = np.arange(LC) < lc[i]
        clip = rng.standard_normal((LC, DC), dtype=np.float32).astype(np.float16)
        clip[~cm] = 0
        samples.append(
            {
                "key": f"bench-{i:08d}-{i:012x}",
                "caption": "一" * int(lc[i] - 2),
                "bucket": np.array([H, W], np.int32),
                "image_meta_size": np.array([W, H, W, H, 0, 0], np.int32),
                "moments": rng.standard_normal((1, 2 * C, H // 8, W // 8), dtype=np.float32).astype(np.float16),
                "clip_ids": np.where(cm, 100, 0).astype(np.int32),
                "clip_mask": cm,
                "clip_states": clip,
                "t5_ids": np.where(np.arange(LT) < lt[i], 7, 1).astype(np.int32),
                "t5_mask": np.arange(LT) < lt[i],
                "t5_states": t5[i],
            }
        )
    return samples


def write_cache(root: Path, spec: CacheSpec, samples: list[dict], per_shard: int = 16) -> int:
    nbytes = 0
    for s in range(0, len(samples), per_shard):
        w = open_shard_writer(root, f"part-{s // per_shard:06d}", spec)
        for x in samples[s : s + per_shard]:
            w.add(x)
        nbytes += w.close().bytes
    e = samples[0]
    sha = write_empty_caption(
        root, spec, **{k: e[k] for k in ("clip_ids", "clip_mask", "clip_states", "t5_ids", "t5_mask", "t5_states")}
    )
    write_manifest(root, manifest_from_shards(root, spec, vae_scaling_factor=0.13025, empty_caption_sha256=sha))
    return nbytes


def raw_read_rate(root: Path) -> float:
    """Bytes/s of a single-process sequential read of every file under shards/."""
    files = sorted(p for p in (root / "shards").rglob("*") if p.is_file())
    t0, n = time.perf_counter(), 0
    for f in files:
        with open(f, "rb") as fh:
            while b := fh.read(1 << 23):
                n += len(b)
    return n / (time.perf_counter() - t0)


def loader_rate(dataset, n_expected: int, batch_size: int, epochs: int = 2) -> float:
    """Samples/s through a DataLoader with 2 workers, batches collated as stage 2 would (one bucket here)."""
    dl = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=2, persistent_workers=True)
    for _ in dl:  # warm-up epoch: worker start-up is not read throughput
        pass
    t0, n = time.perf_counter(), 0
    for _ in range(epochs):
        for b in dl:
            n += len(b["key"])
    assert n == epochs * n_expected, (n, n_expected)
    return n / (time.perf_counter() - t0)


def inprocess_rate(cache) -> float:
    """Samples/s of cache[i] in this process (no DataLoader): the reader's own cost."""
    t0 = time.perf_counter()
    for i in range(len(cache)):
        cache[i]
    return len(cache) / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=48, help="samples per variant (default 48)")
    ap.add_argument("--out", type=Path, default=None, help="scratch folder (default: a temp dir, deleted after)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=8, help="DataLoader batch size (default 8)")
    args = ap.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="cache_bench_"))
    out.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        samples = make_samples(args.n, args.seed)
        print(f"made {args.n} samples (real random-weight T5 forward at width {DT}) in {time.perf_counter() - t0:.1f}s")
        lc = np.array([s["clip_mask"].sum() for s in samples])
        lt = np.array([s["t5_mask"].sum() for s in samples])
        uniq = np.array([len(np.unique(s["t5_states"].view(np.uint16), axis=0)) for s in samples])
        print(
            f"BERT tokens mean {lc.mean():.1f} (min {lc.min()}, max {lc.max()}); mT5 tokens mean {lt.mean():.1f}; "
            f"distinct mT5 rows mean {uniq.mean():.1f} of {LT} (padded rows: {(uniq - lt).mean():.1f} distinct of "
            f"{(LT - lt).mean():.1f})"
        )
        print(f"naive exact layout: {NAIVE} bytes/sample ({NAIVE / 1024:.0f} KiB)")
        print(
            f"{'format':<11} {'compression':<11} {'bytes/sample':>12} {'ratio':>6} {'1-proc samples/s':>16} "
            f"{'loader samples/s':>17} {'raw read samples/s':>19} {'loader/raw':>10}"
        )
        results = {}
        for fmt in ("webdataset", "zarr"):
            for comp in ("zstd", "none"):
                root = out / f"{fmt}-{comp}"
                shutil.rmtree(root, ignore_errors=True)
                spec = CacheSpec(
                    format=fmt, compression=comp, vae_dtype="float16", clip_dtype="float16", t5_dtype="float16"
                )
                nbytes = write_cache(root, spec, samples)
                per = nbytes / args.n
                cache = open_cache(root)
                ok = all(
                    np.array_equal(cache[i]["t5_states"].view(np.uint16), samples[i]["t5_states"].view(np.uint16))
                    for i in (0, args.n - 1)
                )
                assert ok, "round trip is not bit-exact"
                one = inprocess_rate(cache)
                rate = loader_rate(cache, args.n, args.batch_size)
                raw = raw_read_rate(root) / per
                results[(fmt, comp)] = per / NAIVE
                print(
                    f"{fmt:<11} {comp:<11} {per:>12.0f} {per / NAIVE:>6.3f} {one:>16.1f} {rate:>17.1f} {raw:>19.1f} "
                    f"{rate / raw:>10.3f}"
                )
                if fmt == "webdataset" and comp == "zstd":
                    srate = loader_rate(cache.stream(), args.n, args.batch_size)
                    print(
                        f"{'':<11} {'(stream)':<11} {'':>12} {'':>6} {'':>16} {srate:>17.1f} {raw:>19.1f} "
                        f"{srate / raw:>10.3f}"
                    )
        long = make_samples(max(8, args.n // 4), args.seed + 1, long=True)
        root = out / "long"
        shutil.rmtree(root, ignore_errors=True)
        per = write_cache(
            root, CacheSpec(format="webdataset", vae_dtype="float16", clip_dtype="float16", t5_dtype="float16"), long
        ) / len(long)
        print(
            f"long captions (BERT 77, mT5 ~85 tokens), webdataset zstd: {per:.0f} bytes/sample, ratio {per / NAIVE:.3f}"
        )
        worst = max(results[("webdataset", "zstd")], results[("zarr", "zstd")])
        print(f"cache_bytes_ratio = {worst:.2f} (goal <= 0.5)")
    finally:
        if args.out is None:
            shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
