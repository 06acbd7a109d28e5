"""Payloads between Ray tasks and actors: an item is (kind, safetensors bytes, ASCII JSON meta), never a pickle of
data-derived objects (Ray pickles the tuple of bytes and str, nothing else)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
from safetensors.torch import load, save

Item = tuple[str, bytes, str]  # kind ("chunks" | "end" | "empty"), packed arrays (b"" for none), meta


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


def make_chunks_item(chunks: list[tuple[dict[str, Any], dict]]) -> Item:
    """Several chunks (arrays, meta), in chunk order, as one item: one Ray object and one call for all of them.

    Each chunk keeps its own arrays (named "<i>.<field>") and meta, so the encoder still runs one forward pass per
    chunk with the chunk's own shape: grouping changes how many Ray calls carry the chunks, never what is computed."""
    arrays = {f"{i}.{k}": v for i, (a, _) in enumerate(chunks) for k, v in a.items()}
    return make_item("chunks", arrays, {"chunks": [m for _, m in chunks]})


def read_chunks_item(item: Item) -> list[tuple[dict[str, Any], dict]]:
    """The (arrays, meta) of each chunk of a "chunks" item, in chunk order."""
    kind, arrays, meta = read_item(item)
    assert kind == "chunks", kind
    out: list[tuple[dict[str, Any], dict]] = [({}, m) for m in meta["chunks"]]
    for name, v in arrays.items():
        i, field = name.split(".", 1)
        out[int(i)][0][field] = v
    return out
