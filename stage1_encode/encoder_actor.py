"""The encoder actor: VAE + BERT + mT5 loaded once, one chunk per call; returns the raw encoder outputs."""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import torch

from pipeline.encoders import EncoderDtypes, load_encoders
from shared.config import from_dict
from stage1_encode import preprocess as pp
from stage1_encode.config import EncodeConfig
from stage1_encode.payload import Item, pack, read_item


class EncoderActor:
    """Loads VAE + BERT + mT5 once; encodes exactly one chunk per call under torch.inference_mode()."""

    def __init__(self, cfg_dict: dict) -> None:
        self.cfg = from_dict(EncodeConfig, cfg_dict)
        r, e = self.cfg.ray, self.cfg.encoders
        if r.torch_threads > 0:
            torch.set_num_threads(r.torch_threads)
        device = "cuda" if r.num_gpus_per_actor > 0 else "cpu"
        self.enc = load_encoders(
            e.root,
            EncoderDtypes(vae=e.vae_dtype, clip=e.clip_dtype, t5=e.t5_dtype),
            device=device,
            clip_len=e.clip_len,
            t5_len=e.t5_len,
        )
        self.views = pp.image_views(self.cfg.image)

    def encode(self, item: Item) -> Item:
        """One chunk item from a preprocessing task -> the encoded chunk item the shard writer consumes."""
        kind, arrays, meta = read_item(item)
        assert kind == "chunk", kind  # the driver sends "end" items straight to the writer
        t0 = time.time()
        with torch.inference_mode():
            payload, meta = self.encode_chunk(arrays, meta)
        meta["t_encode"] = [t0, time.time()]  # for the steady-state throughput (one clock per host)
        return "chunk", payload, json.dumps(meta)

    def encode_empty_item(self, item: Item) -> Item:
        kind, arrays, _ = read_item(item)
        assert kind == "empty", kind
        with torch.inference_mode():
            payload, meta = self.encode_empty(arrays)
        return "empty", payload, json.dumps(meta)

    def _text(self, a: dict) -> tuple[Any, Any]:
        clip = self.enc.encode_clip(a["clip_ids"].long(), a["clip_mask"].long())  # (B, Lc, Dc)
        t5 = self.enc.encode_t5(a["t5_ids"].long(), a["t5_mask"].long())  # (B, Lt, Dt)
        return clip, t5

    def encode_chunk(self, a: dict, meta: dict) -> tuple[bytes, dict]:
        px = a["pixels"].numpy()  # (B, H, W, 3) uint8
        B, H, W, _ = px.shape
        V = len(self.views)
        views = np.stack([pp.make_views(p, self.views) for p in px])  # (B, V, 3, H, W)
        moments = self.enc.encode_images(torch.from_numpy(views.reshape(B * V, 3, H, W)))  # (B*V, 2C, h, w)
        moments = moments.reshape(B, V, *moments.shape[1:]).cpu()  # (B, V, 2C, h, w)
        clip, t5 = self._text(a)
        clip, t5 = clip.cpu(), t5.cpu()
        # Only what needs the encoders happens here; the inf/NaN check, the per-sample split and the stored layout
        # are the writer's (shared/schema.encode_sample), off the encoder's thread.
        out = {"moments": moments, "clip_states": clip, "t5_states": t5, "image_meta_size": a["image_meta_size"]}
        for k in ("clip_ids", "clip_mask", "t5_ids", "t5_mask"):
            out[k] = a[k]
        return pack(out), meta

    def encode_empty(self, a: dict) -> tuple[bytes, dict]:
        clip, t5 = self._text(a)
        out = {
            "clip_ids": a["clip_ids"],
            "clip_mask": a["clip_mask"],
            "clip_states": clip,
            "t5_ids": a["t5_ids"],
            "t5_mask": a["t5_mask"],
            "t5_states": t5,
        }
        meta = {
            "fingerprint": self.enc.fingerprint(),
            "scaling_factor": self.enc.scaling_factor,
            "latent_channels": self.enc.latent_channels,
            "clip_dim": self.enc.clip_dim,
            "t5_dim": self.enc.t5_dim,
        }
        return pack(out), meta
