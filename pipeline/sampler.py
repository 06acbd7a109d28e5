"""Images from a HunYuanDiT: the original's inference loop (``hydit/diffusion/pipeline.py`` @ 368280ec), rewritten.

What the original's ``StableDiffusionPipeline.__call__`` + ``End2End.predict`` do, and this module keeps:

* schedulers from ``diffusers.schedulers`` named as the original's ``SAMPLER_FACTORY`` (``ddpm``, ``ddim``,
  ``dpmms`` = DPMSolverMultistep, dpmsolver++, order 2), with ``beta_schedule/beta_start/beta_end/prediction_type``
  replaced by the run's diffusion settings (``inference.py:137-147``);
* classifier-free guidance when ``guidance_scale > 1``: the batch is ``cat([negative, prompts])``, the first C output
  channels are kept when the model learns sigma, ``eps = uncond + cfg * (text - uncond)``;
* RoPE tables of the target size with the original's rule (``pipeline.rope``; diffusers' pipeline builds another
  grid for non-square sizes, see ``pipeline.checkpoints.ROPE_NOTE``);
* v1.1-style models: ``style = 0`` and ``image_meta_size = (orig_W, orig_H, target_W, target_H, 0, 0)``;
* initial latents (and DDPM's step noise) from one ``torch.Generator`` per image, drawn with diffusers'
  ``randn_tensor`` exactly as ``HunyuanDiTPipeline`` draws them for a list of generators, so one seed fixes one
  image whatever else is in the batch.

``model`` is any module with HunYuanDiT's forward signature (``x, t, encoder_hidden_states, text_embedding_mask,
encoder_hidden_states_t5, text_embedding_mask_t5, image_meta_size=, style=, cos_cis_img=, sin_cis_img=``) returning
``{"x": ...}`` or a tensor, e.g. a peft-wrapped model; its architecture comes from ``config`` (a DiTConfig).
Nothing here draws from the global RNG.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image, ImageDraw
from torch import nn

from pipeline.rope import RopeCache

# The original's default negative prompt (hydit/constants.py NEGATIVE_PROMPT).
NEGATIVE_PROMPT = "错误的眼睛，糟糕的人脸，毁容，糟糕的艺术，变形，多余的肢体，模糊的颜色，模糊，重复，病态，残缺，"
# The original's inference defaults (hydit/config.py --infer-steps, --cfg-scale, --sampler).
DEFAULT_STEPS = 100
DEFAULT_GUIDANCE = 6.0
DEFAULT_SAMPLER = "ddpm"
SAMPLERS: tuple[str, ...] = ("ddpm", "ddim", "dpmms")
SAMPLE_DTYPES: tuple[str, ...] = ("fp32", "bf16")

# The original's SAMPLER_FACTORY kwargs without the four that come from the run (schedule, betas, prediction type).
_FACTORY: dict[str, tuple[str, dict[str, Any]]] = {
    "ddpm": ("DDPMScheduler", {"steps_offset": 1, "clip_sample": False, "clip_sample_range": 1.0}),
    "ddim": ("DDIMScheduler", {"steps_offset": 1, "clip_sample": False, "clip_sample_range": 1.0}),
    "dpmms": (
        "DPMSolverMultistepScheduler",
        {"trained_betas": None, "solver_order": 2, "algorithm_type": "dpmsolver++"},
    ),
}


@dataclass(frozen=True)
class DiffusionSettings:
    """The run's noise schedule, as stage 2's ``diffusion:`` section and the original's CLI name them."""

    noise_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.02
    predict_type: str = "v_prediction"

    @classmethod
    def from_section(cls, section: Any) -> DiffusionSettings:
        """From stage2_train.config.DiffusionSection (or anything with these four attributes)."""
        return cls(section.noise_schedule, float(section.beta_start), float(section.beta_end), section.predict_type)


