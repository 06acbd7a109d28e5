"""Fold a LoRA adapter into its base model: a full checkpoint in the original key layout (+ a diffusers folder).

    python -m stage2_train.merge_lora --config runs/lora/config.yaml --adapter runs/lora/adapters/step_0002000 \\
        --out runs/lora/merged [--base ckpts/t2i/model/pytorch_model_ema.pt] [--diffusers]

The model architecture comes from the run's config (model.preset / model.overrides), the base weights from
model.init_from unless --base is given. Writes <out>/model.safetensors (the original's names, as its lora/merge.py
saves, loadable with model.init_from or pipeline.checkpoints) and, with --diffusers, <out>/diffusers/ (a
HunyuanDiT2DModel folder, Wqkv split into to_q/to_k/to_v by pipeline.checkpoints.export_diffusers).
Exit 2 on a user error (the message says which input), 0 when written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# `python stage2_train/merge_lora.py` puts stage2_train/ first on sys.path, not the repo root: add the root so the
# packages below import.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from pipeline import lora  # noqa: E402
from pipeline.checkpoints import export_diffusers  # noqa: E402
from pipeline.models import HunYuanDiT  # noqa: E402
from shared.config import load_config  # noqa: E402
from stage2_train.config import TrainConfig  # noqa: E402
from stage2_train.trainer import build_model_config, load_init_weights  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the LoRA run's config.yaml (or the preset it used)")
    parser.add_argument("--adapter", required=True, help="adapter folder (adapter_model.safetensors + config)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--base", default=None, help="base weights instead of the config's model.init_from")
    parser.add_argument("--diffusers", action="store_true", help="also write a diffusers folder <out>/diffusers")
    args = parser.parse_args(argv)

    try:
        cfg = load_config(TrainConfig, args.config, [])
        if args.base:
            cfg.model.init_from = args.base
        if not cfg.model.init_from:
            raise ValueError("no base weights: the config's model.init_from is empty; pass --base <checkpoint>")
        model = HunYuanDiT(build_model_config(cfg))
        load_init_weights(model, cfg)
        lora.apply_adapter(model, args.adapter)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    merged = lora.merge_lora(model.float())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in merged.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), {"format": "pt", "merged_adapter": str(args.adapter)})
    print(f"wrote {out / 'model.safetensors'} ({len(state)} tensors, original key layout)")
    if args.diffusers:
        with torch.no_grad():
            export_diffusers(merged, out / "diffusers")
        print(f"wrote {out / 'diffusers'} (diffusers HunyuanDiT2DModel)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
