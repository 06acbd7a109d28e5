"""Stage-2 training step from the cache vs with the encoders in the step (the original's way), same DiT and step.

Variants, each in its own process (so peak memory is that variant's own), same seed, plan and draws:
  online     the stage-1 preprocessing + VAE/BERT/mT5 run inside every step (like hydit/train_deepspeed.py)
  zarr       from a zarr cache, DataLoader with --workers worker processes
  webdataset from a webdataset cache, same loader
The encoders are random-init in the real architectures (pipeline.tiny_suite: "bench" = SDXL-VAE, BERT-base-sized
BERT, a T5-small-sized mT5; "tiny" = the test suite); the DiT is DiT-S/2 with the encoders' text widths.
Reported per variant: median step time, data-wait share of step time (time blocked on the next batch / step time,
over the timed steps), peak RSS of the process. The headline is the worse data-wait share of the two cache formats.

    python bench/train_step.py                      # CPU, bench encoders, 128 px images, batch 4, 2 workers
    python bench/train_step.py --encoders tiny --steps 10 --warmup 3    # quick
    python bench/train_step.py --device cuda --image-size 512 --batch 8
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SEED = 1234
DEFAULT_CAPTION = "随机生成一张图片"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoders", default="bench", choices=["bench", "tiny"])
    p.add_argument("--model", default="DiT-S/2")
    p.add_argument("--images", type=int, default=16, help="corpus size (demo corpus images, varied sizes)")
    p.add_argument("--image-size", type=int, default=128, help="bucket base size in pixels")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers for the cache variants")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps (loader start-up, first-call overheads)")
    p.add_argument("--steps", type=int, default=12, help="timed steps of the cache variants")
    p.add_argument(
        "--online-steps",
        type=int,
        default=4,
        help="timed steps of the online variant (each runs the VAE on a whole batch: slow on CPU)",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--work-dir", default=None, help="keep the encoder suite and caches here (default: a temp dir)")
    p.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # internal: run one variant, print JSON
    return p.parse_args()


# ----------------------------------------------------------------------------------------------------------------------
# corpus, encoders, caches


def image_config(args: argparse.Namespace):
    from stage1_encode.config import ImageConfig

    return ImageConfig(
        multireso=True,
        resolution=args.image_size,
        reso_step=max(16, args.image_size // 8 // 8 * 8),
        random_flip=True,
        seed=7,
    )


def raw_samples(args: argparse.Namespace):
    from shared.schema import make_key
    from stage1_encode.demo_corpus import demo_records
    from stage1_encode.preprocess import clean_caption
    from stage2_train.online import RawSample

    out = []
    for row, r in enumerate(demo_records(args.images, seed=11, bad_rows=False)):
        caption, _ = clean_caption(r["text_zh"], DEFAULT_CAPTION)
        out.append(RawSample(key=make_key("bench", row, r["md5"]), image=r["image"], caption=caption))
    return out


def make_preprocess(args: argparse.Namespace):
    from stage1_encode.preprocess import decode_image, preprocess_image

    cfg = image_config(args)

    def preprocess(sample):
        return preprocess_image(decode_image(sample.image, 10**8), sample.key, cfg)

    return preprocess


def load_bench_encoders(work: Path, args: argparse.Namespace):
    from pipeline.encoders import load_encoders

    return load_encoders(work / "ckpts" / "t2i", clip_len=77, t5_len=256, device=args.device)


def prepare(work: Path, args: argparse.Namespace) -> None:
    """Encoder suite + one cache per format, written once (stage 1's functions, shared's writers)."""
    from pipeline.tiny_suite import TinySizes, write_tiny_suite
    from shared.cache import open_shard_writer, write_empty_caption
    from shared.manifest import manifest_from_shards, write_manifest
    from shared.schema import CacheSpec

    samples = raw_samples(args)
    if not (work / "ckpts" / "t2i").exists():
        sizes = TinySizes.bench() if args.encoders == "bench" else TinySizes()
        sizes = dataclasses.replace(sizes, t5_extra_pieces=min(sizes.t5_extra_pieces, 1000))
        t = time.perf_counter()
        write_tiny_suite(work / "ckpts" / "t2i", captions=[s.caption for s in samples], sizes=sizes)
        print(f"encoder suite ({args.encoders}) written in {time.perf_counter() - t:.1f}s", flush=True)
    if all((work / f"cache_{f}" / "manifest.json").exists() for f in ("zarr", "webdataset")):
        return
    enc = load_bench_encoders(work, args)
    preprocess = make_preprocess(args)
    encoded = []
    t = time.perf_counter()
    for s in samples:
        pre = preprocess(s)
        tok = enc.tokenize([s.caption])
        encoded.append(
            {
                "key": s.key,
                "caption": s.caption,
                "bucket": np.asarray(pre.bucket, np.int32),
                "image_meta_size": pre.image_meta_size,
                "moments": enc.encode_images(torch.from_numpy(pre.views)).cpu(),
                "clip_ids": tok["clip_ids"][0],
                "clip_mask": tok["clip_mask"][0],
                "clip_states": enc.encode_clip(tok["clip_ids"], tok["clip_mask"])[0].cpu(),
                "t5_ids": tok["t5_ids"][0],
                "t5_mask": tok["t5_mask"][0],
                "t5_states": enc.encode_t5(tok["t5_ids"], tok["t5_mask"])[0].cpu(),
            }
        )
    print(f"encoded {len(encoded)} samples in {time.perf_counter() - t:.1f}s", flush=True)
    tok = enc.tokenize([""])
    empty = dict(
        clip_ids=tok["clip_ids"],
        clip_mask=tok["clip_mask"],
        clip_states=enc.encode_clip(tok["clip_ids"], tok["clip_mask"]).cpu(),
        t5_ids=tok["t5_ids"],
        t5_mask=tok["t5_mask"],
        t5_states=enc.encode_t5(tok["t5_ids"], tok["t5_mask"]).cpu(),
    )
    for fmt in ("zarr", "webdataset"):
        root = work / f"cache_{fmt}"
        spec = CacheSpec(
            format=fmt,
            views=("plain", "flip"),
            clip_len=77,
            clip_dim=enc.clip_dim,
            t5_len=256,
            t5_dim=enc.t5_dim,
            latent_channels=enc.latent_channels,
            downsample=enc.vae_downsample,
        )
        for shard in range(4):  # a few shards, so workers read from several files
            w = open_shard_writer(root, f"part-{shard:05d}", spec)
            for sample in encoded[shard::4]:
                w.add(sample)
            w.close()
        sha = write_empty_caption(root, spec, **empty)
        write_manifest(
            root,
            manifest_from_shards(
                root, spec, encoders=enc.fingerprint(), vae_scaling_factor=enc.scaling_factor, empty_caption_sha256=sha
            ),
        )


# ----------------------------------------------------------------------------------------------------------------------
# one variant (own process)


def quiet_run_overrides(device: str) -> list[str]:
    """A measured stage-2 run's settings: a metrics line every step, no TensorBoard, progress bar or checkpoints, and
    fp32 on CPU / bf16 on a GPU."""
    return [
        "logging.every=1",
        "logging.tensorboard=false",
        "logging.progress_bar=false",
        "checkpoint.every=0",
        "checkpoint.save_final=false",
        "checkpoint.resume=",
        f"device={device}",
        "precision.mode=" + ("fp32" if device == "cpu" else "bf16"),
    ]


def online_factory(work: Path, args: argparse.Namespace):
    """A batch_source_factory encoding online with the cache run's plan and draw settings (the same draws)."""
    from stage2_train.online import OnlineBatchSource

    def factory(trainer):
        src = trainer.cache_source()  # only for its plan and draw settings: same draws
        enc = load_bench_encoders(work, args)
        samples, preprocess = raw_samples(args), make_preprocess(args)
        by_key = {s.key: s for s in samples}
        ordered = [by_key[k] for k in src.reader.keys()]  # plan indices are cache positions
        buckets = [tuple(int(x) for x in b) for b in src.reader.meta["bucket"].tolist()]
        return OnlineBatchSource(ordered, buckets, preprocess, enc, src.plan, src.settings)

    return factory


