"""`python -m stage1_encode --config configs/encode/<name>.yaml [--address ADDR] [--overwrite] [key=value ...]`"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from shared.config import ConfigError, add_config_args, load_config

DESCRIPTION = """\
Stage 1: encode an image-text corpus once with the frozen SDXL VAE, BERT and mT5 into a sharded cache
(zarr or webdataset shards + manifest.json) that stage 2 trains from.

Runs on an embedded local Ray by default; --address (or RAY_ADDRESS, as set by `ray job submit`) attaches to an
existing cluster. Re-running the same command resumes: completed shards are kept, only missing ones are encoded, and
a finished cache is left alone. A cache made with a different config is refused (the message lists the changed
keys) unless --overwrite is given. Bad inputs never stop the job: they are listed with a reason in rejects.jsonl.
"""

EPILOG = """\
config sections (see stage1_encode/config.py and configs/encode/*.yaml):
  input     where the corpus is and its format (arrow | indexkits | parquet | folder | jsonl | csv), column names
  output    root folder, format (webdataset | zarr), rows_per_shard (= the unit of resume), compression
  encoders  the ckpts/t2i folder, dtypes, text lengths, encoder batch size
  image     buckets or single resolution, crop, flip view, size / aspect / pixel-limit filters
  text      what an empty caption becomes (the original's default caption, or a reject)
  ray, log  runtime only (actors, GPUs, CPUs, memory, progress); may change between a run and its resume

exit status: 0 done (summary JSON on stdout), 2 bad config / schema / cache conflict, 130 interrupted.

examples:
  python -m stage1_encode --config configs/encode/demo.yaml
  python -m stage1_encode --config configs/encode/demo.yaml output.root=/tmp/cache ray.num_encoder_actors=2
  ray job submit --address http://HEAD:8265 --working-dir . -- \\
      python -m stage1_encode --config configs/encode/hunyuandit-v1.2.yaml input.paths=[/data/arrows]
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m stage1_encode",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_args(parser, example="output.root=/tmp/cache image.random_flip=true")
    parser.add_argument(
        "--address",
        default=None,
        help="Ray cluster to attach to (host:port or 'auto'); default: RAY_ADDRESS if set (ray job "
        "submit), else an embedded local Ray sized by the config's ray section",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="delete an existing cache in output.root that was made with a different config",
    )
    args = parser.parse_intermixed_args(argv)  # KEY=VALUE overrides may come before or after the options

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    from stage1_encode.config import EncodeConfig
    from stage1_encode.job import CacheConflictError, run

    try:
        cfg = load_config(EncodeConfig, args.config, args.overrides)
        summary = run(cfg, address=args.address, overwrite=args.overwrite)
    except (ConfigError, CacheConflictError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: completed shards are kept; run the same command again to resume", file=sys.stderr)
        return 130
    print(json.dumps(summary, ensure_ascii=False, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
