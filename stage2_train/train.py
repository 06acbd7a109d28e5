"""Stage 2: train the HunyuanDiT from a stage-1 cache.

    torchrun --nproc_per_node 8 stage2_train/train.py --config configs/train/hunyuandit-v1.2.yaml data.cache=/data/cache
    python stage2_train/train.py --config configs/train/demo.yaml data.cache=/tmp/cache run_dir=/tmp/run

Any config key can be overridden as key.sub=value (see stage2_train/config.py for every key and its meaning).
"""

from __future__ import annotations

import argparse
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
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_args(parser)
    parser.add_argument("--resume", default=None,
                        help='"auto" (latest complete checkpoint in <run_dir>/checkpoints) or a step folder; '
                             "same as checkpoint.resume=...")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = list(args.overrides)
    if args.resume is not None:
        overrides.append(f"checkpoint.resume={args.resume}")
    cfg = load_config(TrainConfig, args.config, overrides)

    from stage2_train.trainer import Trainer

    trainer = Trainer(cfg)
    try:
        trainer.train()
    finally:
        trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
