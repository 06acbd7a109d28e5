"""The preprocessing Ray task: one partition -> encoder-sized chunks of cropped pixels and tokens, then its rejects.

`preprocess_partition` runs as a streaming-generator Ray task: the driver receives only the ObjectRefs of the items
it yields, in order, and hands each chunk's ref to an encoder actor and the final "end" item's ref to the writer."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import numpy as np

from shared.config import from_dict
from stage1_encode import preprocess as pp
from stage1_encode.config import EncodeConfig
from stage1_encode.payload import Item, make_chunks_item, make_item
from stage1_encode.readers import Partition, read_partition

_WORKER_CACHE: dict[str, Any] = {}


def _worker_cfg(cfg_dict: dict) -> EncodeConfig:
    key = "cfg:" + json.dumps(cfg_dict, sort_keys=True)
    if key not in _WORKER_CACHE:
        _WORKER_CACHE[key] = from_dict(EncodeConfig, cfg_dict)
    return _WORKER_CACHE[key]


def _tokenizers(root: str) -> tuple[Any, Any]:
    key = "tok:" + str(root)
    if key not in _WORKER_CACHE:
        _WORKER_CACHE[key] = pp.load_tokenizers(root)
    return _WORKER_CACHE[key]


def reject_record(row: dict, reason: str, detail: str) -> dict:
    return {
        "key": row.get("key"),
        "source": row.get("source"),
        "row": row.get("row"),
        "reason": reason,
        "detail": detail,
    }


def _reject_from(row: dict, err: Exception) -> dict:
    """A Reject keeps its reason; anything else a row's bytes make PIL or numpy raise is a "preprocess_error"."""
    if isinstance(err, pp.Reject):
        return reject_record(row, err.reason, err.detail)
    return reject_record(row, "preprocess_error", f"{type(err).__name__}: {err}")


def partition_chunks(
    part: Partition, cfg: EncodeConfig, tokenizers: tuple[Any, Any]
) -> Iterator[tuple[str, dict[str, np.ndarray], dict]]:
    """Yield ("chunk", arrays, meta) per encoder batch of `part`, then ("end", {}, meta) with the rejects.

    Pass 1 reads every row, checks the caption and the image header (size, pixel limit) and assigns the bucket;
    pass 2 groups rows by bucket (first appearance order, then row order), decodes and crops `batch_size` at a time.
    Only compressed bytes are held for the whole partition; decoded pixels only for one chunk.
    """
    im, B = cfg.image, cfg.encoders.batch_size
    default = cfg.text.default_caption if cfg.text.empty_caption == "default" else None
    rejects: list[dict] = []
    groups: dict[tuple[int, int], list[tuple[dict, str, bool, Any]]] = {}
    n_rows = 0
    seen_rows: set[int] = set()
    for row in read_partition(part, cfg.input, cfg.storage):
        n_rows += 1
        seen_rows.add(int(row["row"]))
        try:
            if row.get("error"):
                raise pp.Reject(row.get("error_reason") or "read_error", str(row["error"]))
            img = pp.open_image(row["image"], im.max_pixels)  # header only: the pixels are decoded in pass 2
            pp.check_size(*img.size, im.min_size, im.max_aspect_ratio)
            caption, substituted = pp.clean_caption(row["caption"], default, cfg.text.null_caption)
            bucket = pp.target_size(*img.size, im)
        except Exception as err:  # one bad row must not take down the partition: it becomes a reject
            rejects.append(_reject_from(row, err))
            continue
        # The checked, undecoded image travels to pass 2 (a lazy PIL image over the row's bytes, no pixels yet):
        # pass 2 decodes and crops it without re-running open_image / check_size / target_size.
        groups.setdefault(bucket, []).append((row, caption, substituted, img))
    # A row the plan counted but the reader never returned (the file changed since planning) is recorded, not lost.
    planned = part.rows if part.rows is not None else range(part.start, part.stop)
    for r in sorted(set(planned) - seen_rows):
        rejects.append(
            {
                "key": None,
                "source": part.source,
                "row": r,
                "reason": "read_error",
                "detail": "planned but not returned by the reader (source changed since planning?)",
            }
        )
        n_rows += 1

    seq = 0
    clip_tok, t5_tok = tokenizers
    for bucket, members in groups.items():
        for start in range(0, len(members), B):
            pixels, metas, keep = [], [], []
            for row, caption, substituted, img in members[start : start + B]:
                try:
                    cropped = pp.crop_to_target(pp.to_rgb(img), row["key"], im, bucket)
                except Exception as err:
                    rejects.append(_reject_from(row, err))
                    continue
                finally:
                    img.close()
                pixels.append(cropped.pixels)
                metas.append(cropped.image_meta_size)
                keep.append((row, caption, substituted))
            if not keep:
                continue
            captions = [c for _, c, _ in keep]
            arrays = {"pixels": np.stack(pixels), "image_meta_size": np.stack(metas)}  # (B, H, W, 3), (B, 6)
            arrays.update(pp.tokenize(clip_tok, t5_tok, captions, cfg.encoders.clip_len, cfg.encoders.t5_len))
            meta = {
                "bucket": list(bucket),
                "keys": [r["key"] for r, _, _ in keep],
                "captions": captions,
                "sources": [r["source"] for r, _, _ in keep],
                "rows": [int(r["row"]) for r, _, _ in keep],
                "substituted": [bool(s) for _, _, s in keep],
                "null": [r["caption"] is None for r, _, _ in keep],
            }
            yield "chunk", arrays, meta | {"seq": seq}
            seq += 1
    yield "end", {}, {"n_chunks": seq, "n_rows": n_rows, "rejects": rejects}


def preprocess_partition(cfg_dict: dict, part: dict) -> Iterator[Item]:
    """Ray task (streaming generator): the items of one partition (dataclasses.asdict of a Partition): "chunks"
    items (consecutive chunks up to ray.item_mb of pixels), then its "end" item."""
    cfg = _worker_cfg(cfg_dict)
    part = Partition(**{k: tuple(v) if isinstance(v, list) else v for k, v in part.items()})
    group: list[tuple[dict, dict]] = []
    nbytes, item_bytes = 0, cfg.ray.item_mb * 2**20
    for kind, arrays, meta in partition_chunks(part, cfg, _tokenizers(cfg.encoders.root)):
        if kind == "end":
            if group:
                yield make_chunks_item(group)
            yield make_item(kind, arrays, meta)
            continue
        group.append((arrays, meta))
        nbytes += arrays["pixels"].nbytes
        if nbytes >= item_bytes:
            yield make_chunks_item(group)
            group, nbytes = [], 0


def preprocess_empty(cfg_dict: dict) -> Item:
    """Ray task: the tokens of the empty caption (the encoders' check and the CFG dropout target)."""
    cfg = _worker_cfg(cfg_dict)
    arrays = pp.tokenize(*_tokenizers(cfg.encoders.root), [""], cfg.encoders.clip_len, cfg.encoders.t5_len)
    return make_item("empty", arrays, {})
