"""`python -m stage2_train.sample`: images from a trained DiT, one PNG per image plus a captioned grid.

Weights: a stage-2 run (`--run RUN_DIR [--step N] [--ema]`: its config gives the architecture and the diffusion
settings, its cache the VAE scaling factor, the encoder identity and the cached prompt lists), or `--checkpoint`
(an original `pytorch_model_*.pt` / `.safetensors` with `--preset` / `--override`, or a diffusers HunyuanDiT2DModel
folder). Prompts: `--prompt-file` cached encodings (no text encoder loaded; `python -m stage1_encode.prompts`
writes them), or `--prompt` / `--prompts FILE` with `--encoders CKPTS_T2I` (checked against the run's cache).

examples:
  python -m stage2_train.sample --run runs/demo --ema --prompt-file validation --out samples/
  python -m stage2_train.sample --run runs/demo --encoders ckpts/t2i --prompt "a red car" --size 64x96 --out s/
  python -m stage2_train.sample --checkpoint ckpts/t2i/model/pytorch_model_ema.pt --preset DiT-g/2 \\
      --encoders ckpts/t2i --prompt "一只猫" --size 1024x1024 --dtype bf16 --device cuda --out s/
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from pipeline.checkpoints import import_diffusers, load_original_state_dict, read_state_dict
from pipeline.encoders import EncoderDtypes, load_encoders, resolve_encoder_paths, vae_downsample_factor
from pipeline.models import DiTConfig, HunYuanDiT
from pipeline.sampler import (
    DEFAULT_GUIDANCE,
    DEFAULT_SAMPLER,
    DEFAULT_STEPS,
    NEGATIVE_PROMPT,
    SAMPLE_DTYPES,
    SAMPLERS,
    DiffusionSettings,
    PromptEmbeds,
    decode_latents,
    encode_prompts,
    image_grid,
    sample_latents,
)
from shared.config import load_config
from shared.manifest import encoders_hash, read_manifest
from shared.prompts import prompt_file_path, read_prompt_file, read_prompt_lines
from stage2_train.checkpointing import list_checkpoints, step_dir_name
from stage2_train.config import TrainConfig
from stage2_train.trainer import build_model_config


def parse_size(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)[xX](\d+)", text.strip())
    if not m:
        raise ValueError(f"--size {text!r}: use HxW in pixels, e.g. 1024x1024 or 768x1280")
    return int(m.group(1)), int(m.group(2))


def _slug(text: str, n: int = 40) -> str:
    s = re.sub(r"[^0-9A-Za-z]+", "-", text).strip("-").lower()
    return s[:n] or "prompt"


def load_run(run: Path, step: int | None, ema: bool) -> dict[str, Any]:
    """Model (weights loaded), diffusion settings, cache manifest (or None) of a stage-2 run."""
    cfg_file = run / "config.yaml"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"--run {run}: no config.yaml; give a stage-2 run_dir")
    cfg = load_config(TrainConfig, str(cfg_file), [])
    found = list_checkpoints(run / "checkpoints")
    if not found:
        raise FileNotFoundError(f"--run {run}: no complete checkpoint in {run / 'checkpoints'}")
    folder = found[-1] if step is None else run / "checkpoints" / step_dir_name(step)
    if folder not in found:
        raise ValueError(f"--step {step}: no complete checkpoint {folder}; have {[p.name for p in found]}")
    weights = folder / ("ema.safetensors" if ema else "model.safetensors")
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing" + (" (the run trained without ema.enable)" if ema else ""))
    model = HunYuanDiT(build_model_config(cfg))
    state = load_file(str(weights))
    if ema:  # the EMA file holds the trainable weights; the rest comes from the model file
        state = {**load_file(str(folder / "model.safetensors")), **state}
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    manifest = None
    try:
        manifest = read_manifest(cfg.data.cache)
    except (FileNotFoundError, ValueError) as err:
        print(
            f"note: the run's cache {cfg.data.cache!r} is not readable ({err}); using the VAE's scaling factor "
            "and no encoder check",
            file=sys.stderr,
        )
    return {
        "model": model,
        "diffusion": DiffusionSettings.from_section(cfg.diffusion),
        "manifest": manifest,
        "cache": cfg.data.cache,
        "label": f"{run.name} {folder.name}{' ema' if ema else ''}",
    }


def load_checkpoint_file(path: Path, preset: str, overrides: dict[str, Any], key: str) -> Any:
    if path.is_dir():
        return import_diffusers(path, **overrides)
    model = HunYuanDiT(DiTConfig.from_name(preset, **overrides))
    load_original_state_dict(model, read_state_dict(path, key=key), strict=True)
    return model


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m stage2_train.sample", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="a stage-2 run_dir")
    src.add_argument("--checkpoint", help="an original .pt/.safetensors or a diffusers HunyuanDiT2DModel folder")
    ap.add_argument("--step", type=int, default=None, help="with --run: the checkpoint step (default: latest)")
    ap.add_argument("--ema", action="store_true", help="with --run: the EMA weights")
    ap.add_argument("--preset", default="DiT-g/2", help="with --checkpoint .pt: the architecture")
    ap.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="DiTConfig field for --checkpoint (JSON value), e.g. use_style_cond=true",
    )
    ap.add_argument("--key", default="auto", choices=["auto", "module", "ema"], help="state dict in a .pt")
    ap.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable; needs --encoders)")
    ap.add_argument("--prompts", help="text file, one prompt a line (needs --encoders)")
    ap.add_argument("--prompt-file", help="cached encodings: a name in the run's CACHE/prompts/ or a .safetensors")
    ap.add_argument("--encoders", help="ckpts/t2i folder to encode --prompt/--prompts (and the default VAE)")
    ap.add_argument("--negative", default=None, help="negative prompt (default: the original's)")
    ap.add_argument("--vae", help="AutoencoderKL or ckpts/t2i folder to decode with (default: --encoders')")
    ap.add_argument("--sampler", default=DEFAULT_SAMPLER, choices=SAMPLERS)
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    ap.add_argument("--cfg", type=float, default=DEFAULT_GUIDANCE, help="guidance scale (<= 1: no CFG)")
    ap.add_argument("--size", default="1024x1024", help="HxW pixels")
    ap.add_argument("--seed", type=int, default=42, help="image i gets seed + i")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--dtype", default="fp32", choices=SAMPLE_DTYPES)
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--beta-end",
        type=float,
        default=None,
        help="with --checkpoint: the schedule's beta_end "
        "(default 0.02, the original's inference default; v1.1 weights: 0.03)",
    )
    ap.add_argument("--save-latents", action="store_true", help="also write the final latents (latents.safetensors)")
    ap.add_argument("--out", required=True, help="output folder")
    args = ap.parse_args(argv)
    try:
        return _run(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    size = parse_size(args.size)
    device = torch.device(args.device)
    if args.run:
        loaded = load_run(Path(args.run), args.step, args.ema)
    else:
        overrides = {}
        for item in args.override:
            k, sep, v = item.partition("=")
            if not sep:
                raise ValueError(f"--override {item!r}: use KEY=VALUE")
            try:
                overrides[k] = json.loads(v)
            except json.JSONDecodeError:
                overrides[k] = v
        model = load_checkpoint_file(Path(args.checkpoint), args.preset, overrides, args.key)
        d = DiffusionSettings()
        if args.beta_end is not None:
            d = DiffusionSettings(d.noise_schedule, d.beta_start, args.beta_end, d.predict_type)
        loaded = {"model": model, "diffusion": d, "manifest": None, "cache": None, "label": Path(args.checkpoint).name}
    model = loaded["model"].to(device).eval().requires_grad_(False)
    manifest = loaded["manifest"]

    if args.prompt_file:
        pf = args.prompt_file
        path = (
            Path(pf)
            if pf.endswith(".safetensors")
            else (prompt_file_path(loaded["cache"], pf) if loaded["cache"] else Path(pf))
        )
        data = read_prompt_file(path, manifest.encoders_hash if manifest is not None else None)
        prompts = data["prompts"]
        embeds, negative = PromptEmbeds.from_fields(data["embeds"]), PromptEmbeds.from_fields(data["negative"])
        if args.negative is not None:
            raise ValueError("--negative cannot change a cached prompt file's negative prompt; re-encode it")
    else:
        prompts = list(args.prompt) + (read_prompt_lines(args.prompts) if args.prompts else [])
        if not prompts:
            raise ValueError("no prompts: give --prompt/--prompts (with --encoders) or --prompt-file")
        if not args.encoders:
            raise ValueError("--prompt/--prompts need --encoders (a ckpts/t2i folder), or use --prompt-file")
        cfg = model.config
        if manifest is not None:
            s = manifest.spec
            enc = load_encoders(
                args.encoders,
                EncoderDtypes(vae=s.vae_dtype, clip=s.clip_dtype, t5=s.t5_dtype),
                device,
                clip_len=s.clip_len,
                t5_len=s.t5_len,
            )
            if manifest.encoders and encoders_hash(enc.fingerprint()) != manifest.encoders_hash:
                raise ValueError(
                    f"--encoders {args.encoders} are not the encoders of the run's cache "
                    "(fingerprint differs): the model was trained on other text features"
                )
        else:
            enc = load_encoders(args.encoders, device=device, clip_len=cfg.text_len, t5_len=cfg.text_len_t5)
        embeds = encode_prompts(enc, prompts)
        negative = encode_prompts(enc, [NEGATIVE_PROMPT if args.negative is None else args.negative])
        del enc

    from diffusers import AutoencoderKL  # lazy: diffusers costs seconds to import; `--help` and bad arguments skip it

    vae_src = args.vae or args.encoders
    if not vae_src:
        raise ValueError("give --vae (or --encoders) to decode the latents")
    vae_dir = Path(vae_src)
    if not (vae_dir / "config.json").is_file():
        vae_dir = resolve_encoder_paths(vae_dir)["vae"]
    vae = AutoencoderKL.from_pretrained(vae_dir, local_files_only=True).to(device).eval().requires_grad_(False)
    scaling = manifest.vae_scaling_factor if manifest is not None else None
    downsample = vae_downsample_factor(vae.config.block_out_channels)  # the decoder's: the latents must fit it

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    n, bs = len(prompts), max(1, args.batch_size)
    bar = tqdm(total=n * args.steps, desc="sampling", unit="step", disable=None)

    def progress(ts):
        for t in ts:
            yield t
            bar.update(len(rows))

    all_images, all_latents = [], []
    for start in range(0, n, bs):
        rows = list(range(start, min(n, start + bs)))
        latents = sample_latents(
            model,
            embeds.rows(rows),
            negative,
            size=size,
            seeds=[args.seed + i for i in rows],
            sampler=args.sampler,
            steps=args.steps,
            guidance_scale=args.cfg,
            diffusion=loaded["diffusion"],
            dtype=args.dtype,
            device=device,
            progress=progress,
            downsample=downsample,
        )
        images = decode_latents(vae, latents, scaling)
        all_latents.append(latents.cpu())
        for i, img in zip(rows, images):
            Image.fromarray(img.numpy()).save(out / f"{i:03d}_{_slug(prompts[i])}.png")
        all_images.append(images)
    bar.close()
    if args.save_latents:
        save_file({"latents": torch.cat(all_latents).contiguous()}, str(out / "latents.safetensors"))
    grid = image_grid(torch.cat(all_images), prompts)
    grid.save(out / "grid.png")
    meta = {
        "source": loaded["label"],
        "prompts": prompts,
        "sampler": args.sampler,
        "steps": args.steps,
        "cfg": args.cfg,
        "size": list(size),
        "seed": args.seed,
        "dtype": args.dtype,
    }
    (out / "samples.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {n} images and grid.png to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
