"""The stage-2 trainer: the original HunyuanDiT training step, fed from the cache (or any batch source)."""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import math
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from pipeline.checkpoints import import_diffusers, load_original_state_dict, read_state_dict
from pipeline.diffusion import create_diffusion
from pipeline.models import DiTConfig, HunYuanDiT
from pipeline.rope import RopeCache
from shared.config import dump_config, save_config
from stage2_train.checkpointing import (
    CheckpointError,
    full_model_state,
    list_checkpoints,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
)
from stage2_train.config import CACHE_GEOMETRY, ModelSection, TrainConfig, validate_config
from stage2_train.data import BATCH_TENSORS, CacheBatchSource, open_train_cache
from stage2_train.lora import export_adapter, setup_lora, trainable_summary
from stage2_train.metrics import MetricsLogger, init_logger, logger, memory_gib
from stage2_train.optim import EMA, LRSchedule, build_optimizer
from stage2_train.parallel import (
    DistInfo,
    all_reduce_mean,
    any_rank,
    apply_parallelism,
    barrier,
    build_parallel_model,
    grad_sync,
    init_distributed,
    unwrap,
)
from stage2_train.validation import Validator

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


class BatchSource(Protocol):
    """Yields the batches (stage2_train.data.collate's dict) of this rank for micro-steps [start, end)."""

    def batches(self, start_micro_step: int, end_micro_step: int) -> Iterator[dict[str, Any]]: ...


def model_geometry(model: ModelSection, spec: Any = None, cache: str = "") -> dict[str, int]:
    """The DiTConfig geometry fields a run uses: each one from the train config if it sets it (model.clip_len, ...),
    else from the cache's spec (`spec`: a shared.schema.CacheSpec, or None without a cache), else the preset's
    (left out). A set value the cache contradicts is a ValueError naming both."""
    for old in sorted(set(model.overrides) & set(CACHE_GEOMETRY.values())):
        new = next(k for k, v in CACHE_GEOMETRY.items() if v == old)
        raise ValueError(
            f"model.overrides.{old}={model.overrides[old]!r}: the text and latent sizes are now "
            f"model.{new} (the cache's names), and are best left unset: the cache's manifest supplies "
            "them"
        )
    out: dict[str, int] = {}
    for name, dit_field in CACHE_GEOMETRY.items():
        want, have = int(getattr(model, name)), None if spec is None else int(getattr(spec, name))
        if want < 0:
            raise ValueError(f"model.{name}={want} is invalid: must be > 0, or 0 for the cache manifest's value")
        if want and have is not None and want != have:
            raise ValueError(
                f"model.{name}={want} but data.cache={cache!r} was encoded with {name}={have}; leave "
                f"model.{name} unset (0) to take the cache's, or point data.cache at a cache encoded "
                "for this model"
            )
        if want or have:
            out[dit_field] = want or have
    return out


def build_model_config(cfg: TrainConfig, spec: Any = None):
    """The DiTConfig of a run: preset, model.overrides, and the geometry from `model_geometry` (the cache's spec
    when given)."""
    geometry = model_geometry(cfg.model, spec, cfg.data.cache)
    try:
        return DiTConfig.from_name(cfg.model.preset, **cfg.model.overrides, **geometry)
    except (ValueError, TypeError) as err:
        raise ValueError(f"model.preset / model.overrides: {err}") from None


