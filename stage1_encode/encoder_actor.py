"""The encoder actor: VAE + BERT + mT5 loaded once, one chunk per call; returns the raw encoder outputs."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.encoders import EncoderDtypes, load_encoders
from shared.config import from_dict
from stage1_encode import preprocess as pp
from stage1_encode.config import EncodeConfig
from stage1_encode.payload import Item, pack, read_chunks_item, read_item

# Test plumbing, not a feature: "<n calls>:<marker file>" makes the encoder actor that serves its n-th `encode` call
# SIGKILL its own process at the start of that call, once (it creates the marker first; the restarted actor finds
# it and runs normally). Ray restarts the actor (max_restarts) and retries the call (max_task_retries).
KILL_ENV = "HYDIT_TEST_KILL_ENCODER"


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
        self.n_calls = 0

    def _kill_hook(self) -> None:
        """The KILL_ENV test hook: SIGKILL this actor's process on its n-th encode call, once."""
        spec = os.environ.get(KILL_ENV, "")
        if not spec:
            return
        n, marker = spec.split(":", 1)
        if self.n_calls >= int(n) and not os.path.exists(marker):
            Path(marker).write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)

    def encode(self, item: Item) -> Item:
        """One "chunks" item from a preprocessing task -> the encoded "chunks" item the shard writer consumes; each
        chunk is encoded on its own (one forward pass per encoder, at the chunk's shape)."""
        self.n_calls += 1
        self._kill_hook()
        out_arrays: dict[str, Any] = {}
        metas = []
        for i, (arrays, meta) in enumerate(read_chunks_item(item)):
            t0 = time.time()
            with torch.inference_mode():
                encoded = self._encode_arrays(arrays)
            meta["t_encode"] = [t0, time.time()]  # for the steady-state throughput (one clock per host)
            out_arrays.update({f"{i}.{k}": v for k, v in encoded.items()})
            metas.append(meta)
        return "chunks", pack(out_arrays), json.dumps({"chunks": metas})

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
        """One chunk's arrays -> its packed encoder outputs (the writer's input) and its meta."""
        return pack(self._encode_arrays(a)), meta

    def _encode_arrays(self, a: dict) -> dict[str, Any]:
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
        return out

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