def run_variant(work: Path, args: argparse.Namespace) -> dict:
    from shared.config import load_config
    from stage2_train.config import TrainConfig
    from stage2_train.trainer import Trainer

    fmt = "zarr" if args.variant == "online" else args.variant
    timed_steps = args.online_steps if args.variant == "online" else args.steps
    total = args.warmup + timed_steps
    cfg = load_config(
        TrainConfig,
        "configs/train/demo.yaml",
        [
            f"data.cache={work / f'cache_{fmt}'}",
            f"run_dir={work / 'runs' / args.variant}",
            f"steps={total}",
            f"data.batch_size={args.batch}",
            f"data.num_workers={0 if args.variant == 'online' else args.workers}",
            f"model.preset={args.model}",
            *quiet_run_overrides(args.device),
            "data.uncond_p=0.1",
            "data.uncond_p_t5=0.1",
            "ema.enable=false",
        ],
    )
    factory = online_factory(work, args) if args.variant == "online" else None
    trainer = Trainer(cfg, batch_source_factory=factory)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    recs = [json.loads(line) for line in (work / "runs" / args.variant / "metrics.jsonl").read_text().splitlines()]
    timed = recs[-timed_steps:]
    # per step: samples_per_s = batch / step time; data_wait_share = wait / step time (logging.every=1)
    step_times = [args.batch / r["samples_per_s"] for r in timed]
    waits = [r["data_wait_share"] * t for r, t in zip(timed, step_times)]
    peak = (
        torch.cuda.max_memory_allocated() / 2**30
        if args.device.startswith("cuda")
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    )
    return {
        "variant": args.variant,
        "step_s_median": statistics.median(step_times),
        "data_wait_share": sum(waits) / sum(step_times),
        "peak_gib": peak,
        "loss_first": recs[0]["loss"],
        "n_steps": len(recs),
    }