def load_init_weights(model: nn.Module, cfg: TrainConfig) -> None:
    """Official weights (original .pt layout or a diffusers folder) into a fresh model."""
    path = Path(cfg.model.init_from)
    if not path.exists():
        raise FileNotFoundError(
            f"model.init_from={str(path)!r} does not exist; give an original ckpts/t2i/model/pytorch_model_*.pt, a "
            "diffusers HunyuanDiT2DModel folder, or model.init_from='' to train from scratch"
        )
    # A damaged or foreign file fails inside safetensors / torch / diffusers with their own error types: every such
    # failure becomes one ValueError naming the file (train.py prints it and exits 2).
    try:
        if path.is_dir():
            state = import_diffusers(path).state_dict()
        else:
            state = read_state_dict(path, key=cfg.model.init_key)
    except ValueError as err:
        raise ValueError(f"model.init_from={str(path)!r} / model.init_key={cfg.model.init_key!r}: {err}") from None
    except Exception as err:
        raise ValueError(
            f"model.init_from={str(path)!r} cannot be read as weights ({type(err).__name__}: {err}); "
            "is it damaged, or not a HunyuanDiT checkpoint?"
        ) from None
    try:
        report = load_original_state_dict(model, state, strict=cfg.model.strict)
    except (ValueError, RuntimeError, KeyError) as err:
        raise ValueError(
            f"model.init_from={str(path)!r} does not fit model.preset={cfg.model.preset!r}: {err}"
        ) from None
    logger.info(
        "initialised from %s (missing %d, unexpected %d keys)", path, len(report["missing"]), len(report["unexpected"])
    )