def make_scheduler(sampler: str, diffusion: DiffusionSettings = DiffusionSettings()):
    """A fresh diffusers scheduler for ``sampler`` (stateful ones such as DPM-Solver need one per call)."""
    from diffusers import schedulers  # lazy: diffusers costs seconds; the trainer imports this module for validation

    if sampler not in _FACTORY:
        raise ValueError(f"sampler={sampler!r} is not supported; choose one of {SAMPLERS}")
    cls_name, kwargs = _FACTORY[sampler]
    return getattr(schedulers, cls_name)(
        **kwargs,
        beta_schedule=diffusion.noise_schedule,
        beta_start=diffusion.beta_start,
        beta_end=diffusion.beta_end,
        prediction_type=diffusion.predict_type,
    )


@dataclass
class PromptEmbeds:
    """BERT and mT5 encodings of N prompts: clip (N, Lc, Dc), clip_mask (N, Lc), t5 (N, Lt, Dt), t5_mask (N, Lt)."""

    clip: torch.Tensor
    clip_mask: torch.Tensor
    t5: torch.Tensor
    t5_mask: torch.Tensor

    def __post_init__(self) -> None:
        n = self.clip.shape[0]
        if not (
            self.clip.ndim == 3
            and self.t5.ndim == 3
            and self.clip_mask.shape == self.clip.shape[:2]
            and self.t5_mask.shape == self.t5.shape[:2]
            and self.t5.shape[0] == n
        ):
            raise ValueError(
                f"prompt encodings do not fit together: clip {tuple(self.clip.shape)}, clip_mask "
                f"{tuple(self.clip_mask.shape)}, t5 {tuple(self.t5.shape)}, t5_mask {tuple(self.t5_mask.shape)}"
            )

    def __len__(self) -> int:
        return self.clip.shape[0]

    @classmethod
    def from_fields(cls, d: dict[str, torch.Tensor]) -> PromptEmbeds:
        """From shared.prompts' field dict (clip_states, clip_mask, t5_states, t5_mask)."""
        return cls(d["clip_states"], d["clip_mask"].bool(), d["t5_states"], d["t5_mask"].bool())

    def rows(self, index: Sequence[int] | slice) -> PromptEmbeds:
        if not isinstance(index, slice):
            index = torch.as_tensor(list(index), dtype=torch.long)
        return PromptEmbeds(self.clip[index], self.clip_mask[index], self.t5[index], self.t5_mask[index])

    def repeat_to(self, n: int) -> PromptEmbeds:
        """One row (a negative prompt) repeated to n rows."""
        if len(self) != 1:
            raise ValueError(f"a negative prompt is one row of encodings, got {len(self)}")
        return self.rows([0] * n)

    @staticmethod
    def cat(parts: Sequence[PromptEmbeds]) -> PromptEmbeds:
        return PromptEmbeds(
            *(torch.cat([getattr(p, k) for p in parts]) for k in ("clip", "clip_mask", "t5", "t5_mask"))
        )


def encode_prompts(encoders: Any, prompts: Sequence[str]) -> PromptEmbeds:
    """Encode with stage 1's FrozenEncoders (same tokenisation, lengths and dtypes as the cache), on the CPU.

    The states keep the encoders' dtypes, as stage 1 stores them; the sampler casts them to fp32 exactly like the
    trainer does with cached states.
    """
    tok = encoders.tokenize(list(prompts))
    clip = encoders.encode_clip(tok["clip_ids"], tok["clip_mask"]).cpu()
    t5 = encoders.encode_t5(tok["t5_ids"], tok["t5_mask"]).cpu()
    return PromptEmbeds(clip.clone(), tok["clip_mask"].bool(), t5.clone(), tok["t5_mask"].bool())


def _size_of(size: int | tuple[int, int]) -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, int) else size
    return int(h), int(w)


