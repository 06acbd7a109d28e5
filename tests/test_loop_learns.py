"""The loop learns: stage 1 (real Ray job) -> a short stage-2 run of a tiny DiT -> sample each caption with the CLI.

Four solid colours, each named by its caption, six slightly jittered 32x32 images each. The text encoders are the
random-init tiny suite; its VAE is replaced by `pipeline.tiny_suite.write_colour_faithful_vae` (the same
AutoencoderKL config with analytic weights, saved with save_pretrained and loaded by stage 1 and the CLI like real
weights): decode(encode(flat colour)) = colour within 1e-6, where the random-init VAE decodes every colour to the
same grey. So the check is made where a user would look, in decoded pixels: each generated PNG's mean RGB is
compared with the four caption colours; an image is right when its own caption's colour is the nearest. Chance is 1
in 4. Measured (80 steps, ddim 10 steps, cfg 3, 16 images): 16 of 16 right (accuracy 1.00); RGB distance to the
own colour mean 40.9 (max 78.0, guidance saturates the dominant channels at 255), to the nearest other colour mean
216.5 (min 191.0). Asserted: accuracy >= 0.75 and mean own distance < half the mean nearest-other distance.
Margin in steps (same stage-1 cache, ddim 10): 120 steps 16/16, 43.1 vs 225.8; 60: 16/16, 41.4 vs 232.6; 50: 16/16,
48.3 vs 209.8; 40: 12/16, 93.7 vs 163.1 (fails the distance bound); so 80 is 1.6x the fewest steps that pass. ddim 20
instead of 10 changes the distances by ~1 (120 steps: 42.0 vs 223.7).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_sampler import shared_tiny_suite

from shared.config import load_config

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
SEEDS_PER_CAPTION = 4


def colour_suite(shared: Path, root: Path) -> Path:
    """The session's tiny suite with its VAE replaced by the colour-faithful construction (same config, saved with
    save_pretrained, loaded by stage 1 and the CLI through the same code path as real weights)."""
    import shutil

    from pipeline.tiny_suite import write_colour_faithful_vae

    shutil.copytree(shared, root)
    return write_colour_faithful_vae(root)


@pytest.mark.slow
def test_captions_fix_colours_end_to_end(tmp_path, tmp_path_factory):
    from stage1_encode import job as job_mod
    from stage1_encode.config import EncodeConfig
    from stage2_train.config import TrainConfig
    from stage2_train.sample import main as sample_main
    from stage2_train.trainer import Trainer

    suite = colour_suite(shared_tiny_suite(tmp_path_factory), tmp_path / "t2i")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    for name, rgb in COLOURS.items():
        for j in range(6):  # slight jitter: not one image per caption
            px = np.clip(np.array(rgb) + rng.integers(-12, 13, 3), 0, 255).astype(np.uint8)
            Image.fromarray(np.broadcast_to(px, (32, 32, 3)).copy()).save(corpus / f"{name}_{j}.png")
            (corpus / f"{name}_{j}.txt").write_text(name, encoding="utf-8")

    cache = tmp_path / "cache"
    enc_cfg = load_config(
        EncodeConfig,
        "configs/encode/demo.yaml",
        [
            "input.format=folder",
            f"input.paths=[{corpus}]",
            f"encoders.root={suite}",
            f"output.root={cache}",
            "output.rows_per_shard=24",
            "encoders.batch_size=8",
            "encoders.clip_len=8",
            "encoders.t5_len=12",
            "image.multireso=false",
            "image.resolution=32",
            "image.min_size=32",
            "image.random_flip=false",
            "ray.num_cpus=2",
            "ray.preprocess_num_cpus=0.25",
            "ray.num_cpus_per_actor=0.5",
            "ray.torch_threads=1",
            "ray.object_store_memory_gb=0.3",
            "ray.actor_memory_gb=0.3",
            "log.interval_s=5",
        ],
    )
    summary = job_mod.run(enc_cfg)
    assert summary["status"] == "complete", summary

    run = tmp_path / "run"
    steps = 80
    train_cfg = load_config(
        TrainConfig,
        "configs/train/demo.yaml",
        [
            f"data.cache={cache}",
            f"run_dir={run}",
            f"steps={steps}",
            "data.batch_size=8",
            "data.num_workers=0",
            "data.uncond_p=0.1",
            "data.uncond_p_t5=0.1",
            "optim.lr=1e-3",
            "ema.enable=false",
            "checkpoint.every=0",
            "checkpoint.resume=",
            "logging.every=20",
            "logging.tensorboard=false",
            "logging.progress_bar=false",
            "model.clip_len=8",
            "model.t5_len=12",
            "device=cpu",
            "precision.mode=fp32",
        ],
    )
    torch.set_num_threads(1)
    Trainer(train_cfg).train()
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]

    out = tmp_path / "samples"
    prompts = [name for name in COLOURS for _ in range(SEEDS_PER_CAPTION)]
    args = [
        "--run",
        str(run),
        "--encoders",
        str(suite),
        "--size",
        "32x32",
        "--sampler",
        "ddim",
        "--steps",
        "10",
        "--cfg",
        "3",
        "--negative",
        "",
        "--batch-size",
        "16",
        "--seed",
        "7",
        "--out",
        str(out),
    ]
    for p in prompts:
        args += ["--prompt", p]
    assert sample_main(args) == 0
    assert (out / "grid.png").is_file()
    files = sorted(out.glob("[0-9][0-9][0-9]_*.png"))  # prompt order
    assert len(files) == len(prompts)
    got = np.stack([np.asarray(Image.open(f).convert("RGB"), dtype=np.float64).reshape(-1, 3).mean(0) for f in files])
    refs = np.array(list(COLOURS.values()), dtype=np.float64)  # (4, 3), 0..255
    dist = np.linalg.norm(got[:, None] - refs[None], axis=-1)  # (16, 4)
    truth = np.repeat(np.arange(len(COLOURS)), SEEDS_PER_CAPTION)
    nearest = dist.argmin(1)
    accuracy = float((nearest == truth).mean())
    own = dist[np.arange(len(truth)), truth]
    other = np.where(np.arange(len(COLOURS))[None] == truth[:, None], np.inf, dist).min(1)  # nearest wrong colour
    print(
        f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; nearest-colour accuracy {accuracy:.2f} (chance 0.25); "
        f"distance to own colour mean {own.mean():.1f} (max {own.max():.1f}), to the nearest other colour mean "
        f"{other.mean():.1f} (min {other.min():.1f}); generated mean colours {got.round().astype(int).tolist()}",
        file=sys.stderr,
    )
    assert accuracy >= 0.75, (accuracy, nearest.tolist())
    assert own.mean() < 0.5 * other.mean(), (own.mean(), other.mean())
