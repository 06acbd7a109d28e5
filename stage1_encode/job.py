"""The stage-1 Ray Data job: corpus partitions -> preprocess (CPU tasks) -> encoders (actor pool) -> shards.

    partitions not yet completed (one Ray row each, plus one "empty caption" item)
      -> map_batches(preprocess_partition_udf, TaskPoolStrategy)   read, decode, resize/crop, tokenise; one output
                                                                    row per encoder batch ("chunk") + an "end" row
      -> map_batches(EncoderActor, ActorPoolStrategy(size=n))      one chunk = one forward pass per encoder
      -> driver: iter_rows() -> one ShardWriter per partition, shard written when all its chunks + end arrived

Exactness. A chunk holds up to `encoders.batch_size` samples of one bucket, cut from the partition in row order,
and the actor encodes exactly one chunk per call (`batch_size=1` rows). Batch composition is therefore a function of
the data alone, not of scheduling, so CPU BLAS results (which depend on batch shape) are the same with 1 or N actors.
Crop offsets come from an RNG seeded by the sample key. Chunks reach the driver in any order; the assembler writes
them in chunk order, so a shard's bytes (and sha256) are reproducible.

Why the driver writes the shards. Each shard then has exactly one writer by construction (no cross-actor
coordination, no two-phase commit to get right), resume is "skip partitions whose shard is complete", and a dead
worker can never leave a half-written shard that looks complete (writers rename into place, then write the sidecar).
Writing costs the driver a memcpy and a file write per sample, far below encoder time; if it ever is the bottleneck,
raise rows_per_shard or use several driver processes on disjoint inputs.

Resume. `encode_config.yaml` is written first; a re-run with an equal config (runtime sections `ray`/`log` and the
locations `output.root`/`encoders.root` may differ: a copied cache resumes) skips completed shards, and a finished
cache (manifest.json present) is left alone. `.tmp-*` leftovers of a killed run are removed before a resume encodes.
Per-partition rejects are written next to the shard (rejects_parts/<name>.jsonl, before the shard is closed), merged
into rejects.jsonl at the end, then the manifest is written last.

Object storage (`output.root=s3://bucket/prefix`). The driver writes everything into a local staging folder exactly
as above, and publishes each finished shard right away (shard_files: data, index, sidecar last; see
shared/remote_cache.publish_shard), then deletes its staged data: the driver never holds more than the shards in
flight. The config goes up first, the encoders' fingerprint and empty caption when they arrive, rejects after all
shards, the manifest last. Resume lists the shards whose sidecar and data exist remotely. Ray workers touch no
shared path: they receive partitions and return encoded chunks, the driver alone writes.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import shutil
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import numpy as np

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

from shared.config import config_to_dict, dump_config, from_dict, save_config
from shared.fsutil import atomic_write_bytes, atomic_write_json, remove_path, remove_tmp_leftovers
from shared.manifest import (
    EMPTY_CAPTION_NAME, MANIFEST_NAME, REJECTS_NAME, SHARDS_DIR, Manifest, ShardInfo, completed_shards,
    read_manifest, write_manifest,
)
from shared.schema import CacheSpec
from shared.storage import RemoteStore, is_remote
from stage1_encode import preprocess as pp
from stage1_encode.config import LOCATION_FIELDS, RUNTIME_SECTIONS, EncodeConfig
from stage1_encode.ray_reaper import ENV_VAR as REAPER_ENV_VAR
from stage1_encode.ray_reaper import RayReaper
from stage1_encode.readers import Partition, plan_partitions, read_partition

logger = logging.getLogger("stage1_encode")

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_NAME = "encode_config.yaml"
LOG_NAME = "encode.log"
ENCODERS_NAME = "encoders.json"
LOCK_NAME = "encode.lock"  # flock: one job per cache (see CacheLock)
PARTS_DIR = "partitions"  # per-partition notes: rejects, substituted captions
COLUMNS = ("part", "kind", "seq", "payload", "meta")


class CacheConflictError(ValueError):
    """The output folder holds a cache made with a different config (or something that is not a cache)."""


# ----------------------------------------------------------------------------------------------------------------------
# Config identity and the output folder


def _content_part(d: dict) -> dict:
    """`d` (a config as a dict) without the runtime sections and the location fields."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in d.items() if k not in RUNTIME_SECTIONS}
    for section, key in LOCATION_FIELDS:
        if isinstance(out.get(section), dict):
            out[section].pop(key, None)
    return out


def identity(cfg: EncodeConfig) -> dict:
    """The part of the config that defines the cache's content: not the runtime sections, not where the cache and
    the encoders are stored (a copied cache resumes in its new place; the encoders are checked by fingerprint)."""
    return _content_part(config_to_dict(cfg))


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): d}


def config_diff(old: dict, new: dict) -> list[str]:
    """Human lines `key: old -> new` for every dotted key whose value differs."""
    a, b = _flatten(old), _flatten(new)
    return [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}" for k in sorted(set(a) | set(b))
            if a.get(k, "<absent>") != b.get(k, "<absent>")]


def _load_saved_identity(root: Path) -> dict:
    import yaml

    return _saved_identity(yaml.safe_load((root / CONFIG_NAME).read_text(encoding="utf-8")) or {})


