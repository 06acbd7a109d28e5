"""Payloads between Ray tasks and actors: an item is (kind, safetensors bytes, ASCII JSON meta), never a pickle of
data-derived objects (Ray pickles the tuple of bytes and str, nothing else)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
from safetensors.torch import load, save

Item = tuple[str, bytes, str]  # kind ("chunk" | "end" | "empty"), packed arrays (b"" for none), meta


def pack(arrays: dict[str, Any]) -> bytes:
    out = {}
    for k, v in arrays.items():
        t = torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v
        out[k] = t.detach().cpu().contiguous()
    return save(out)


def unpack(data: bytes) -> dict[str, Any]:
    return load(bytes(data))


def make_item(kind: str, arrays: dict[str, Any], meta: dict) -> Item:
    # meta as ASCII JSON: a non-UTF-8 file name (lone surrogates in `sources`) travels as its escape
    return kind, pack(arrays) if arrays else b"", json.dumps(meta)


def read_item(item: Item) -> tuple[str, dict[str, Any], dict]:
    kind, payload, meta = item
    return kind, unpack(payload) if payload else {}, json.loads(meta)