def initial_latents(
    generators: Sequence[torch.Generator],
    channels: int,
    height: int,
    width: int,
    device: torch.device,
    downsample: int = 8,
) -> torch.Tensor:
    """(B, C, H/downsample, W/downsample) fp32 noise, one generator per image, as diffusers' pipelines draw it."""
    from diffusers.utils.torch_utils import randn_tensor  # lazy: diffusers, see make_scheduler

    shape = (len(generators), channels, height // downsample, width // downsample)
    return randn_tensor(shape, generator=list(generators), device=device, dtype=torch.float32)


@torch.no_grad()
def sample_latents(
    model: nn.Module,
    prompts: PromptEmbeds,
    negative: PromptEmbeds | None,
    *,
    size: int | tuple[int, int] = 1024,
    seeds: Sequence[int] | None = None,
    sampler: str = DEFAULT_SAMPLER,
    steps: int = DEFAULT_STEPS,
    guidance_scale: float = DEFAULT_GUIDANCE,
    diffusion: DiffusionSettings = DiffusionSettings(),
    config: Any = None,
    dtype: str = "fp32",
    device: torch.device | str | None = None,
    original_size: tuple[int, int] | None = None,
    latents: torch.Tensor | None = None,
    rope: RopeCache | None = None,
    progress: Callable[[Iterable], Iterable] | None = None,
    downsample: int = 8,
) -> torch.Tensor:
    """Denoise one batch: (B, C, H/d, W/d) fp32 final latents for B = len(prompts) images of ``size`` (H, W) pixels.

    ``negative``: one row (the negative prompt's encodings), needed when ``guidance_scale > 1``. ``seeds``: one per
    image (default 0..B-1); or pass ``latents`` to start from. ``original_size`` (W, H) feeds the v1.1 size
    condition (default: the target size). ``config`` defaults to ``model.config``. ``downsample`` (d): the VAE's
    pixels per latent cell, from the cache manifest (``spec.downsample``) or the VAE's config
    (``pipeline.encoders.vae_downsample_factor``); 8 is SDXL's VAE, the original's. A ``rope`` passed in must use
    the same value.
    """
    config = config if config is not None else getattr(model, "config", None)
    if config is None:
        raise ValueError("config (a DiTConfig) is needed when the model has no .config")
    if dtype not in SAMPLE_DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; choose one of {SAMPLE_DTYPES}")
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1")
    height, width = _size_of(size)
    if rope is not None and rope.downsample != downsample:
        raise ValueError(f"rope downsample={rope.downsample} differs from downsample={downsample} (the VAE's)")
    step_px = downsample * config.patch_size
    if height <= 0 or width <= 0 or height % step_px or width % step_px:
        raise ValueError(
            f"size {height}x{width} must be positive multiples of {step_px} (VAE {downsample}x times patch)"
        )
    B = len(prompts)
    if B == 0:
        raise ValueError("no prompts to sample")
    cfg_on = guidance_scale > 1.0
    if cfg_on and negative is None:
        raise ValueError(f"guidance_scale={guidance_scale} > 1 needs the negative prompt's encodings")
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    seeds = list(range(B)) if seeds is None else [int(s) for s in seeds]
    if len(seeds) != B:
        raise ValueError(f"{len(seeds)} seeds for {B} prompts; give one seed per image")
    # CPU generators: the same seed gives the same image on any device (diffusers' randn_tensor convention).
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]

    scheduler = make_scheduler(sampler, diffusion)
    scheduler.set_timesteps(steps, device=device)
    if latents is None:
        latents = initial_latents(generators, config.in_channels, height, width, device, downsample)
    else:
        if latents.shape != (B, config.in_channels, height // downsample, width // downsample):
            raise ValueError(f"latents {tuple(latents.shape)} do not fit {B} images of {height}x{width}")
        latents = latents.to(device=device, dtype=torch.float32)
    latents = latents * scheduler.init_noise_sigma

    text = PromptEmbeds.cat([negative.repeat_to(B), prompts]) if cfg_on else prompts
    # States in the cache's dtypes (fp16 mT5) reach the model as fp32, as the trainer sends them.
    kwargs: dict[str, Any] = {
        "encoder_hidden_states": text.clip.to(device).float(),
        "text_embedding_mask": text.clip_mask.to(device).long(),
        "encoder_hidden_states_t5": text.t5.to(device).float(),
        "text_embedding_mask_t5": text.t5_mask.to(device).long(),
    }
    n = len(text)
    if config.size_cond:
        ow, oh = original_size if original_size is not None else (width, height)
        kwargs["image_meta_size"] = torch.tensor(
            [[ow, oh, width, height, 0, 0]] * n, dtype=torch.float32, device=device
        )
    if config.use_style_cond:
        kwargs["style"] = torch.zeros(n, dtype=torch.long, device=device)
    rope = rope if rope is not None else RopeCache(config.head_dim, config.patch_size, config.rope_img, downsample)
    kwargs["cos_cis_img"], kwargs["sin_cis_img"] = rope.get(height, width, device)

    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()
    C = config.in_channels
    # As diffusers' pipelines: the per-image generators go to schedulers that draw noise in step() (DDPM).
    step_kwargs = {"generator": generators} if "generator" in inspect.signature(scheduler.step).parameters else {}
    timesteps = scheduler.timesteps
    for t in progress(timesteps) if progress is not None else timesteps:
        x_in = torch.cat([latents] * 2) if cfg_on else latents
        x_in = scheduler.scale_model_input(x_in, t)
        t_in = torch.full((x_in.shape[0],), int(t), dtype=torch.long, device=device)  # the original's int steps
        with autocast:
            out = model(x_in, t_in, **kwargs)
        out = (out["x"] if isinstance(out, dict) else out).float()
        if config.learn_sigma:
            out = out[:, :C]  # the variance channels only serve the training loss
        if cfg_on:
            uncond, cond = out.chunk(2)
            out = uncond + guidance_scale * (cond - uncond)
        latents = scheduler.step(out, t, latents, **step_kwargs, return_dict=False)[0]
    return latents


@torch.no_grad()
def decode_latents(vae: nn.Module, latents: torch.Tensor, scaling_factor: float | None = None) -> torch.Tensor:
    """VAE decode -> uint8 images (B, H, W, 3); ``scaling_factor`` from the manifest, else the VAE's config."""
    sf = float(scaling_factor if scaling_factor is not None else vae.config.scaling_factor)
    param = next(vae.parameters())
    images = vae.decode(latents.to(param.device, param.dtype) / sf).sample.float()  # (B, 3, H, W) in ~[-1, 1]
    images = (images / 2 + 0.5).clamp(0, 1)
    return (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


def image_grid(images: torch.Tensor, captions: Sequence[str] | None = None, cols: int | None = None):
    """A PIL grid of uint8 (B, H, W, 3) images, each with its caption (truncated) in a strip underneath."""
    # The cache grid's font finder (PIL's own font has no CJK glyphs). Lazy: pipeline/ imports nothing of shared/
    # at module level, and this would load the whole cache reader for a font search.
    from shared.inspection import cjk_font

    font = cjk_font(12) if captions else None
    B, H, W, _ = images.shape
    cols = cols or min(B, 4)
    rows = -(-B // cols)
    strip = 14 if captions else 0
    grid = Image.new("RGB", (cols * W, rows * (H + strip)), "white")
    draw = ImageDraw.Draw(grid)
    for i in range(B):
        x, y = (i % cols) * W, (i // cols) * (H + strip)
        grid.paste(Image.fromarray(images[i].numpy()), (x, y))
        if captions:
            # without a CJK font a non-ASCII caption would be a row of boxes: label it by its number instead
            text = captions[i] if font is not None or captions[i].isascii() else f"prompt {i}"
            max_chars = max(4, W // 6)
            text = text if len(text) <= max_chars else text[: max_chars - 1] + "…"
            draw.text((x + 2, y + H + 1), text, fill="black", font=font)
    return grid