def _saved_identity(data: dict) -> dict:
    """The identity part of a saved encode_config.yaml."""
    try:  # keys added to the config since this cache was made compare as their defaults
        data = config_to_dict(from_dict(EncodeConfig, data))
    except (ValueError, TypeError):  # no longer a valid config (ConfigError is a ValueError): compared as written
        pass
    return _content_part(data)


_CACHE_ENTRIES = (CONFIG_NAME, MANIFEST_NAME, EMPTY_CAPTION_NAME, REJECTS_NAME, SHARDS_DIR, PARTS_DIR,
                  ENCODERS_NAME, LOG_NAME)
# What may be in a folder without a config that is still ours (a fresh run killed before it wrote its config).
_OURS_WITHOUT_CONFIG = (LOG_NAME, LOCK_NAME)


class CacheLock:
    """An exclusive flock on `<root>/encode.lock`, held for the whole run.

    Two jobs never write one cache, so a job may delete the `.tmp-*` leftovers it finds: no live writer owns them.
    The kernel drops the lock when the process ends, SIGKILL included; the empty file stays (copying it is harmless).
    """

    def __init__(self, root: Path) -> None:
        self.fd: int | None = None
        if fcntl is None:  # pragma: no cover - no flock (Windows): one job per cache is then the user's to keep
            return
        try:
            fd = os.open(root / LOCK_NAME, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as e:
            if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                return  # a folder nobody may write needs no lock (a finished cache on read-only storage)
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise CacheConflictError(
                f"{root}: another stage-1 job is writing this cache (it holds {LOCK_NAME}); wait for it to end or "
                "choose another output.root"
            ) from None
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the only descriptor drops the flock
            self.fd = None


def _refuse_foreign(root: Path) -> None:
    if root.exists() and not root.is_dir():
        raise CacheConflictError(f"output.root {root} exists and is not a folder")
    if root.is_dir() and not (root / CONFIG_NAME).is_file() and any(
            p.name not in _OURS_WITHOUT_CONFIG for p in root.iterdir()):
        raise CacheConflictError(
            f"output.root {root} is not empty and is not a stage-1 cache (no {CONFIG_NAME}); refusing to write "
            "into it. Choose an empty or new folder."
        )


def prepare_output(root: Path, cfg: EncodeConfig, overwrite: bool) -> tuple[str, CacheLock]:
    """Decide what to do with the output folder: "fresh", "resume" or "complete", under the cache's lock (returned,
    held: release it when the run ends). Raises CacheConflictError."""
    _refuse_foreign(root)  # before anything is created in it, not even the lock file
    root.mkdir(parents=True, exist_ok=True)
    lock = CacheLock(root)
    try:
        return _prepare_locked(root, cfg, overwrite), lock
    except BaseException:
        lock.release()
        raise


def _prepare_locked(root: Path, cfg: EncodeConfig, overwrite: bool) -> str:
    _refuse_foreign(root)  # again: the folder may have changed before the lock was ours
    if (root / CONFIG_NAME).is_file():
        diff = config_diff(_load_saved_identity(root), identity(cfg))
        if not diff:
            return "complete" if (root / MANIFEST_NAME).is_file() else "resume"
        if not overwrite:
            raise CacheConflictError(
                f"{root} holds a cache made with a different config; changed:\n  " + "\n  ".join(diff)
                + "\nRe-run with the original config to resume, choose another output.root, or pass --overwrite "
                "to delete that cache and start over."
            )
    for name in _CACHE_ENTRIES:  # only what this job writes; never an unknown file
        p = root / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.is_symlink() or p.exists():
            p.unlink()
    save_config(cfg, root / CONFIG_NAME)
    return "fresh"


def remove_leftovers(root: Path) -> list[Path]:
    """Delete the temp files and folders that writes killed mid-way left in the cache (caller holds the lock).

    Only this job's own temp names (`.tmp-<name>-<pid>-<hex>` from shared.fsutil, the config's
    `.encode_config.yaml.tmp`), only directly in the cache folder, shards/ and partitions/; symlinks are unlinked,
    never followed.
    """
    removed = []
    for folder in (root, root / SHARDS_DIR, root / PARTS_DIR):
        removed += remove_tmp_leftovers(folder)
    config_tmp = root / f".{CONFIG_NAME}.tmp"  # save_config's temp name
    if config_tmp.is_symlink() or config_tmp.is_file():
        config_tmp.unlink()
        removed.append(config_tmp)
    return removed


def staging_root(cfg: EncodeConfig) -> Path:
    """The local staging folder of a remote output.root (one per URL; scratch, cleared at every start)."""
    import hashlib

    from shared.storage import default_dir

    digest = hashlib.sha256(cfg.output.root.rstrip("/").encode("utf-8")).hexdigest()[:16]
    return default_dir(cfg.storage.staging_dir, "HYDIT_STAGING", "staging") / digest


def prepare_remote_output(store: RemoteStore, staging: Path, cfg: EncodeConfig, overwrite: bool) -> str:
    """prepare_output for an object-storage root: the same decisions from the remote listing.

    The staging folder is rebuilt from the remote state: the saved config, the encoders' fingerprint, and the
    sidecar and partition note of every completed shard (what the final manifest and rejects are built from)."""
    import yaml

    from shared.remote_cache import remote_completed

    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    names = set(store.listdir(""))
    state = "fresh"
    if CONFIG_NAME in names:
        saved = yaml.safe_load(store.read_bytes(CONFIG_NAME).decode("utf-8")) or {}
        diff = config_diff(_saved_identity(saved), identity(cfg))
        if not diff:
            state = "complete" if MANIFEST_NAME in names else "resume"
        elif not overwrite:
            raise CacheConflictError(
                f"{store.url} holds a cache made with a different config; changed:\n  " + "\n  ".join(diff)
                + "\nRe-run with the original config to resume, choose another output.root, or pass --overwrite "
                "to delete that cache and start over.")
    elif names - {LOG_NAME}:
        raise CacheConflictError(f"output.root {store.url} is not empty and is not a stage-1 cache (no "
                                 f"{CONFIG_NAME}); refusing to write into it. Choose an empty or new prefix.")
    save_config(cfg, staging / CONFIG_NAME)
    if state != "fresh" and LOG_NAME in names:  # the log is appended to, as in a local cache
        store.download_file(LOG_NAME, staging / LOG_NAME)
    if state == "fresh":
        for name in _CACHE_ENTRIES:  # only what this job writes; never an unknown object
            if name in names:
                store.remove(name)
        store.upload_file(staging / CONFIG_NAME, CONFIG_NAME)
    elif state == "complete":
        store.download_file(MANIFEST_NAME, staging / MANIFEST_NAME)
    else:
        if ENCODERS_NAME in names:
            store.download_file(ENCODERS_NAME, staging / ENCODERS_NAME)
        for name in remote_completed(store, cfg.output.format):
            _stage_shard_meta(store, staging, name)
            store.download_file(f"{PARTS_DIR}/{name}.json", staging / PARTS_DIR / f"{name}.json")
    return state


def _remote_done(store: RemoteStore, staging: Path, fmt: str) -> dict[str, ShardInfo]:
    """The shards complete on the store, described by their sidecars (staged locally when published or resumed)."""
    from shared.manifest import read_shard_info
    from shared.remote_cache import remote_completed

    out = {}
    for name in remote_completed(store, fmt):
        if not (staging / SHARDS_DIR / f"{name}.json").exists():
            _stage_shard_meta(store, staging, name)
        out[name] = read_shard_info(staging, name)
    return out


def _stage_shard_meta(store: RemoteStore, staging: Path, name: str) -> None:
    """A completed remote shard's small files into the staging folder: its index file (the manifest is checked
    against every shard's keys) and its sidecar, sidecar last as on the store."""
    from shared.manifest import shard_index_path

    index = shard_index_path(staging, name)
    store.download_file(f"{SHARDS_DIR}/{index.name}", index)
    store.download_file(f"{SHARDS_DIR}/{name}.json", staging / SHARDS_DIR / f"{name}.json")


def encoder_dims(encoder_root: str | Path) -> dict[str, Any]:
    """Latent channels, downsample and text dims from the config.json files (no weights loaded),
    so shard writers can be opened before the encoder actors report; the actors' values are checked against them."""
    from pipeline.encoders import resolve_encoder_paths

    paths = resolve_encoder_paths(encoder_root)
    vae = json.loads((paths["vae"] / "config.json").read_text())
    clip = json.loads((paths["clip"] / "config.json").read_text())
    t5 = json.loads((paths["t5"] / "config.json").read_text())
    return {
        "latent_channels": int(vae.get("latent_channels", 4)),
        "downsample": 2 ** (len(vae.get("block_out_channels", [0, 0, 0, 0])) - 1),
        "clip_dim": int(clip["hidden_size"]),
        "t5_dim": int(t5["d_model"]),
    }


def cache_spec(cfg: EncodeConfig, dims: dict[str, Any]) -> CacheSpec:
    from pipeline.text import T5_TRAIN_PAD_ID

    e = cfg.encoders
    return CacheSpec(
        format=cfg.output.format, views=pp.image_views(cfg.image), clip_len=e.clip_len, clip_dim=dims["clip_dim"],
        t5_len=e.t5_len, t5_dim=dims["t5_dim"], latent_channels=dims["latent_channels"],
        downsample=dims["downsample"], vae_dtype=e.vae_dtype, clip_dtype=e.clip_dtype, t5_dtype=e.t5_dtype,
        compression=cfg.output.compression, t5_pad_id=T5_TRAIN_PAD_ID,  # clip_pad_id: checked in _accept_encoders
    )


def preprocessing_record(cfg: EncodeConfig) -> dict:
    """What the manifest says about how images and captions were prepared."""
    im = cfg.image
    return {
        "image": config_to_dict(im),
        "text": config_to_dict(cfg.text),
        "resize_filter": "LANCZOS",
        "crop_rule": ("ArrowIndexV2.resize_and_crop (cover resize, int(round()))" if im.multireso
                      else "random_crop_image (short side to R, int(), crop along the long side)"),
        "crop_rng": "random.Random(sha256(f'{seed}\\0{key}')[:8]); multireso draws top then left",
        "normalize": "ToTensor + Normalize(0.5, 0.5), float32",
        "views": list(pp.image_views(im)),
        "image_meta_size": "(orig_W, orig_H, target_W, target_H, crop_left, crop_top), flip after meta, not mirrored",
        "encode_batch_size": cfg.encoders.batch_size,
    }


# ----------------------------------------------------------------------------------------------------------------------
# Payloads between Ray stages: safetensors bytes (never pickle) + a JSON string


def pack(arrays: dict[str, Any]) -> bytes:
    import torch
    from safetensors.torch import save

    out = {}
    for k, v in arrays.items():
        t = torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v
        out[k] = t.detach().cpu().contiguous()
    return save(out)


def unpack(data: bytes) -> dict[str, Any]:
    from safetensors.torch import load

    return load(bytes(data))


def _out_row(part: str, kind: str, seq: int, payload: bytes, meta: dict) -> dict[str, np.ndarray]:
    # meta as ASCII JSON: a non-UTF-8 file name (lone surrogates in `sources`) must not break Arrow's utf8 column
    return {
        "part": np.array([part]), "kind": np.array([kind]), "seq": np.array([seq], dtype=np.int64),
        "payload": np.array([payload], dtype=object), "meta": np.array([json.dumps(meta)]),
    }


# ----------------------------------------------------------------------------------------------------------------------
# Preprocessing (CPU tasks)

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
    return {"key": row.get("key"), "source": row.get("source"), "row": row.get("row"), "reason": reason,
            "detail": detail}


def _reject_from(row: dict, err: Exception) -> dict:
    """A Reject keeps its reason; anything else a row's bytes make PIL or numpy raise is a "preprocess_error"."""
    if isinstance(err, pp.Reject):
        return reject_record(row, err.reason, err.detail)
    return reject_record(row, "preprocess_error", f"{type(err).__name__}: {err}")


def partition_chunks(part: Partition, cfg: EncodeConfig, tokenizers: tuple[Any, Any]
                     ) -> Iterator[tuple[str, dict[str, np.ndarray], dict]]:
    """Yield ("chunk", arrays, meta) per encoder batch of `part`, then ("end", {}, meta) with the rejects.

    Pass 1 reads every row, checks the caption and the image header (size, pixel limit) and assigns the bucket;
    pass 2 groups rows by bucket (first appearance order, then row order), decodes and crops `batch_size` at a time.
    Only compressed bytes are held for the whole partition; decoded pixels only for one chunk.
    """
    im, B = cfg.image, cfg.encoders.batch_size
    default = cfg.text.default_caption if cfg.text.empty_caption == "default" else None
    rejects: list[dict] = []
    groups: dict[tuple[int, int], list[tuple[dict, str, bool]]] = {}
    n_rows = 0
    seen_rows: set[int] = set()
    for row in read_partition(part, cfg.input, cfg.storage):
        n_rows += 1
        seen_rows.add(int(row["row"]))
        try:
            if row.get("error"):
                raise pp.Reject(row.get("error_reason") or "read_error", str(row["error"]))
            img = pp.open_image(row["image"], im.max_pixels)
            w, h = img.size
            img.close()
            pp.check_size(w, h, im.min_size, im.max_aspect_ratio)
            caption, substituted = pp.clean_caption(row["caption"], default, cfg.text.null_caption)
            bucket = pp.target_size(w, h, im)
        except Exception as err:  # one bad row must not take down the partition: it becomes a reject
            rejects.append(_reject_from(row, err))
            continue
        groups.setdefault(bucket, []).append((row, caption, substituted))
    # A row the plan counted but the reader never returned (the file changed since planning) is recorded, not lost.
    planned = part.rows if part.rows is not None else range(part.start, part.stop)
    for r in sorted(set(planned) - seen_rows):
        rejects.append({"key": None, "source": part.source, "row": r, "reason": "read_error",
                        "detail": "planned but not returned by the reader (source changed since planning?)"})
        n_rows += 1

    seq = 0
    clip_tok, t5_tok = tokenizers
    for bucket, members in groups.items():
        for start in range(0, len(members), B):
            pixels, metas, keep = [], [], []
            for row, caption, substituted in members[start:start + B]:
                try:
                    cropped = pp.resize_and_crop(pp.decode_image(row["image"], im.max_pixels), row["key"], im)
                except Exception as err:
                    rejects.append(_reject_from(row, err))
                    continue
                pixels.append(cropped.pixels)
                metas.append(cropped.image_meta_size)
                keep.append((row, caption, substituted))
            if not keep:
                continue
            captions = [c for _, c, _ in keep]
            arrays = {"pixels": np.stack(pixels), "image_meta_size": np.stack(metas)}  # (B, H, W, 3), (B, 6)
            arrays.update(pp.tokenize(clip_tok, t5_tok, captions, cfg.encoders.clip_len, cfg.encoders.t5_len))
            meta = {
                "bucket": list(bucket), "keys": [r["key"] for r, _, _ in keep], "captions": captions,
                "sources": [r["source"] for r, _, _ in keep], "rows": [int(r["row"]) for r, _, _ in keep],
                "substituted": [bool(s) for _, _, s in keep],
                "null": [r["caption"] is None for r, _, _ in keep],
            }
            yield "chunk", arrays, meta | {"seq": seq}
            seq += 1
    yield "end", {}, {"n_chunks": seq, "n_rows": n_rows, "rejects": rejects}


def preprocess_udf(batch: dict[str, np.ndarray], cfg_dict: dict) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data UDF (TaskPoolStrategy): one input row per partition (or the empty-caption item)."""
    cfg = _worker_cfg(cfg_dict)
    tokenizers = _tokenizers(cfg.encoders.root)
    for kind, spec in zip(batch["kind"], batch["partition"]):
        if kind == "empty":
            arrays = pp.tokenize(*tokenizers, [""], cfg.encoders.clip_len, cfg.encoders.t5_len)
            yield _out_row("", "empty", 0, pack(arrays), {})
            continue
        d = json.loads(spec)
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        part = Partition(**d)
        for kind_out, arrays, meta in partition_chunks(part, cfg, tokenizers):
            seq = meta.pop("seq", -1)
            yield _out_row(part.name, kind_out, seq, pack(arrays) if arrays else b"", meta)


# ----------------------------------------------------------------------------------------------------------------------
# Encoders (actor pool)


class EncoderActor:
    """Loads VAE + BERT + mT5 once; encodes exactly one chunk per call under torch.inference_mode()."""

    def __init__(self, cfg_dict: dict) -> None:
        import torch

        from pipeline.encoders import EncoderDtypes, load_encoders

        self.cfg = from_dict(EncodeConfig, cfg_dict)
        r, e = self.cfg.ray, self.cfg.encoders
        if r.torch_threads > 0:
            torch.set_num_threads(r.torch_threads)
        device = "cuda" if r.num_gpus_per_actor > 0 else "cpu"
        self.enc = load_encoders(e.root, EncoderDtypes(vae=e.vae_dtype, clip=e.clip_dtype, t5=e.t5_dtype),
                                 device=device, clip_len=e.clip_len, t5_len=e.t5_len)
        self.views = pp.image_views(self.cfg.image)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

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
        import torch

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
                "latent_channels": self.enc.latent_channels, "downsample": self.enc.vae_downsample,
                "clip_dim": self.enc.clip_dim, "t5_dim": self.enc.t5_dim}
        return pack(out), meta


# ----------------------------------------------------------------------------------------------------------------------
# Driver-side shard assembly


class ShardAssembler:
    """Collects one partition's encoded chunks (any arrival order) and writes its shard in chunk order."""

    def __init__(self, root: Path, name: str, spec: CacheSpec) -> None:
        from shared.cache import open_shard_writer

        self.root, self.name = root, name
        # overwrite: a shard that is not in completed_shards may still have data from a run that died between
        # rename and sidecar; it is rewritten.
        self.writer = open_shard_writer(root, name, spec, overwrite=True)
        self.pending: dict[int, tuple[dict, dict]] = {}
        self.next_seq = 0
        self.n_chunks: int | None = None
        self.n_rows: int | None = None
        self.rejects: list[dict] = []
        self.n_written = 0
        self.n_substituted = 0
        self.n_null = 0

    def add(self, kind: str, seq: int, payload: bytes, meta: dict) -> int:
        """Take one row; returns how many input rows it settled (written or rejected)."""
        if kind == "end":
            self.n_chunks = int(meta["n_chunks"])
            self.n_rows = int(meta["n_rows"])
            self.rejects.extend(meta["rejects"])
            settled = len(meta["rejects"])
        else:
            self.pending[seq] = (unpack(payload), meta)
            self.rejects.extend(meta["rejects"])
            settled = len(meta["keys"]) + len(meta["rejects"])
        while self.next_seq in self.pending:
            arrays, m = self.pending.pop(self.next_seq)
            for b, key in enumerate(m["keys"]):
                self.writer.add({
                    "key": key, "caption": m["captions"][b], "bucket": np.array(m["bucket"], dtype=np.int32),
                    "image_meta_size": arrays["image_meta_size"][b], "moments": arrays["moments"][b],
                    "clip_ids": arrays["clip_ids"][b], "clip_mask": arrays["clip_mask"][b],
                    "clip_states": arrays["clip_states"][b], "t5_ids": arrays["t5_ids"][b],
                    "t5_mask": arrays["t5_mask"][b], "t5_states": arrays["t5_states"][b],
                })
            self.n_written += len(m["keys"])
            self.n_substituted += sum(m["substituted"])
            self.n_null += sum(m["null"])
            self.next_seq += 1
        return settled

    @property
    def complete(self) -> bool:
        return self.n_chunks is not None and self.next_seq == self.n_chunks

    def finish(self) -> ShardInfo:
        """Notes first (atomically), then the shard: a completed shard always has its rejects recorded."""
        # every input row is accounted for: written or rejected, never silently dropped on the way
        assert self.n_written + len(self.rejects) == self.n_rows, (self.name, self.n_written, len(self.rejects),
                                                                    self.n_rows)
        note = {"name": self.name, "written": self.n_written, "substituted_captions": self.n_substituted,
                "null_captions": self.n_null,
                "rejects": self.rejects}
        path = self.root / PARTS_DIR / f"{self.name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, note)
        return self.writer.close()

    def abort(self) -> None:
        abort = getattr(self.writer, "abort", None)
        if abort is not None:
            try:
                abort()
            except Exception:  # best effort: temp names are ignored by readers anyway
                pass


# ----------------------------------------------------------------------------------------------------------------------
# Progress


class Progress:
    """tqdm on a terminal; otherwise a plain log line every `interval_s` seconds. Counts settled input rows."""

    def __init__(self, total: int, enabled: bool, interval_s: float) -> None:
        self.total, self.done, self.written, self.rejected = total, 0, 0, 0
        self.t0 = time.time()
        self.last_log = self.t0
        self.interval_s = interval_s
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="sample", dynamic_ncols=True, desc="encode", smoothing=0.1)

    def update(self, written: int, rejected: int) -> None:
        self.written += written
        self.rejected += rejected
        self.done += written + rejected
        if self.bar is not None:
            self.bar.update(written + rejected)
            self.bar.set_postfix(rejected=self.rejected, refresh=False)
        elif time.time() - self.last_log >= self.interval_s:
            self.last_log = time.time()
            logger.info(self.line())

    def line(self) -> str:
        dt = max(time.time() - self.t0, 1e-9)
        rate = self.done / dt
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        return (f"progress {self.done}/{self.total} inputs ({self.written} written, {self.rejected} rejected), "
                f"{rate:.2f} samples/s, ETA {eta:.0f}s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ----------------------------------------------------------------------------------------------------------------------
# Ray


def init_ray(cfg: EncodeConfig, address: str | None) -> tuple[bool, RayReaper | None]:
    """Attach to a cluster (--address, ray.address, RAY_ADDRESS) or start an embedded local one.

    Returns (started: this call started Ray, reaper): an embedded Ray gets a reaper (stage1_encode/ray_reaper.py)
    that takes its processes down when the driver ends, SIGKILL included; close it after ray.shutdown().
    """
    import ray

    if ray.is_initialized():
        return False, None
    env = {"TOKENIZERS_PARALLELISM": "false"}
    address = address or cfg.ray.address
    if os.environ.get("RAY_ADDRESS") and not address:
        ray.init()  # under `ray job submit`: the job's runtime env (working_dir) already carries the code
        return True, None
    # Workers do not inherit this process's sys.path: give them the repository (same machine or shared FS).
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    if address:
        ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=True)
        return True, None
    reaper = RayReaper.start()
    previous = os.environ.get(REAPER_ENV_VAR)
    if reaper is not None:  # inherited by every process Ray starts now, and by the workers the raylet starts later
        os.environ[REAPER_ENV_VAR] = reaper.token
    try:
        ray.init(
            address="local", num_cpus=cfg.ray.num_cpus or os.cpu_count(),
            object_store_memory=int(cfg.ray.object_store_memory_gb * 1024**3), include_dashboard=False,
            runtime_env={"env_vars": env}, log_to_driver=True,
        )
    except BaseException:
        if reaper is not None:
            reaper.close()  # a start that failed half-way leaves processes too
        raise
    finally:
        if previous is None:
            os.environ.pop(REAPER_ENV_VAR, None)
        else:
            os.environ[REAPER_ENV_VAR] = previous
    return True, reaper