class Trainer:
    """Owns the model, optimizer, schedule, EMA and loop; everything long-lived has state_dict()/load_state_dict()."""

    def __init__(self, cfg: TrainConfig, *, batch_source_factory: Callable[[Trainer], BatchSource] | None = None):
        validate_config(cfg)
        self.cfg = cfg
        self.info: DistInfo = init_distributed(cfg.parallel, cfg.device)
        init_logger(self.info.rank)
        self.device = self.info.device
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.batch_size = self._per_rank_batch()

        # The cache's manifest (a small file) is read first: it supplies the model's text and latent sizes, and the
        # cache is checked against the model config before the (possibly 1.5B) model is built.
        self.cache_reader = open_train_cache(cfg.data, cfg.storage)
        spec = self.cache_reader.spec
        self.model_config = build_model_config(cfg, spec)
        # The run's config (config.yaml, checkpoints) records the sizes it uses; the caller's object is left as is.
        used = {name: getattr(self.model_config, dit_field) for name, dit_field in CACHE_GEOMETRY.items()}
        self.cfg = cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **used))
        if self.info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        self.diffusion = self._build_diffusion()
        self.rope = RopeCache(
            self.model_config.head_dim,
            self.model_config.patch_size,
            self.model_config.rope_img,
            downsample=spec.downsample,
        )
        self.source: BatchSource = self.cache_source() if batch_source_factory is None else batch_source_factory(self)

        resume_from = self._resolve_resume()
        self.lora = cfg.training.parts == "lora"
        if self.lora:
            # The full seeded build on every rank, then the adapter before parallelism (FSDP2/DDP/checkpointing see
            # it like any other weight). LoRA runs do not take FSDP2's meta-device build: the adapter's own init and
            # lora.init_adapter would have to be replayed on rank 0's reference build (see parallel.py).
            torch.manual_seed(cfg.seed)  # identical initial weights on every rank, also without DDP's broadcast
            model = HunYuanDiT(self.model_config)
            if resume_from is None and cfg.model.init_from:
                load_init_weights(model, cfg)
            setup_lora(model, cfg, resuming=resume_from is not None)
            model.to(self.device).train()
            self.model = apply_parallelism(model, cfg.parallel, self.info, precision=cfg.precision.mode)
        else:
            # Seeded: identical initial weights on every rank and strategy (FSDP2 builds on meta, see parallel.py).
            self.model = build_parallel_model(
                lambda: HunYuanDiT(self.model_config),
                cfg.parallel,
                self.info,
                seed=cfg.seed,
                fresh=resume_from is None,
                init_weights=(lambda m: load_init_weights(m, cfg)) if cfg.model.init_from else None,
                precision=cfg.precision.mode,
            )
        self.inner = unwrap(self.model)  # what state dicts and the EMA see (original key names)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.schedule = LRSchedule(self.optimizer, cfg.schedule, base_lr=cfg.optim.lr, total_steps=cfg.steps)
        self.scaler = (
            torch.amp.GradScaler(
                self.device.type, init_scale=cfg.precision.init_scale, growth_interval=cfg.precision.growth_interval
            )
            if cfg.precision.mode == "fp16"
            else None
        )
        if self.lora and cfg.ema.enable:
            logger.warning("ema.enable=true ignored: EMA is off for training.parts=lora, as in the original")
        self.ema = EMA(self.inner, cfg.ema) if cfg.ema.enable and not self.lora else None

        self.step = 0
        self.consecutive_bad = 0
        self.skipped_steps = 0
        # Nothing in the step draws from the global RNG (stage2_train.data seeds every draw); seeded and
        # checkpointed anyway, for whatever a user adds.
        torch.manual_seed(cfg.seed * 1000 + self.info.rank)
        if resume_from is not None:
            state = load_checkpoint(
                resume_from, model=self.inner, optimizer=self.optimizer, ema=self.ema, info=self.info
            )
            self.load_state_dict(state)
            logger.info("resumed from %s at step %d", resume_from, self.step)
        elif cfg.checkpoint.resume == "auto":
            logger.info("checkpoint.resume=auto: no complete checkpoint in %s, starting fresh", self.ckpt_root)

        n_params = sum(p.numel() for p in self.inner.parameters())
        if self.lora:
            logger.info(
                "LoRA rank %d on %s: %s params", cfg.lora.rank, cfg.lora.target_modules, trainable_summary(self.inner)
            )
        logger.info(
            "model %s (%s params), %s x %d rank(s), per-rank batch %d, grad_accum %d, precision %s, device %s",
            cfg.model.preset,
            f"{n_params:,}",
            cfg.parallel.strategy,
            self.info.world_size,
            self.batch_size,
            cfg.grad_accum,
            cfg.precision.mode,
            self.device,
        )
        self._stop_requested = False
        self.validator = Validator(self) if cfg.validation.every > 0 else None

    # ------------------------------------------------------------------------------------------------ setup helpers
    def cache_source(self) -> CacheBatchSource:
        """The run's cache as its batch source (the default; a batch_source_factory may wrap or replace it)."""
        cfg = self.cfg
        return CacheBatchSource.from_config(
            cfg.data,
            reader=self.cache_reader,
            model_config=self.model_config,
            info=self.info,
            seed=cfg.seed,
            batch_size=self.batch_size,
            num_timesteps=self.diffusion.num_timesteps,
            noise_offset=cfg.diffusion.noise_offset,
            device=self.device,
        )

    def _resolve_resume(self) -> Path | None:
        """Which checkpoint to resume (verified); rank 0 decides and hashes, every rank gets its answer or error."""
        if not self.info.distributed:
            return resolve_resume(self.cfg.checkpoint.resume, self.ckpt_root)
        box: list[Any] = [None]
        if self.info.is_main:
            try:
                found = resolve_resume(self.cfg.checkpoint.resume, self.ckpt_root)
                box = [("ok", None if found is None else str(found))]
            except ValueError as err:
                box = [("error", str(err))]
        dist.broadcast_object_list(box, src=0)  # a tuple of strings between this job's own ranks
        kind, value = box[0]
        if kind == "error":
            raise CheckpointError(value)
        return None if value is None else Path(value)

    def _per_rank_batch(self) -> int:
        g, world, accum = self.cfg.data.global_batch_size, self.info.world_size, self.cfg.grad_accum
        if g <= 0:
            return self.cfg.data.batch_size
        if g % (world * accum):
            raise ValueError(
                f"data.global_batch_size={g} is not divisible by world_size ({world}) x grad_accum ({accum}); use a "
                f"multiple of {world * accum} (e.g. {max(1, g // (world * accum)) * world * accum}), change "
                "--nproc_per_node or grad_accum, or set data.global_batch_size=0 and data.batch_size (per rank)"
            )
        return g // (world * accum)

    def _build_diffusion(self):
        d = self.cfg.diffusion
        # Offset noise is drawn per sample with the other draws (stage2_train.data); training_losses takes the
        # batch's noise as final, so the offset is added once.
        return create_diffusion(
            d.noise_schedule,
            d.predict_type,
            self.model_config.learn_sigma,
            d.beta_start,
            d.beta_end,
            d.mse_loss_weight_type,
            d.noise_offset,
        )

    # ------------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        cfg = self.cfg
        return {
            "step": self.step,
            "micro_step": self.step * cfg.grad_accum,
            "consecutive_bad": self.consecutive_bad,
            "skipped_steps": self.skipped_steps,
            "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "world_size": self.info.world_size,
            "batch_size": self.batch_size,
            "grad_accum": cfg.grad_accum,
            "seed": cfg.seed,
            # The data position is the micro-step: batches are a pure function of (seed, world, batch, step).
            "data": {"next_micro_step": self.step * cfg.grad_accum},
            # Which encoders made the features this model has seen (None for sources without a manifest).
            "cache_encoders_hash": getattr(self.source, "encoders_hash", None),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # The plan depends on the global batch only (BucketBatchPlan): another world size with the same global
        # batch (data.global_batch_size) continues the same data order, resharded across the ranks.
        same = (state["world_size"] * state["batch_size"], state["grad_accum"], state["seed"]) == (
            self.info.world_size * self.batch_size,
            self.cfg.grad_accum,
            self.cfg.seed,
        )
        if same and state["world_size"] != self.info.world_size:
            logger.info(
                "resuming on %d rank(s) (saved by %d) with the same global batch: the data order continues",
                self.info.world_size,
                state["world_size"],
            )
        if not same:
            logger.warning(
                "resuming with world_size/batch_size/grad_accum/seed %s instead of %s: training continues, but the "
                "data order differs from an uninterrupted run",
                (self.info.world_size, self.batch_size, self.cfg.grad_accum, self.cfg.seed),
                (state["world_size"], state["batch_size"], state["grad_accum"], state["seed"]),
            )
        trained_on, now = state.get("cache_encoders_hash"), getattr(self.source, "encoders_hash", None)
        if trained_on and now and trained_on != now:
            raise ValueError(
                f"the checkpoint was trained on a cache made by other encoders (encoders_hash {trained_on[:12]}... "
                f"vs data.cache's {now[:12]}...): its weights expect other text/latent features. Point data.cache at "
                "a cache encoded with the same encoders, or start a new run_dir (model.init_from=<checkpoint "
                "model.safetensors>) to fine-tune on the new features on purpose."
            )
        self.step = int(state["step"])
        self.consecutive_bad = int(state["consecutive_bad"])
        self.skipped_steps = int(state["skipped_steps"])
        self.schedule.load_state_dict(state["schedule"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    def save(self) -> Path:
        path = save_checkpoint(
            self.ckpt_root,
            self.step,
            model=self.inner,
            optimizer=self.optimizer,
            ema=self.ema,
            trainer_state=self.state_dict(),
            config_yaml=dump_config(self.cfg),
            info=self.info,
            keep_last=self.cfg.checkpoint.keep_last,
            consolidated=self.cfg.checkpoint.consolidated,
        )
        logger.info("saved checkpoint %s", path)
        if self.lora:
            export_adapter(self, self.step)
        return path

    # ------------------------------------------------------------------------------------------------ the step
    def _model_call(self) -> Callable[..., dict[str, torch.Tensor]]:
        mode = self.cfg.precision.mode

        def call(x: torch.Tensor, t: torch.Tensor, **kwargs: Any) -> dict[str, torch.Tensor]:
            with torch.autocast(self.device.type, dtype=AUTOCAST.get(mode, torch.float32), enabled=mode in AUTOCAST):
                out = self.model(x, t, **kwargs)
            return {"x": out["x"].float()}  # the loss is computed in fp32, as the original's Float16Module returns

        return call

    def forward_backward(self, batch: dict[str, Any], *, sync: bool) -> dict[str, torch.Tensor]:
        """One micro-step; returns the batch means of loss/mse/vb (detached)."""
        b = {k: batch[k].to(self.device, non_blocking=True) for k in BATCH_TENSORS}
        for k in ("encoder_hidden_states", "encoder_hidden_states_t5"):  # sent in the cache's dtype (see build_item)
            b[k] = b[k].float()
        height, width = batch["bucket"]
        cos, sin = self.rope.get(height, width, self.device)
        kwargs = {
            "encoder_hidden_states": b["encoder_hidden_states"],
            "text_embedding_mask": b["text_embedding_mask"],
            "encoder_hidden_states_t5": b["encoder_hidden_states_t5"],
            "text_embedding_mask_t5": b["text_embedding_mask_t5"],
            "cos_cis_img": cos,
            "sin_cis_img": sin,
        }
        if self.model_config.size_cond:
            kwargs["image_meta_size"] = b["image_meta_size"]
        if self.model_config.use_style_cond:
            kwargs["style"] = b["style"]
        with grad_sync(self.model, sync):
            terms = self.diffusion.training_losses(self._model_call(), b["x_start"], kwargs, t=b["t"], noise=b["noise"])
            loss = terms["loss"].mean()
            scaled = loss / self.cfg.grad_accum
            if self.scaler is not None:
                self.scaler.scale(scaled).backward()
            else:
                scaled.backward()
        return {"loss": loss.detach(), "mse": terms["mse"].mean().detach(), "vb": terms["vb"].mean().detach()}

    def optimizer_step(self) -> tuple[float, bool]:
        """Clip, step (unless the gradient is not finite), EMA, LR; returns (grad norm, stepped)."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        clip = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        norm = float(grad_norm)
        finite = math.isfinite(norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skips the update itself on inf/nan
            self.scaler.update()
        elif finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if finite and self.ema is not None:
            self.ema.update(self.inner)
        self.schedule.step()
        return norm, finite

    # ------------------------------------------------------------------------------------------------ the loop
    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self._stop_requested = True
        logger.warning("SIGTERM: finishing this step, saving a checkpoint, then exiting")

    def train(self) -> dict[str, Any]:
        cfg = self.cfg
        accum = cfg.grad_accum
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        metrics = MetricsLogger(
            self.run_dir,
            enabled=self.info.is_main,
            tensorboard=cfg.logging.tensorboard,
            progress_bar=cfg.logging.progress_bar,
            total=cfg.steps,
            initial=self.step,
        )
        batches = self.source.batches(self.step * accum, cfg.steps * accum)
        window: dict[str, float] = {
            "loss": 0.0,
            "mse": 0.0,
            "vb": 0.0,
            "grad_norm": 0.0,
            "n": 0,
            "wait": 0.0,
            "time": 0.0,
            "samples": 0,
        }
        stopped_by_signal = False
        last_saved = None
        sample_log = None
        if cfg.logging.record_samples:
            (self.run_dir / "samples").mkdir(parents=True, exist_ok=True)
            sample_log = open(self.run_dir / "samples" / f"rank_{self.info.rank:05d}.jsonl", "a", encoding="utf-8")
        try:
            while self.step < cfg.steps:
                t0 = time.perf_counter()
                wait = 0.0
                sums = {"loss": 0.0, "mse": 0.0, "vb": 0.0}
                for micro in range(accum):
                    tw = time.perf_counter()
                    batch = next(batches)
                    wait += time.perf_counter() - tw
                    if sample_log is not None:
                        sample_log.write(
                            json.dumps(
                                {"step": self.step + 1, "micro": micro, "key": batch["key"], "view": batch["view"]}
                            )
                            + "\n"
                        )
                    out = self.forward_backward(batch, sync=micro == accum - 1)
                    for k in sums:
                        sums[k] += float(out[k]) / accum
                norm, stepped = self.optimizer_step()
                if not (stepped and math.isfinite(sums["loss"])):
                    self.consecutive_bad += 1
                    self.skipped_steps += 1
                    logger.warning(
                        "step %d: non-finite loss %.4g or grad norm %.4g, update skipped (%d in a row)",
                        self.step + 1,
                        sums["loss"],
                        norm,
                        self.consecutive_bad,
                    )
                    if self.consecutive_bad > cfg.max_bad_steps:
                        raise RuntimeError(
                            f"{self.consecutive_bad} steps in a row had a non-finite loss or gradient (limit "
                            f"max_bad_steps={cfg.max_bad_steps}); lower optim.lr, use precision.mode=bf16 or fp32, "
                            "or check the cache with `python -m shared.cli verify`"
                        )
                else:
                    self.consecutive_bad = 0
                self.step += 1
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                dt = time.perf_counter() - t0
                for k in sums:
                    window[k] += sums[k]
                window["grad_norm"] += norm
                window["n"] += 1
                window["wait"] += wait
                window["time"] += dt
                window["samples"] += self.batch_size * accum * self.info.world_size
                metrics.advance()

                if self.step % cfg.logging.every == 0 or self.step == cfg.steps:
                    n = window["n"]
                    loss, mse, vb, gn = all_reduce_mean(
                        [window["loss"] / n, window["mse"] / n, window["vb"] / n, window["grad_norm"] / n], self.info
                    )
                    metrics.log(
                        self.step,
                        {
                            "loss": loss,
                            "mse": mse,
                            "vb": vb,
                            "grad_norm": gn,
                            "lr": self.schedule.lr_at(self.step - 1),
                            "samples_per_s": window["samples"] / max(window["time"], 1e-9),
                            "data_wait_share": window["wait"] / max(window["time"], 1e-9),
                            "memory_gib": memory_gib(self.device),
                            "skipped_steps": self.skipped_steps,
                        },
                    )
                    window = {k: 0.0 for k in window}

                if self.validator is not None:
                    self.validator.maybe_run(self, self.step, metrics.tb)
                stop = any_rank(self._stop_requested, self.info) if self.info.distributed else self._stop_requested
                due = cfg.checkpoint.every > 0 and self.step % cfg.checkpoint.every == 0
                if stop or due or (self.step == cfg.steps and cfg.checkpoint.save_final):
                    self.save()
                    last_saved = self.step
                if stop:
                    stopped_by_signal = True
                    logger.warning("stopped by SIGTERM at step %d; continue with checkpoint.resume=auto", self.step)
                    break
        finally:
            # Stop the loader workers here, on success and on an error alike: an exception's traceback keeps this
            # frame (and so the iterator) alive until interpreter exit, where waiting for workers would hang.
            close = getattr(batches, "close", None)
            if close is not None:
                close()
            metrics.close()
            if sample_log is not None:
                sample_log.close()
            signal.signal(signal.SIGTERM, previous)
        self.check_replicas_agree()
        return {
            "step": self.step,
            "stopped_by_signal": stopped_by_signal,
            "last_checkpoint": last_saved,
            "skipped_steps": self.skipped_steps,
            "checkpoints": [p.name for p in list_checkpoints(self.ckpt_root)],
        }

    def weights_digest(self) -> str:
        """sha256 over this rank's full weights (collective under FSDP2)."""
        state = full_model_state(self.inner)
        h = hashlib.sha256()
        for name in sorted(state):
            h.update(name.encode())
            h.update(state[name].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def check_replicas_agree(self) -> None:
        """DDP replicas must hold bit-identical weights; a mismatch means a desync bug, so stop loudly."""
        if not self.info.distributed or self.cfg.parallel.strategy != "ddp":
            barrier(self.info)
            return
        digests: list[str] = [""] * self.info.world_size
        dist.all_gather_object(digests, self.weights_digest())
        if self.info.is_main:
            (self.run_dir / "replica_digests.json").write_text(json.dumps(digests), encoding="utf-8")
        if len(set(digests)) != 1:
            raise RuntimeError(f"DDP replicas diverged: weight digests per rank {digests}")
        logger.info("all %d replicas hold identical weights (sha256 %s...)", self.info.world_size, digests[0][:12])

    def close(self) -> None:
        if dist.is_available() and dist.is_initialized():
            # DDP's Reducer holds the process group: freed only at interpreter teardown, a gloo group's destructor
            # joins its threads there with the GIL held and was seen to block forever once the peer rank had gone
            # (a rank that finished its run hung at exit). Free the wrapper (not the module) first, then the group.
            self.model = self.inner
            gc.collect()
            dist.destroy_process_group()
