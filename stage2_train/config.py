"""Typed configuration of stage 2 (`configs/train/*.yaml`). Each component receives only its own section."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from shared.storage import StorageConfig

# The model's text and latent geometry, in the cache's names (shared.schema.CacheSpec, manifest.json) -> the
# DiTConfig field each one sets (DiTConfig keeps the original's and diffusers' argument names). This is the one
# place the two sets of names meet.
CACHE_GEOMETRY: dict[str, str] = {
    "clip_len": "text_len",
    "t5_len": "text_len_t5",
    "clip_dim": "text_states_dim",
    "t5_dim": "text_states_dim_t5",
    "latent_channels": "in_channels",
}


@dataclass
class ModelSection:
    preset: str = "DiT-g/2"
    """Name in pipeline.models.DIT_CONFIGS ("DiT-g/2", "DiT-XL/2", "DiT-S/2", "DiT-tiny/2")."""
    clip_len: int = 0
    """BERT tokens per caption (the model's text_len). 0: the cache manifest's; a value that differs from the
    manifest's is refused. Likewise t5_len (text_len_t5), clip_dim (text_states_dim), t5_dim (text_states_dim_t5)
    and latent_channels (in_channels). The run's config.yaml records the values the run used."""
    t5_len: int = 0
    clip_dim: int = 0
    t5_dim: int = 0
    latent_channels: int = 0
    overrides: dict[str, Any] = field(default_factory=dict)
    """Other DiTConfig fields replacing the preset's, e.g. {attn_backend: flash, use_style_cond: true}. The
    geometry fields (text_len, text_len_t5, text_states_dim, text_states_dim_t5, in_channels) are refused here:
    they come from the cache, or from model.clip_len / t5_len / clip_dim / t5_dim / latent_channels."""
    init_from: str = ""
    """Start weights: "" (scratch), an original `pytorch_model_*.pt` (bare / "module" / "ema" layout) or a diffusers
    HunyuanDiT2DModel folder. Ignored when resuming from a stage-2 checkpoint."""
    init_key: Literal["auto", "module", "ema"] = "auto"
    """Which state dict to take from an original checkpoint that holds several."""
    strict: bool = True
    """Fail on missing/unexpected keys when loading `init_from`."""


@dataclass
class DataSection:
    cache: str = ""
    """Cache folder written by stage 1 (the one holding manifest.json), or its s3://bucket/prefix URL."""
    batch_size: int = 1
    """Samples per rank per micro-step."""
    global_batch_size: int = 0
    """If > 0, replaces batch_size: samples per optimizer step over all ranks; must be a multiple of
    world_size * grad_accum (per-rank batch = global_batch_size / (world_size * grad_accum))."""
    num_workers: int = 2
    """DataLoader worker processes per rank (0 = load in the training process)."""
    prefetch_factor: int = 4
    random_flip: bool = True
    """Pick the plain or the flipped view with p=0.5 when the cache holds both (the original's --random-flip)."""
    uncond_p: float = 0.0
    """Probability of replacing the BERT caption encoding by the empty caption's."""
    uncond_p_t5: float = 0.0
    """Probability of replacing the mT5 caption encoding by the empty caption's (drawn independently)."""
    pin_memory: bool = True
    """Pinned host memory for the batches (CUDA only)."""
    verify: Literal["structure", "full", "none"] = "structure"
    """Cache check at start-up. "structure": every shard exists with the size its index records, the small files
    (empty caption) match their recorded sha256, the scaling factor matches the VAE config the manifest records
    (seconds even for a large cache). "full": `python -m shared.cli verify` first (rank 0 re-reads every byte).
    "none": only the manifest/index agreement every open does."""
    max_corrupt_samples: int = 10
    """A sample that cannot be read mid-run (damaged bytes) is replaced by another sample of its bucket and counted;
    the run stops, naming shard and sample, when a rank meets more than this many (0 = stop at the first). Counted
    per rank and per process: a resumed run counts afresh, and a damaged sample met again in a later epoch counts
    again."""
    encoders_hash: str = ""
    """If set, the sha256 of the cache's encoder fingerprints (`encoders_hash` in manifest.json) must equal it, so a
    run cannot silently train on features from other encoders. Resuming a checkpoint checks it against the cache the
    checkpoint was trained on in any case."""


@dataclass
class DiffusionSection:
    noise_schedule: Literal["scaled_linear", "linear", "squaredcos_cap_v2"] = "scaled_linear"
    predict_type: Literal["v_prediction", "epsilon", "sample"] = "v_prediction"
    beta_start: float = 0.00085
    beta_end: float = 0.018
    mse_loss_weight_type: str = "constant"
    """"constant" or "min_snr_<k>" (the original's weighting)."""
    noise_offset: float = 0.0


@dataclass
class OptimSection:
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    """Max global grad norm (0 disables clipping; the norm is still measured and logged)."""
    fused: bool = False
    """torch.optim.AdamW(fused=True) (CUDA)."""


@dataclass
class ScheduleSection:
    kind: Literal["constant", "cosine"] = "constant"
    """After warmup: constant LR (the original) or cosine decay to min_lr at `steps`."""
    warmup_steps: int = 0
    """Optimizer steps of warmup; 0 = the original recipe (constant LR from step 0)."""
    warmup_kind: Literal["log", "linear"] = "log"
    """"log" is DeepSpeed's WarmupLR as the original used: min + (max-min)*ln(it+1)/ln(warmup)."""
    warmup_min_lr: float = 1e-6
    min_lr: float = 0.0
    """Floor of the cosine decay."""


@dataclass
class EMASection:
    enable: bool = False
    decay: float = 0.9999
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """Storage dtype of the EMA weights; the original's default with fp16 training was float16 (decay 0.992)."""


@dataclass
class CheckpointSection:
    every: int = 1000
    """Save every N optimizer steps (0 = only at the end and on SIGTERM)."""
    keep_last: int = 3
    """How many step_XXXXXXX folders to keep (0 = all)."""
    resume: str = ""
    """"" (fresh run), "auto" (newest checkpoint in <run_dir>/checkpoints whose files match their recorded sha256;
    fresh if there is none, an error if there are some but none verifies) or a step folder (verified)."""
    save_final: bool = True
    consolidated: bool = True
    """FSDP2 across ranks: besides the sharded torch.distributed.checkpoint folder (dcp/, what resume reads), also
    gather model.safetensors / ema.safetensors on rank 0 (the export format). DDP always writes only those."""


@dataclass
class LoggingSection:
    every: int = 10
    """One log line (rank 0) every N optimizer steps."""
    tensorboard: bool = True
    progress_bar: bool = True
    record_samples: bool = False
    """Every rank appends the keys it trained on to <run_dir>/samples/rank_XXXXX.jsonl (audits data sharding)."""


@dataclass
class ParallelSection:
    strategy: Literal["ddp", "fsdp2"] = "ddp"
    activation_checkpointing: bool = False
    """Recompute each DiT block in backward (applied from outside the model)."""
    compile: bool = False
    """torch.compile each DiT block."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """Process-group backend; auto = nccl on CUDA, gloo on CPU."""
    reshard_after_forward: bool = True
    """FSDP2 only: True ~ ZeRO-3, False ~ ZeRO-2."""


@dataclass
class PrecisionSection:
    mode: Literal["bf16", "fp16", "fp32"] = "bf16"
    """bf16 autocast (default), fp16 autocast with dynamic loss scaling, or plain fp32. Weights stay fp32."""
    init_scale: float = 32768.0
    """fp16 only: initial loss scale (2**15 as the original's DeepSpeed config)."""
    growth_interval: int = 500
    """fp16 only: steps without overflow before the loss scale doubles (the original's loss_scale_window)."""


@dataclass
class ValidationSection:
    """Sample images from cached prompt encodings during training (rank 0; stage2_train/validation.py)."""

    every: int = 0
    """Sample every N optimizer steps (0 = never)."""
    prompts: str = "validation"
    """A name in <data.cache>/prompts/ (written by `python -m stage1_encode.prompts`) or a .safetensors path."""
    vae: str = ""
    """The VAE to decode with: a ckpts/t2i folder or an AutoencoderKL folder (the one stage 1 encoded with)."""
    weights: Literal["auto", "ema", "live"] = "auto"
    """Which weights sample: auto = EMA when ema.enable, else the live ones."""
    sizes: list[list[int]] = field(default_factory=list)
    """Buckets [[H, W], ...] to sample at; [] = the cache's first bucket."""
    sampler: Literal["ddpm", "ddim", "dpmms"] = "ddim"
    steps: int = 20
    guidance_scale: float = 6.0
    seed: int = 0
    """Image i of the list uses seed + i at every validation, so grids of different steps compare."""
    dtype: Literal["fp32", "bf16"] = "fp32"


@dataclass
class TrainingSection:
    parts: Literal["all", "lora"] = "all"
    """What trains: every DiT weight, or only a LoRA adapter on frozen base weights (the original's
    --training-parts; see the lora section and pipeline/lora.py)."""


@dataclass
class LoraSection:
    """Used when training.parts=lora. Defaults as the original (hydit/config.py, train_deepspeed.py)."""

    rank: int = 64
    alpha: float = 0.0
    """lora_alpha; 0 = rank (the original). Any other value is refused: the official file has no alpha key, so
    ComfyUI applies the adapter with scale 1, which equals peft's alpha/rank only when alpha = rank."""
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["Wqkv", "q_proj", "kv_proj", "out_proj"])
    """Module-name suffixes peft adapts (so pooler.q_proj matches q_proj, as in the original)."""
    init_adapter: str = ""
    """An existing adapter folder (adapter_model.safetensors + adapter_config.json, official layout, e.g. one the
    original trained) to continue from; its rank/alpha/targets must equal the ones above. Ignored on resume."""
    base_dtype: Literal["float32", "bfloat16"] = "float32"
    """Storage of the frozen linear weights. bfloat16 halves their memory and, under precision.mode=bf16, computes
    the same (autocast casts them to bf16 in every matmul anyway); not with fp32/fp16 precision or FSDP2."""


@dataclass
class TrainConfig:
    run_dir: str = "runs/train"
    """Run folder: config.yaml, metrics.jsonl, tensorboard/, checkpoints/."""
    seed: int = 1234
    """Everything random (shuffling, views, dropout, latent samples, timesteps, noise) derives from it."""
    steps: int = 1000
    """Optimizer steps to train in total (a resumed run continues to this number)."""
    grad_accum: int = 1
    """Micro-steps per optimizer step."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_bad_steps: int = 20
    """Stop with an error after this many consecutive steps with a non-finite loss or gradient."""
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    diffusion: DiffusionSection = field(default_factory=DiffusionSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    ema: EMASection = field(default_factory=EMASection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    precision: PrecisionSection = field(default_factory=PrecisionSection)
    validation: ValidationSection = field(default_factory=ValidationSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    lora: LoraSection = field(default_factory=LoraSection)
    storage: StorageConfig = field(default_factory=StorageConfig)
    """Object storage (data.cache=s3://...): endpoint, retries, the local shard cache's folder and size limit;
    credentials only from the standard AWS variables."""


def validate_config(cfg: TrainConfig) -> None:
    """Value checks the type loader cannot make; ValueError names the field."""

    def bad(key: str, value: Any, allowed: str) -> ValueError:
        return ValueError(f"config {key}={value!r} is invalid: {allowed}")

    if cfg.steps < 1:
        raise bad("steps", cfg.steps, "must be >= 1")
    if cfg.grad_accum < 1:
        raise bad("grad_accum", cfg.grad_accum, "must be >= 1")
    if cfg.data.batch_size < 1:
        raise bad("data.batch_size", cfg.data.batch_size, "must be >= 1")
    for key in ("uncond_p", "uncond_p_t5"):
        value = getattr(cfg.data, key)
        if not 0.0 <= value <= 1.0:  # also refuses NaN
            raise bad(f"data.{key}", value, "must be a probability in [0, 1]")
    if len(cfg.optim.betas) != 2:
        raise bad("optim.betas", cfg.optim.betas, "must be two numbers [beta1, beta2]")
    # NaN compares false with everything, so every range check below is written "not (ok)" to refuse it too.
    for key in ("lr", "eps", "weight_decay", "grad_clip"):
        value = getattr(cfg.optim, key)
        if not math.isfinite(value):
            raise bad(f"optim.{key}", value, "must be a finite number")
    if not cfg.optim.lr > 0:
        raise bad("optim.lr", cfg.optim.lr, "must be > 0")
    if not cfg.optim.eps > 0:
        raise bad("optim.eps", cfg.optim.eps, "must be > 0")
    if not cfg.optim.weight_decay >= 0:
        raise bad("optim.weight_decay", cfg.optim.weight_decay, "must be >= 0")
    if not cfg.optim.grad_clip >= 0:
        raise bad("optim.grad_clip", cfg.optim.grad_clip, "must be >= 0 (0 disables clipping)")
    if not all(math.isfinite(b) and 0.0 <= b < 1.0 for b in cfg.optim.betas):
        raise bad("optim.betas", cfg.optim.betas, "each must be in [0, 1)")
    if cfg.data.num_workers < 0:
        raise bad("data.num_workers", cfg.data.num_workers, "must be >= 0 (0 = load in the training process)")
    if cfg.data.prefetch_factor < 1:
        raise bad("data.prefetch_factor", cfg.data.prefetch_factor, "must be >= 1 (batches each worker loads ahead)")
    if cfg.data.max_corrupt_samples < 0:
        raise bad("data.max_corrupt_samples", cfg.data.max_corrupt_samples, "must be >= 0")
    if cfg.max_bad_steps < 0:
        raise bad("max_bad_steps", cfg.max_bad_steps, "must be >= 0")
    for key in ("warmup_min_lr", "min_lr"):
        value = getattr(cfg.schedule, key)
        if not (math.isfinite(value) and value >= 0):
            raise bad(f"schedule.{key}", value, "must be a finite number >= 0")
    if not 0.0 < cfg.ema.decay < 1.0:
        raise bad("ema.decay", cfg.ema.decay, "must be in (0, 1)")
    mse = cfg.diffusion.mse_loss_weight_type
    if mse != "constant" and not (mse.startswith("min_snr_") and mse[8:].replace(".", "", 1).isdigit()):
        raise bad("diffusion.mse_loss_weight_type", mse, 'allowed: "constant" or "min_snr_<k>" (e.g. min_snr_5)')
    if cfg.checkpoint.every < 0 or cfg.checkpoint.keep_last < 0:
        raise bad("checkpoint.every/keep_last", (cfg.checkpoint.every, cfg.checkpoint.keep_last), "must be >= 0")
    if cfg.logging.every < 1:
        raise bad("logging.every", cfg.logging.every, "must be >= 1")
    v = cfg.validation
    if v.every < 0 or v.steps < 1:
        raise bad("validation.every/steps", (v.every, v.steps), "every must be >= 0 and steps >= 1")
    if v.every > 0 and not v.vae:
        raise bad("validation.vae", v.vae, "set it to the VAE (ckpts/t2i or AutoencoderKL folder) to decode with")
    if v.every > 0 and v.weights == "ema" and not cfg.ema.enable:
        raise bad("validation.weights", v.weights, "needs ema.enable=true (or use auto / live)")
    if any(len(s) != 2 or min(s) <= 0 for s in v.sizes):
        raise bad("validation.sizes", v.sizes, "a list of [H, W] pairs of positive pixel sizes")
    if cfg.training.parts == "lora":
        from stage2_train.lora import validate_lora  # stage2_train.lora imports this module

        validate_lora(cfg)
    if not cfg.data.cache:
        raise bad("data.cache", cfg.data.cache, "set it to a stage-1 cache folder (the one holding manifest.json)")