def _check_resources(cfg: EncodeConfig) -> None:
    import ray

    need = cfg.ray.num_gpus_per_actor * cfg.ray.num_encoder_actors
    have = ray.cluster_resources().get("GPU", 0)
    if need > have:
        raise ValueError(
            f"ray.num_gpus_per_actor={cfg.ray.num_gpus_per_actor} x ray.num_encoder_actors="
            f"{cfg.ray.num_encoder_actors} needs {need} GPUs but the cluster has {have}; the job would hang. "
            "Use ray.num_gpus_per_actor=0 to encode on CPU, or fewer actors."
        )


def build_dataset(cfg: EncodeConfig, partitions: list[Partition]):
    """The Ray Data pipeline (lazy): items -> preprocess tasks -> encoder actors."""
    import ray

    items = [{"kind": "empty", "partition": ""}]
    items += [{"kind": "part", "partition": json.dumps(dataclasses.asdict(p))} for p in partitions]
    cfg_dict = config_to_dict(cfg)
    r = cfg.ray
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(
        preprocess_udf, fn_kwargs={"cfg_dict": cfg_dict}, batch_size=1, batch_format="numpy",
        compute=ray.data.TaskPoolStrategy(size=r.preprocess_tasks), num_cpus=r.preprocess_num_cpus,
    )
    # One chunk per block: otherwise a preprocess task's chunks travel as one block, one actor encodes them all
    # (no balancing across actors) and the driver sees them only when the whole block is done.
    ds = ds.repartition(target_num_rows_per_block=1)
    # `memory=` also keeps Ray from fusing preprocessing into the actor (fusion needs equal remote args): on CPU a
    # fused actor would preprocess and encode serially.
    ds = ds.map_batches(
        EncoderActor, fn_constructor_kwargs={"cfg_dict": cfg_dict}, batch_size=1, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=r.num_encoder_actors), num_gpus=r.num_gpus_per_actor,
        num_cpus=r.num_cpus_per_actor, memory=int(r.actor_memory_gb * 1024**3), udf_modifying_row_count=False,
    )
    return ds


