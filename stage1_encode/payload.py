"""Payloads between Ray stages: safetensors bytes (never pickle) + a JSON string."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
from safetensors.torch import load, save

COLUMNS = ("part", "kind", "seq", "payload", "meta")


def pack(arrays: dict[str, Any]) -> bytes:
    out = {}
    for k, v in arrays.items():
        t = torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v
        out[k] = t.detach().cpu().contiguous()
    return save(out)


def unpack(data: bytes) -> dict[str, Any]:
    return load(bytes(data))


def _out_row(part: str, kind: str, seq: int, payload: bytes, meta: dict) -> dict[str, np.ndarray]:
    # meta as ASCII JSON: a non-UTF-8 file name (lone surrogates in `sources`) must not break Arrow's utf8 column
    return {
        "part": np.array([part]), "kind": np.array([kind]), "seq": np.array([seq], dtype=np.int64),
        "payload": np.array([payload], dtype=object), "meta": np.array([json.dumps(meta)]),
    }
