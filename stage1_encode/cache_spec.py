"""What the cache records about its encoders and preprocessing: dims from the encoder folder, the CacheSpec, and the
manifest's preprocessing record."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.encoders import resolve_encoder_paths, vae_downsample_factor
from pipeline.text import T5_TRAIN_PAD_ID
from shared.config import config_to_dict
from shared.schema import CacheSpec
from stage1_encode import preprocess as pp
from stage1_encode.config import EncodeConfig


def encoder_dims(encoder_root: str | Path) -> dict[str, Any]:
    """Latent channels, downsample and text dims from the config.json files (no weights loaded),
    so shard writers can be opened before the encoder actors report; the actors' values are checked against them."""
    paths = resolve_encoder_paths(encoder_root)
    vae = json.loads((paths["vae"] / "config.json").read_text())
    clip = json.loads((paths["clip"] / "config.json").read_text())
    t5 = json.loads((paths["t5"] / "config.json").read_text())
    return {
        "latent_channels": int(vae.get("latent_channels", 4)),
        "downsample": vae_downsample_factor(vae.get("block_out_channels", [0, 0, 0, 0])),
        "clip_dim": int(clip["hidden_size"]),
        "t5_dim": int(t5["d_model"]),
    }


def cache_spec(cfg: EncodeConfig, dims: dict[str, Any]) -> CacheSpec:
    e = cfg.encoders
    return CacheSpec(
        format=cfg.output.format,
        views=pp.image_views(cfg.image),
        clip_len=e.clip_len,
        clip_dim=dims["clip_dim"],
        t5_len=e.t5_len,
        t5_dim=dims["t5_dim"],
        latent_channels=dims["latent_channels"],
        downsample=dims["downsample"],
        vae_dtype=e.vae_dtype,
        clip_dtype=e.clip_dtype,
        t5_dtype=e.t5_dtype,
        compression=cfg.output.compression,
        t5_pad_id=T5_TRAIN_PAD_ID,  # clip_pad_id: checked in _accept_encoders
    )


def preprocessing_record(cfg: EncodeConfig) -> dict:
    """What the manifest says about how images and captions were prepared."""
    im = cfg.image
    return {
        "image": config_to_dict(im),
        "text": config_to_dict(cfg.text),
        "resize_filter": "LANCZOS",
        "crop_rule": (
            "ArrowIndexV2.resize_and_crop (cover resize, int(round()))"
            if im.multireso
            else "random_crop_image (short side to R, int(), crop along the long side)"
        ),
        "crop_rng": "random.Random(sha256(f'{seed}\\0{key}')[:8]); multireso draws top then left",
        "normalize": "ToTensor + Normalize(0.5, 0.5), float32",
        "views": list(pp.image_views(im)),
        "image_meta_size": "(orig_W, orig_H, target_W, target_H, crop_left, crop_top), flip after meta, not mirrored",
        "encode_batch_size": cfg.encoders.batch_size,
    }
