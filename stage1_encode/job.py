"""The stage-1 job: corpus partitions -> preprocess (CPU tasks) -> encoders (actor pool) -> shards.

    partitions not yet completed (one Ray row each, plus one "empty caption" item)
      -> map_batches(preprocess_udf, TaskPoolStrategy)       read, decode, resize/crop, tokenise; one output row per
                                                              encoder batch ("chunk") + an "end" row
                                                              (stage1_encode/preprocess_task.py)
      -> map_batches(EncoderActor, ActorPoolStrategy(size=n)) one chunk = one forward pass per encoder
                                                              (stage1_encode/encoder_actor.py)
      -> driver: iter_rows() -> one ShardAssembler per partition, shard written when all its chunks + end arrived
                                                              (stage1_encode/shard_assembly.py)

The other parts: the cache folder, config identity and resume (cache_dir.py), what the cache records (cache_spec.py),
payload packing between Ray stages (payload.py), progress (progress.py), Ray start-up (ray_init.py).

Exactness. A chunk holds up to `encoders.batch_size` samples of one bucket, cut from the partition in row order,
and the actor encodes exactly one chunk per call (`batch_size=1` rows). Batch composition is therefore a function of
the data alone, not of scheduling, so CPU BLAS results (which depend on batch shape) are the same with 1 or N actors.
Crop offsets come from an RNG seeded by the sample key. Chunks reach the driver in any order; the assembler writes
them in chunk order, so a shard's bytes (and sha256) are reproducible.

Why the driver writes the shards. Each shard then has exactly one writer by construction (no cross-actor
coordination, no two-phase commit to get right), resume is "skip partitions whose shard is complete", and a dead
worker can never leave a half-written shard that looks complete (writers rename into place, then write the sidecar).

Resume. `encode_config.yaml` is written first; a re-run with an equal config skips completed shards, and a finished
cache (manifest.json present) is left alone (cache_dir.py). Per-partition notes (rejects, substituted and null
captions) are written next to the shard (partitions/<name>.json, before the shard is closed), merged into
rejects.jsonl at the end, then the manifest is written last.

Object storage (`output.root=s3://bucket/prefix`). The driver writes everything into a local staging folder exactly
as above, and publishes each finished shard right away (shard_files: data, index, sidecar last; see
shared/remote_cache.publish_shard), then deletes its staged data: the driver never holds more than the shards in
flight. The config goes up first, the encoders' fingerprint and empty caption when they arrive, rejects after all
shards, the manifest last. Resume lists the shards whose sidecar and data exist remotely.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import ray

from shared.cache import write_empty_caption
from shared.config import config_to_dict, dump_config
from shared.fsutil import atomic_write_bytes, atomic_write_json, remove_path
from shared.manifest import (
    EMPTY_CAPTION_NAME, MANIFEST_NAME, REJECTS_NAME, Manifest, completed_shards, read_manifest, shard_data_path,
    write_manifest,
)
from shared.remote_cache import publish_shard
from shared.schema import CacheSpec
from shared.storage import RemoteStore, is_remote
from stage1_encode import preprocess as pp
from stage1_encode.cache_dir import (  # noqa: F401 - re-exported: tests and tools import them from here
    CONFIG_NAME, ENCODERS_NAME, LOCK_NAME, LOG_NAME, PARTS_DIR, CacheConflictError, CacheLock, _remote_done,
    config_diff, identity, prepare_output, prepare_remote_output, remove_leftovers, staging_root,
)
from stage1_encode.cache_spec import cache_spec, encoder_dims, preprocessing_record  # noqa: F401
from stage1_encode.config import EncodeConfig
from stage1_encode.encoder_actor import EncoderActor
from stage1_encode.payload import pack, unpack  # noqa: F401
from stage1_encode.preprocess_task import partition_chunks, preprocess_udf  # noqa: F401
from stage1_encode.progress import Progress
from stage1_encode.ray_init import _check_resources, init_ray
from stage1_encode.readers import Partition, plan_partitions, read_partition  # noqa: F401
from stage1_encode.shard_assembly import ShardAssembler

logger = logging.getLogger("stage1_encode")


def build_dataset(cfg: EncodeConfig, partitions: list[Partition]):
    """The Ray Data pipeline (lazy): items -> preprocess tasks -> encoder actors."""
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
    partitions = plan_partitions(cfg.input, cfg.output.rows_per_shard)
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
    # the downsample is not reported: cache_spec.encoder_dims computes it once, from the same VAE config.json
    for k in ("latent_channels", "clip_dim", "t5_dim"):
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
