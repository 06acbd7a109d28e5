"""The encoder actor: VAE + BERT + mT5 loaded once, one chunk per call."""

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
from stage1_encode.payload import COLUMNS, _out_row, pack, unpack


class EncoderActor:
    """Loads VAE + BERT + mT5 once; encodes exactly one chunk per call under torch.inference_mode()."""

    def __init__(self, cfg_dict: dict) -> None:
        self.cfg = from_dict(EncodeConfig, cfg_dict)
        r, e = self.cfg.ray, self.cfg.encoders
        if r.torch_threads > 0:
            torch.set_num_threads(r.torch_threads)
        device = "cuda" if r.num_gpus_per_actor > 0 else "cpu"
        self.enc = load_encoders(e.root, EncoderDtypes(vae=e.vae_dtype, clip=e.clip_dtype, t5=e.t5_dtype),
                                 device=device, clip_len=e.clip_len, t5_len=e.t5_len)
        self.views = pp.image_views(self.cfg.image)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = []
        with torch.inference_mode():
            for i in range(len(batch["kind"])):
                part, kind, seq = str(batch["part"][i]), str(batch["kind"][i]), int(batch["seq"][i])
                payload, meta = batch["payload"][i], json.loads(batch["meta"][i])
                if kind == "chunk":
                    t0 = time.time()
                    payload, meta = self.encode_chunk(unpack(payload), meta)
                    meta["t_encode"] = [t0, time.time()]  # for the steady-state throughput (same clock: one host)
                elif kind == "empty":
                    payload, meta = self.encode_empty(unpack(payload))
                rows.append(_out_row(part, kind, seq, payload, meta))
        return {c: np.concatenate([r[c] for r in rows]) for c in COLUMNS}

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
        clip_mask = a["clip_mask"].bool()
        ok = []
        rejects = []
        for b in range(B):
            bad = [name for name, x in (("moments", moments[b]), ("clip_states", clip[b][clip_mask[b]]),
                                        ("t5_states", t5[b])) if not bool(torch.isfinite(x.float()).all())]
            if bad:
                rejects.append({"key": meta["keys"][b], "source": meta["sources"][b], "row": meta["rows"][b],
                                "reason": "nonfinite_output", "detail": f"inf/NaN in {', '.join(bad)}"})
            else:
                ok.append(b)
        idx = torch.tensor(ok, dtype=torch.long)
        out = {"moments": moments[idx], "clip_states": clip[idx], "t5_states": t5[idx],
               "image_meta_size": a["image_meta_size"][idx]}
        for k in ("clip_ids", "clip_mask", "t5_ids", "t5_mask"):
            out[k] = a[k][idx]
        keep_meta = {k: [meta[k][b] for b in ok]
                     for k in ("keys", "captions", "sources", "rows", "substituted", "null")}
        keep_meta.update({"bucket": meta["bucket"], "rejects": rejects})
        return pack(out), keep_meta

    def encode_empty(self, a: dict) -> tuple[bytes, dict]:
        clip, t5 = self._text(a)
        out = {"clip_ids": a["clip_ids"], "clip_mask": a["clip_mask"], "clip_states": clip,
               "t5_ids": a["t5_ids"], "t5_mask": a["t5_mask"], "t5_states": t5}
        meta = {"fingerprint": self.enc.fingerprint(), "scaling_factor": self.enc.scaling_factor,
                "latent_channels": self.enc.latent_channels,
                "clip_dim": self.enc.clip_dim, "t5_dim": self.enc.t5_dim}
        return pack(out), meta
