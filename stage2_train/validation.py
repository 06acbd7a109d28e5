"""Validation images during training: every `validation.every` steps rank 0 samples the cached prompt encodings.

Training must not notice it:

* no global RNG is touched (pipeline.sampler draws from private CPU generators seeded `validation.seed + i`);
* the training model is never put in eval mode or called: rank 0 keeps a separate unsharded sampling copy and loads
  the EMA (or live) weights into it, so loss, optimizer, EMA and data position are unchanged and resume stays exact;
* under FSDP2 the full weights are gathered with the collective every rank runs anyway (EMA.state_dict /
  full_model_state), then the other ranks wait in one all-reduce that also carries rank 0's success flag, so a
  failed validation stops every rank at once instead of leaving them in a barrier.

Output: RUN_DIR/validation/step_XXXXXXX.png (one captioned grid per size, stacked), TensorBoard images
`validation/<H>x<W>`, the time in the log line and as `validation/seconds`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipeline.encoders import _DIFFUSERS_WEIGHTS, _sha256_file, _weight_files, resolve_encoder_paths
from pipeline.lora import adapter_config, has_lora, inject_lora
from pipeline.models import HunYuanDiT
from pipeline.sampler import DiffusionSettings, PromptEmbeds, decode_latents, image_grid, sample_latents
from shared.manifest import read_manifest
from shared.prompts import prompt_file_path, read_prompt_file
from stage2_train.checkpointing import full_model_state
from stage2_train.config import TrainConfig
from stage2_train.metrics import logger
from stage2_train.parallel import any_rank


def _load_vae(path: str, manifest: Any):
    """The decoder, checked against the VAE the cache was encoded with when the manifest records it."""
    from diffusers import AutoencoderKL  # lazy: diffusers costs seconds to import; runs without validation skip it

    folder = Path(path)
    if not (folder / "config.json").is_file():
        folder = resolve_encoder_paths(folder)["vae"]
    recorded = (manifest.encoders or {}).get("vae", {}).get("weights")
    if recorded:
        have = {p.name: _sha256_file(p) for p in _weight_files(folder, _DIFFUSERS_WEIGHTS)}
        if have != recorded:
            raise ValueError(
                f"validation.vae={path!r}: its weights are not those of the VAE that encoded the cache "
                "(sha256 differs from the manifest's encoders.vae.weights)"
            )
    vae = AutoencoderKL.from_pretrained(folder, local_files_only=True, torch_dtype=torch.float32)
    return vae.eval().requires_grad_(False)


class Validator:
    """Built by the Trainer on every rank (cheap off rank 0); `maybe_run` is called after each optimizer step."""

    def __init__(self, trainer: Any) -> None:
        cfg: TrainConfig = trainer.cfg
        self.v = cfg.validation
        self.info = trainer.info
        self.use_ema = self.v.weights == "ema" or (self.v.weights == "auto" and trainer.ema is not None)
        self.out_dir = Path(cfg.run_dir) / "validation"
        self.diffusion = DiffusionSettings.from_section(cfg.diffusion)
        self.model = None
        # Set-up reads files on rank 0 only; all ranks agree on its outcome, or a rank-0 failure would leave the
        # others waiting in their first collective.
        error: BaseException | None = None
        if self.info.is_main:
            try:
                self._setup_main(trainer)
            except Exception as err:
                error = err
        if any_rank(error is not None, self.info):
            if error is not None:
                raise error
            raise RuntimeError("validation set-up failed on rank 0 (see its log)")

    def _setup_main(self, trainer: Any) -> None:
        cfg: TrainConfig = trainer.cfg
        manifest = read_manifest(cfg.data.cache)
        name = self.v.prompts
        path = Path(name) if name.endswith(".safetensors") else prompt_file_path(cfg.data.cache, name)
        data = read_prompt_file(path, manifest.encoders_hash)
        self.prompts: list[str] = data["prompts"]
        self.embeds = PromptEmbeds.from_fields(data["embeds"])
        self.negative = PromptEmbeds.from_fields(data["negative"])
        sizes = self.v.sizes or ([list(manifest.buckets[0])] if manifest.buckets else [])
        if not sizes:
            raise ValueError("validation.sizes is empty and the cache records no buckets; set validation.sizes")
        self.sizes = [(int(h), int(w)) for h, w in sizes]
        self.scaling_factor = manifest.vae_scaling_factor
        self.downsample = manifest.spec.downsample  # the cache's VAE, as the trainer's RoPE tables
        self.vae = _load_vae(self.v.vae, manifest).to(trainer.device)
        # A separate unsharded copy: sampling never touches the training module (mode, hooks, autograd state).
        with torch.device("meta"):
            model = HunYuanDiT(trainer.model_config)
        self.model = model.to_empty(device=trainer.device).eval().requires_grad_(False)
        if has_lora(trainer.inner):
            # The same adapter layers as the trained model, so its state (frozen base + adapter) loads key for key
            # and every image is sampled with the adapter applied (peft's forward; eval mode: no dropout).
            inject_lora(self.model, adapter_config(trainer.inner))
            self.model.requires_grad_(False)
        self.device = trainer.device
        self.tb = None
        logger.info(
            "validation: %d prompts from %s at %s every %d steps (%s weights, %s %d steps, cfg %.1f)",
            len(self.prompts),
            path,
            self.sizes,
            self.v.every,
            "EMA" if self.use_ema else "live",
            self.v.sampler,
            self.v.steps,
            self.v.guidance_scale,
        )

    def due(self, step: int) -> bool:
        return self.v.every > 0 and step % self.v.every == 0

    def _weights(self, trainer: Any) -> dict[str, torch.Tensor] | None:
        """Full weights on rank 0 (collective under FSDP2: every rank calls this)."""
        state = full_model_state(trainer.inner)
        if self.use_ema:
            state = dict(state)
            state.update(trainer.ema.state_dict())
        return state if self.info.is_main else None

    def maybe_run(self, trainer: Any, step: int, tb: Any = None) -> float | None:
        """Sample if `step` is due; returns the seconds it took on rank 0 (None when not due or off rank 0)."""
        if not self.due(step):
            return None
        t0 = time.perf_counter()
        state = self._weights(trainer)
        error: BaseException | None = None
        if self.info.is_main:
            try:
                self._sample(state, step, tb)
            except Exception as err:  # reported to every rank below, then raised here
                error = err
        del state
        if any_rank(error is not None, self.info):
            if error is not None:
                raise RuntimeError(f"validation at step {step} failed: {error}") from error
            raise RuntimeError(f"validation at step {step} failed on rank 0 (see its log)")
        if not self.info.is_main:
            return None
        dt = time.perf_counter() - t0
        logger.info(
            "validation step %d: %d images in %.1f s -> %s",
            step,
            len(self.prompts) * len(self.sizes),
            dt,
            self.out_dir / f"step_{step:07d}.png",
        )
        if tb is not None:
            tb.add_scalar("validation/seconds", dt, step)
        return dt

    @torch.no_grad()
    def _sample(self, state: dict[str, torch.Tensor], step: int, tb: Any) -> None:
        self.model.load_state_dict({k: v.to(self.device, torch.float32) for k, v in state.items()}, strict=True)
        seeds = [self.v.seed + i for i in range(len(self.prompts))]
        grids = []
        for h, w in self.sizes:
            latents = sample_latents(
                self.model,
                self.embeds,
                self.negative,
                size=(h, w),
                seeds=seeds,
                sampler=self.v.sampler,
                steps=self.v.steps,
                guidance_scale=self.v.guidance_scale,
                diffusion=self.diffusion,
                dtype=self.v.dtype,
                device=self.device,
                downsample=self.downsample,
            )
            images = decode_latents(self.vae, latents, self.scaling_factor)
            grid = image_grid(images, [f"{p} ({h}x{w})" for p in self.prompts])
            grids.append(grid)
            if tb is not None:
                tb.add_image(f"validation/{h}x{w}", np.asarray(grid), step, dataformats="HWC")
        sheet = Image.new("RGB", (max(g.width for g in grids), sum(g.height for g in grids)), "white")
        y = 0
        for g in grids:
            sheet.paste(g, (0, y))
            y += g.height
        self.out_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.out_dir / f".tmp-step_{step:07d}.png"
        sheet.save(tmp)
        tmp.replace(self.out_dir / f"step_{step:07d}.png")
