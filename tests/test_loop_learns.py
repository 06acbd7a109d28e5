"""The loop learns: stage 1 (real Ray job) -> a short stage-2 run of a tiny DiT -> sample each caption with the CLI.

Four solid colours, each named by its caption. The encoders are random-init (tiny suite, VAE made colour-faithful
in latent space by colour_suite) and the tiny VAE decodes all four colours to nearly the same grey (measured:
reference decodes within 1/255 of each other), so the colour is read where it survives, in latent space: an image's "colour" is its final latent's per-channel mean
(written by the CLI's --save-latents next to the PNGs), each caption's reference is the mean cached latent of its
training images, and an image counts as right when it is nearest its own caption's reference. Chance is 1 in 4.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from shared.config import load_config
from test_sampler import shared_tiny_suite

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
SEEDS_PER_CAPTION = 4


def colour_suite(shared: Path, root: Path) -> Path:
    """The tiny suite with its VAE's posterior made colour-faithful: the random-init encoder's moments layer
    (quant_conv) gets its mean rows scaled x40 and its log-variance fixed at -14 (std 1e-3). As drawn, the random VAE
    maps the four solid colours to latent means ~0.01 apart under posterior noise of std ~0.13 (logvar ~0), so no
    model could tell them apart from a sample; after this they are ~0.3 apart and nearly noise-free."""
    import shutil

    from diffusers import AutoencoderKL

    shutil.copytree(shared, root)
    folder = root / "sdxl-vae-fp16-fix"
    vae = AutoencoderKL.from_pretrained(folder, local_files_only=True)
    c = vae.config.latent_channels
    with torch.no_grad():
        vae.quant_conv.weight[:c] *= 40
        vae.quant_conv.bias[:c] *= 40
        vae.quant_conv.weight[c:] = 0
        vae.quant_conv.bias[c:] = -14.0
    vae.save_pretrained(folder, safe_serialization=True)
    return root


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
    enc_cfg = load_config(EncodeConfig, "configs/encode/demo.yaml", [
        "input.format=folder", f"input.paths=[{corpus}]", f"encoders.root={suite}", f"output.root={cache}",
        "output.rows_per_shard=24", "encoders.batch_size=8", "encoders.clip_len=8", "encoders.t5_len=12",
        "image.multireso=false", "image.resolution=32", "image.min_size=32", "image.random_flip=false", "ray.num_cpus=2",
        "ray.preprocess_tasks=1", "ray.preprocess_num_cpus=0.25", "ray.num_cpus_per_actor=0.5",
        "ray.torch_threads=1", "ray.object_store_memory_gb=0.3", "ray.actor_memory_gb=0.3", "log.interval_s=5"])
    summary = job_mod.run(enc_cfg)
    assert summary["status"] == "complete", summary

    run = tmp_path / "run"
    steps = 120
    train_cfg = load_config(TrainConfig, "configs/train/demo.yaml", [
        f"data.cache={cache}", f"run_dir={run}", f"steps={steps}", "data.batch_size=8", "data.num_workers=0",
        "data.uncond_p=0.1", "data.uncond_p_t5=0.1", "optim.lr=1e-3", "ema.enable=false", "checkpoint.every=0",
        "checkpoint.resume=", "logging.every=20", "logging.tensorboard=false", "logging.progress_bar=false",
        "model.clip_len=8", "model.t5_len=12", "device=cpu", "precision.mode=fp32"])
    torch.set_num_threads(1)
    Trainer(train_cfg).train()
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]

    out = tmp_path / "samples"
    prompts = [name for name in COLOURS for _ in range(SEEDS_PER_CAPTION)]
    args = ["--run", str(run), "--encoders", str(suite), "--size", "32x32", "--sampler", "ddim", "--steps", "20",
            "--cfg", "3", "--negative", "", "--batch-size", "16", "--seed", "7", "--save-latents", "--out", str(out)]
    for p in prompts:
        args += ["--prompt", p]
    assert sample_main(args) == 0
    assert (out / "grid.png").is_file()
    got = np.stack([np.asarray(Image.open(f)).reshape(-1, 3).mean(0)
                    for f in sorted(out.glob("[0-9][0-9][0-9]_*.png"))])  # (16, 3), prompt order

    # references: each caption's mean cached latent (posterior mean x scaling factor), per channel
    from safetensors.torch import load_file

    from shared.cache import open_cache
    from shared.manifest import read_manifest

    latents = load_file(str(out / "latents.safetensors"))["latents"]  # (16, C, h, w), prompt order
    reader, sf = open_cache(cache), read_manifest(cache).vae_scaling_factor
    means: dict[str, list] = {}
    for i in range(len(reader)):
        s = reader[i]
        moments = torch.from_numpy(np.asarray(s["moments"], dtype=np.float32))[0]  # (2C, h, w), first view
        means.setdefault(s["caption"], []).append(moments[: moments.shape[0] // 2].mean((1, 2)) * sf)
    names = list(COLOURS)
    refs = torch.stack([torch.stack(means[n]).mean(0) for n in names])  # (4, C)
    got = latents.mean((2, 3))  # (16, C)
    nearest = torch.cdist(got, refs).argmin(1).numpy()
    truth = np.repeat(np.arange(len(names)), SEEDS_PER_CAPTION)
    accuracy = float((nearest == truth).mean())
    pix = np.stack([np.asarray(Image.open(f)).reshape(-1, 3).mean(0)
                    for f in sorted(out.glob("[0-9][0-9][0-9]_*.png"))])
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; nearest-colour accuracy {accuracy:.2f} (chance 0.25); "
          f"ref latent colours {refs.numpy().round(3).tolist()}; generated {got.numpy().round(3).tolist()}; "
          f"decoded pixel means spread {pix.std(0).round(2).tolist()}", file=sys.stderr)
    assert accuracy >= 0.75, (accuracy, nearest.tolist())