# ----------------------------------------------------------------------------------------------------------------------


def main() -> None:
    args = parse_args()
    if args.variant is not None:
        print("RESULT " + json.dumps(run_variant(Path(args.work_dir), args)), flush=True)
        return
    tmp = None
    if args.work_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_train_step_")
        args.work_dir = tmp.name
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    prepare(work, args)
    results = {}
    for variant in ("online", "zarr", "webdataset"):
        cmd = [sys.executable, __file__, "--variant", variant, "--work-dir", str(work)]
        for name in (
            "encoders",
            "model",
            "images",
            "image_size",
            "batch",
            "workers",
            "warmup",
            "steps",
            "online_steps",
            "device",
        ):
            cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
        t = time.perf_counter()
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ))
        line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        if out.returncode != 0 or not line:
            sys.exit(f"variant {variant} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        results[variant] = json.loads(line[0][7:])
        print(f"{variant}: done in {time.perf_counter() - t:.0f}s", flush=True)

    on = results["online"]
    print(
        f"\nDiT {args.model}, encoders '{args.encoders}', {args.image_size}px buckets, batch {args.batch}, "
        f"{args.steps} timed steps (online: {args.online_steps}) after {args.warmup}, device {args.device}, "
        f"cache loaders with {args.workers} workers"
    )
    print(
        f"{'variant':<12} {'step (s)':>10} {'vs online':>10} {'data wait':>10} {'peak (GiB)':>11} {'loss step 1':>12}"
    )
    for name, r in results.items():
        print(
            f"{name:<12} {r['step_s_median']:>10.4f} {r['step_s_median'] / on['step_s_median']:>10.3f} "
            f"{100 * r['data_wait_share']:>9.2f}% {r['peak_gib']:>11.2f} {r['loss_first']:>12.6f}"
        )
    print(
        f"step time from cache (zarr) / online = {results['zarr']['step_s_median'] / on['step_s_median']:.3f}; "
        f"peak memory zarr / online = {results['zarr']['peak_gib'] / on['peak_gib']:.3f}"
    )
    worst = max(results["zarr"]["data_wait_share"], results["webdataset"]["data_wait_share"])
    print(f"data_wait_share = {100 * worst:.2f}% (goal < 2%)")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
