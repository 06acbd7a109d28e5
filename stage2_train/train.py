"""Stage 2: train the HunyuanDiT from a stage-1 cache.

    torchrun --nproc_per_node 8 stage2_train/train.py --config configs/train/hunyuandit-v1.2.yaml data.cache=/data/cache
    python stage2_train/train.py --config configs/train/demo.yaml data.cache=/tmp/cache run_dir=/tmp/run

Any config key can be overridden as key.sub=value (see stage2_train/config.py for every key and its meaning).

config sections (stage2_train/config.py, presets in configs/train/*.yaml):
  model       preset (DiT-g/2, DiT-XL/2, DiT-S/2, DiT-tiny/2), field overrides, start weights (init_from)
  data        the stage-1 cache, per-rank batch (or global_batch_size), loader workers, flip view, text dropout,
              start-up cache check (verify), corrupt-sample limit
  diffusion   noise schedule, betas, prediction type, MSE weighting, noise offset
  optim       AdamW lr, betas, eps, weight decay, gradient clipping
  schedule    warmup (log as the original, or linear) then constant or cosine
  ema         decay and storage dtype
  checkpoint  every N steps, keep last N, resume ("auto" = newest checkpoint that verifies)
  logging     log interval, TensorBoard, progress bar, per-rank sample audit
  parallel    ddp | fsdp2, activation checkpointing, torch.compile, process-group backend
  precision   bf16 (default) | fp16 (loss scaling) | fp32
  training    parts: all (default) | lora (only a peft LoRA adapter trains, docs/lora.md)
  lora        rank, alpha (= rank), dropout, target_modules, init_adapter, base_dtype

writes, under run_dir: config.yaml (resolved), metrics.jsonl, tensorboard/, checkpoints/step_XXXXXXX/
(model + EMA safetensors in the original key layout, optimizer, schedule, RNG, data position, config);
with training.parts=lora also adapters/step_XXXXXXX/ (adapter_model.safetensors + adapter_config.json, official layout).
Rank 0 logs one line per logging.every steps:
  step N | loss | mse | vb | grad_norm | lr | samples/s | data_wait % | mem GiB [| skipped N]

exit status: 0 done or stopped by SIGTERM after saving a checkpoint; 2 bad config, cache that does not fit the
model, missing checkpoint or other start-up error a user can fix (the message, no traceback); 1 anything else.
"""

from __future__ import annotations

import argparse
import faulthandler
import sys
from pathlib import Path

# `torchrun stage2_train/train.py` puts stage2_train/ first on sys.path, not the repo root: add the root so the
# packages import (and nothing in stage2_train/ can shadow a stdlib module).
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from shared.config import add_config_args, load_config  # noqa: E402
from stage2_train.config import TrainConfig  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_args(parser)
    parser.add_argument(
        "--resume",
        default=None,
        help='"auto" (latest complete checkpoint in <run_dir>/checkpoints) or a step folder; '
        "same as checkpoint.resume=...",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, *, exit_watchdog: bool = False) -> int:
    args = parse_args(argv)
    overrides = list(args.overrides)
    if args.resume is not None:
        overrides.append(f"checkpoint.resume={args.resume}")
    try:
        cfg = load_config(TrainConfig, args.config, overrides)

        from stage2_train.trainer import Trainer  # lazy: torch and the model stack cost seconds; --help skips them

        trainer = Trainer(cfg)
    except (ValueError, FileNotFoundError) as err:  # ConfigError is a ValueError; each message says how to fix it
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        trainer.train()
    finally:
        if exit_watchdog:  # the command line only: an in-process caller (a test, a notebook) must not be exited
            _exit_watchdog()
        trainer.close()
    return 0


def _exit_watchdog(seconds: float = 60.0) -> None:
    """Last resort against a hang once the run is over (its checkpoints and metrics are written): if closing the
    process group or interpreter teardown blocks (a C++ destructor joining threads with the GIL held, seen with
    gloo after the peer rank had gone), faulthandler's own C thread dumps every thread's stack and exits with
    status 1 after `seconds`."""
    faulthandler.dump_traceback_later(seconds, exit=True)


if __name__ == "__main__":
    sys.exit(main(exit_watchdog=True))