# ----------------------------------------------------------------------------------------------------------------------
# The job


def _setup_file_log(root: Path) -> logging.Handler:
    handler = logging.FileHandler(root / LOG_NAME, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger.addHandler(handler)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    return handler


def _merge_notes(root: Path, partitions: list[Partition]) -> tuple[Counter, dict[str, int]]:
    """rejects.jsonl from the per-partition notes (in partition order).

    Returns (rejects by reason, {"substituted_captions": n, "null_captions": n})."""
    counts: Counter = Counter()
    captions = {"substituted_captions": 0, "null_captions": 0}
    lines = []
    for p in partitions:
        note = json.loads((root / PARTS_DIR / f"{p.name}.json").read_text(encoding="utf-8"))
        for name in captions:
            captions[name] += int(note.get(name, 0))  # notes of partitions from before null counting have none
        for r in note["rejects"]:
            counts[r["reason"]] += 1
            lines.append(json.dumps(r, ensure_ascii=False) + "\n")
    # backslashreplace: a lone surrogate (a non-UTF-8 file name in `source` or `detail`) becomes its JSON escape
    atomic_write_bytes(root / REJECTS_NAME, "".join(lines).encode("utf-8", "backslashreplace"))
    return counts, captions


def run(cfg: EncodeConfig, *, address: str | None = None, overwrite: bool = False) -> dict:
    """Encode the corpus into cfg.output.root; resume a partial cache; leave a finished one alone.

    Returns the summary dict (also logged): status, written, rejected by reason, substituted captions, bytes, time.
    """
    t0 = time.time()
    store = RemoteStore(cfg.output.root, cfg.storage) if is_remote(cfg.output.root) else None
    root = staging_root(cfg) if store is not None else Path(cfg.output.root)
    # Fail on config / schema / encoder-folder mistakes before any cluster starts.
    dims = encoder_dims(cfg.encoders.root)
    spec = cache_spec(cfg, dims)
    partitions = plan_partitions(cfg.input, cfg.output.rows_per_shard, cfg.storage)
    names = [p.name for p in partitions]
    assert len(set(names)) == len(names), "partition names must be unique"

    if store is None:
        state, lock = prepare_output(root, cfg, overwrite)
    else:  # one writer per remote cache is the user's to ensure (no lock across machines)
        state, lock = prepare_remote_output(store, root, cfg, overwrite), None
    where = store.url if store is not None else str(root)
    handler = _setup_file_log(root)
    try:
        leftovers = remove_leftovers(root)
        if leftovers:
            logger.info(f"removed {len(leftovers)} temp leftovers of interrupted writes: "
                        + ", ".join(str(p.relative_to(root)) for p in leftovers[:5])
                        + (" ..." if len(leftovers) > 5 else ""))
        if state == "complete":
            m = read_manifest(root)
            summary = {"status": "already complete", "root": where, "samples": m.n_samples,
                       "rejected": dict(m.rejects), "shards": len(m.shards)}
            logger.info(f"{where}: cache already complete with this config ({m.n_samples} samples); nothing to do")
            return summary
        done = completed_shards(root) if store is None else _remote_done(store, root, spec.format)
        todo = [p for p in partitions if p.name not in done]
        total = sum(p.num_rows for p in todo)
        logger.info(f"{state} cache {where}: {len(partitions)} partitions, {len(partitions) - len(todo)} already "
                    f"complete, {len(todo)} to encode ({total} input rows)")
        logger.info("config:\n" + dump_config(cfg))

        started, reaper = init_ray(cfg, address)
        try:
            import ray

            ctx = ray.data.DataContext.get_current()
            ctx.enable_progress_bars = False  # our own bar counts samples, not blocks
            ctx.enable_operator_progress_bars = False
            _check_resources(cfg)
            result = _execute(cfg, root, spec, dims, todo, total, store)
        finally:
            try:
                if started:
                    ray.shutdown()
            finally:
                if reaper is not None:
                    reaper.close()

        done = completed_shards(root) if store is None else _remote_done(store, root, spec.format)
        missing = [n for n in names if n not in done]
        if missing:
            raise RuntimeError(f"partitions {missing[:5]} did not complete; re-run to resume")
        rejects, captions = _merge_notes(root, partitions)
        shards = [done[n].entry() for n in names]
        manifest = Manifest(
            spec=spec, shards=shards, encoders=result["fingerprint"], vae_scaling_factor=result["scaling_factor"],
            buckets=([list(b) for b in pp.resolution_buckets(cfg.image.resolution, cfg.image.reso_step,
                                                             cfg.image.align)]
                     if cfg.image.multireso else [[cfg.image.resolution, cfg.image.resolution]]),
            preprocessing=preprocessing_record(cfg), rejects=dict(sorted(rejects.items())),
            empty_caption_sha256=result["empty_sha256"],
            extra={"input": config_to_dict(cfg.input), "n_inputs": sum(p.num_rows for p in partitions),
                   **captions, "null_caption_rule": cfg.text.null_caption},
        )
        if store is None:
            write_manifest(root, manifest)
        else:
            store.upload_file(root / REJECTS_NAME, REJECTS_NAME)
            write_manifest(root, manifest, completed=done)
            from shared.remote_cache import publish_small_files

            publish_small_files(store, root, names, spec.format)  # readers' one GET for all small files
            store.upload_file(root / MANIFEST_NAME, MANIFEST_NAME)  # last: the remote cache is complete
        elapsed = time.time() - t0
        nbytes = sum(done[n].bytes for n in names)
        summary = {
            "status": "complete", "root": where, "samples": manifest.n_samples,
            "written_this_run": result["written"], "rejected": dict(sorted(rejects.items())),
            "rejected_total": sum(rejects.values()), "substituted_captions": captions["substituted_captions"],
            "null_captions": captions["null_captions"], "null_caption_rule": cfg.text.null_caption,
            "shards": len(names), "shards_this_run": len(todo), "bytes": nbytes,
            "seconds": round(elapsed, 2), "encode_seconds": round(result["seconds"], 2),
            "samples_per_s": round(result["written"] / result["seconds"], 3) if result["seconds"] > 0 else None,
            "steady_samples_per_s": round(result["steady"], 3) if result.get("steady") else None,
        }
        logger.info("summary: " + json.dumps(summary, ensure_ascii=False))
        return summary
    finally:
        logger.removeHandler(handler)
        handler.close()
        if lock is not None:
            lock.release()
        if store is not None:
            _upload_log(store, root)


def _upload_log(store: RemoteStore, root: Path) -> None:
    """Best effort: a log that cannot be uploaded (the store is down) must not hide the job's own error."""
    try:
        if (root / LOG_NAME).exists():
            store.upload_file(root / LOG_NAME, LOG_NAME)
    except Exception as e:  # noqa: BLE001
        logger.warning(f"could not upload {LOG_NAME} to {store.url}: {e}")


def _execute(cfg: EncodeConfig, root: Path, spec: CacheSpec, dims: dict, todo: list[Partition], total: int,
             store: RemoteStore | None = None) -> dict:
    from shared.cache import write_empty_caption

    ds = build_dataset(cfg, todo)
    progress = Progress(total, cfg.log.progress, cfg.log.interval_s)
    open_: dict[str, ShardAssembler] = {}
    ready: list[ShardAssembler] = []  # complete, held until the encoders' fingerprint has been checked
    out: dict[str, Any] = {"written": 0, "fingerprint": None}
    span = [float("inf"), 0.0]  # first encode start, last encode end over all chunks
    t_start = time.time()

    def finish(asm: ShardAssembler) -> None:
        info = asm.finish()
        if store is not None:
            from shared.manifest import shard_data_path
            from shared.remote_cache import publish_shard

            store.upload_file(root / PARTS_DIR / f"{info.name}.json", f"{PARTS_DIR}/{info.name}.json")
            publish_shard(store, root, info.name, spec.format)
            # the staged data is no longer needed: the driver's disk holds only shards in flight
            remove_path(shard_data_path(root, info.name, spec.format))
        logger.info(f"shard {info.name}: {info.n_samples} samples, {len(asm.rejects)} rejects, {info.bytes} bytes")

    try:
        for row in ds.iter_rows():
            kind, part = row["kind"], row["part"]
            meta = json.loads(row["meta"])
            if kind == "empty":
                out.update(_accept_encoders(root, spec, dims, unpack(row["payload"]), meta))
                if store is not None:
                    store.upload_file(root / ENCODERS_NAME, ENCODERS_NAME)
                    store.upload_file(root / EMPTY_CAPTION_NAME, EMPTY_CAPTION_NAME)
                for asm in ready:
                    finish(asm)
                ready.clear()
                continue
            asm = open_.get(part)
            if asm is None:
                asm = open_[part] = ShardAssembler(root, part, spec)
            before = asm.n_written
            settled = asm.add(kind, int(row["seq"]), row["payload"], meta)
            out["written"] += asm.n_written - before
            if kind == "chunk":
                span[0], span[1] = min(span[0], meta["t_encode"][0]), max(span[1], meta["t_encode"][1])
            progress.update(asm.n_written - before, settled - (len(meta["keys"]) if kind == "chunk" else 0))
            if asm.complete:
                del open_[part]
                if out["fingerprint"] is None:
                    ready.append(asm)
                else:
                    finish(asm)
    except BaseException:
        for asm in list(open_.values()) + ready:
            asm.abort()
        progress.close()
        raise
    progress.close()
    if open_ or ready or out["fingerprint"] is None:
        raise RuntimeError(f"the encode stream ended early: {len(open_) + len(ready)} partitions incomplete")
    out["seconds"] = time.time() - t_start
    # Steady state: samples over [first chunk's encode start, last chunk's encode end] on the actors. Excludes
    # Ray start-up and model loading; includes every stall of the encoders (waiting for preprocessing or for the
    # driver to drain the stream). Driver-side arrival times would not do: outputs reach the driver in bursts.
    if span[1] > span[0]:
        out["steady"] = out["written"] / (span[1] - span[0])
    logger.info(progress.line())
    return out


def _accept_encoders(root: Path, spec: CacheSpec, dims: dict, arrays: dict, meta: dict) -> dict:
    """Check the actors' encoders against the folder's config and against earlier runs; write the empty caption."""
    from shared.cache import write_empty_caption

    for k in ("latent_channels", "downsample", "clip_dim", "t5_dim"):
        assert meta[k] == dims[k], (k, meta[k], dims[k])
    # The manifest's pad ids are what stage 2 is told; the empty caption's padded positions show the real ones.
    for enc in ("clip", "t5"):
        ids, mask = np.asarray(arrays[f"{enc}_ids"]).reshape(-1), np.asarray(arrays[f"{enc}_mask"]).reshape(-1)
        pads = set(int(x) for x in ids[~mask.astype(bool)])
        want = getattr(spec, f"{enc}_pad_id")
        if pads - {want}:
            raise ValueError(f"the {enc} tokenizer in encoders.root pads with ids {sorted(pads)} but the cache "
                             f"records {enc}_pad_id={want} (the original's): use the original tokenizer files")
    fp = meta["fingerprint"]
    fp_path = root / ENCODERS_NAME
    if fp_path.exists():
        old = json.loads(fp_path.read_text())
        if old != fp:
            changed = sorted(k for k in set(old) | set(fp) if old.get(k) != fp.get(k))
            raise CacheConflictError(
                f"the encoders in {meta.get('root', 'encoders.root')} differ from those that started this cache "
                f"(changed: {changed}); pass --overwrite to start over with the new ones"
            )
    else:
        atomic_write_json(fp_path, fp)
    sha = write_empty_caption(root, spec, **arrays)
    return {"fingerprint": fp, "scaling_factor": float(meta["scaling_factor"]), "empty_sha256": sha}
