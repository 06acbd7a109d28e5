"""The stage-1 job: corpus partitions -> shard writer tasks, each running its partition through preprocessing and
the encoder actor pool.

    shard     -> write_shard: one Ray task per shard (shard_writer.py); through shard_feed.py it runs
      partition -> preprocess_partition: streaming-generator task   read, decode, resize/crop, tokenise; yields
                                         (preprocess_task.py)       items of consecutive encoder batches ("chunks",
                                                                    up to ray.item_mb of pixels), then "end"
      item      -> EncoderActor.encode: actor pool (encoder_actor.py)  one chunk = one forward pass per encoder
      then writes the encoded chunks in chunk order: rejects inf/NaN samples, fsyncs, renames, index, sidecar last
    driver    -> dispatch.py: plans, launches, records; holds one ObjectRef and a few counts per shard in flight

The other parts: the cache folder, config identity and resume (cache_dir.py), what the cache records (cache_spec.py),
the items between tasks (payload.py), progress (progress.py), Ray start-up (ray_init.py).

Exactness. A chunk holds up to `encoders.batch_size` samples of one bucket, cut from the partition in row order,
and an actor encodes exactly one chunk per call. Batch composition is therefore a function of the data alone, not of
scheduling, so CPU BLAS results (which depend on batch shape) are the same with 1 or N actors. Crop offsets come
from an RNG seeded by the sample key. A shard's writer takes its chunks in chunk order, so a shard's bytes (and
sha256) are the same whatever the number of actors, writers and nodes.

Why a writer task per shard. Writing (zstd, tar, sha256, the file write: ~10 ms per sample at 1024^2) then scales
with the cluster's CPUs instead of capping the job at one driver core (~100 samples/s). Each shard still has
exactly one writer: the driver launches one task per shard, and Ray reruns it only after its worker died (a rerun
rewrites the shard from the start under a fresh temp name). Resume stays "skip partitions whose shard is complete",
and a dead writer never leaves a half-written shard that looks complete (data renamed into place, then the index,
then the sidecar). A local output.root must be one folder for all writers: on a multi-node cluster a shared
filesystem at the same path on every node (each writer checks the driver's marker file, else ValueError), or use
s3://.

Resume. `encode_config.yaml` is written first; a re-run with an equal config skips completed shards, and a finished
cache (manifest.json present) is left alone (cache_dir.py). Per-partition notes (rejects, substituted and null
captions) are written by the writer next to the shard (partitions/<name>.json, before the shard is closed), merged
into rejects.jsonl at the end, then the manifest is written last.

Object storage (`output.root=s3://bucket/prefix`). Each writer writes its shard into its own node's staging folder
and publishes it from there (note, data, index, sidecar last; shared/remote_cache.publish_shard), then deletes the
staged data. The driver uploads the config first, the encoders' fingerprint and empty caption when they arrive
(before any writer starts), rejects after all shards, the manifest last. Resume lists the shards whose sidecar and
data exist remotely.

Driver cost growth: O(partitions) small objects for the plan and the notes merge, O(shards in flight) ObjectRefs,
and a task and its reply per shard (bench/encode.py measures its CPU per sample); nothing per item or per sample. The
Ray calls per item (~5 ms of CPU) are paid by the shards' writers, on their nodes.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import ray

from shared.cache import write_empty_caption
from shared.config import config_to_dict, dump_config
from shared.fsutil import atomic_write_bytes, atomic_write_json, remove_path, tmp_path_for
from shared.manifest import (
    EMPTY_CAPTION_NAME,
    MANIFEST_NAME,
    REJECTS_NAME,
    Manifest,
    completed_shards,
    read_manifest,
    write_manifest,
)
from shared.remote_cache import publish_small_files
from shared.schema import CacheSpec
from shared.storage import RemoteStore, is_remote
from stage1_encode import preprocess as pp
from stage1_encode.cache_dir import (  # noqa: F401 - re-exported: tests and tools import them from here
    CONFIG_NAME,
    ENCODERS_NAME,
    LOCK_NAME,
    LOG_NAME,
    PARTS_DIR,
    CacheConflictError,
    CacheLock,
    _remote_done,
    config_diff,
    identity,
    prepare_output,
    prepare_remote_output,
    remove_leftovers,
    staging_root,
)
from stage1_encode.cache_spec import cache_spec, encoder_dims, preprocessing_record  # noqa: F401
from stage1_encode.config import EncodeConfig
from stage1_encode.dispatch import Dispatcher, read_empty, steady_span
from stage1_encode.encoder_actor import EncoderActor  # noqa: F401
from stage1_encode.payload import pack, unpack  # noqa: F401
from stage1_encode.preprocess_task import partition_chunks  # noqa: F401
from stage1_encode.progress import Progress
from stage1_encode.ray_init import _check_resources, init_ray
from stage1_encode.readers import Partition, plan_partitions, read_partition  # noqa: F401
from stage1_encode.shard_writer import WriterJob

logger = logging.getLogger("stage1_encode")


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
            logger.info(
                f"removed {len(leftovers)} temp leftovers of interrupted writes: "
                + ", ".join(str(p.relative_to(root)) for p in leftovers[:5])
                + (" ..." if len(leftovers) > 5 else "")
            )
        if state == "complete":
            m = read_manifest(root)
            summary = {
                "status": "already complete",
                "root": where,
                "samples": m.n_samples,
                "rejected": dict(m.rejects),
                "shards": len(m.shards),
            }
            logger.info(f"{where}: cache already complete with this config ({m.n_samples} samples); nothing to do")
            return summary
        done = completed_shards(root) if store is None else _remote_done(store, root, spec.format)
        todo = [p for p in partitions if p.name not in done]
        total = sum(p.num_rows for p in todo)
        logger.info(
            f"{state} cache {where}: {len(partitions)} partitions, {len(partitions) - len(todo)} already "
            f"complete, {len(todo)} to encode ({total} input rows)"
        )
        logger.info("config:\n" + dump_config(cfg))

        started, reaper = init_ray(cfg, address)
        try:
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
        if store is not None:  # notes of shards written on other nodes (each writer publishes its own)
            for n in names:
                if not (root / PARTS_DIR / f"{n}.json").exists():
                    store.download_file(f"{PARTS_DIR}/{n}.json", root / PARTS_DIR / f"{n}.json")
        rejects, captions = _merge_notes(root, partitions)
        shards = [done[n].entry() for n in names]
        manifest = Manifest(
            spec=spec,
            shards=shards,
            encoders=result["fingerprint"],
            vae_scaling_factor=result["scaling_factor"],
            buckets=(
                [list(b) for b in pp.resolution_buckets(cfg.image.resolution, cfg.image.reso_step, cfg.image.align)]
                if cfg.image.multireso
                else [[cfg.image.resolution, cfg.image.resolution]]
            ),
            preprocessing=preprocessing_record(cfg),
            rejects=dict(sorted(rejects.items())),
            empty_caption_sha256=result["empty_sha256"],
            extra={
                "input": config_to_dict(cfg.input),
                "n_inputs": sum(p.num_rows for p in partitions),
                **captions,
                "null_caption_rule": cfg.text.null_caption,
            },
        )
        if store is None:
            write_manifest(root, manifest)
        else:
            store.upload_file(root / REJECTS_NAME, REJECTS_NAME)
            write_manifest(root, manifest, completed=done)
            publish_small_files(store, root, names, spec.format)  # readers' one GET for all small files
            store.upload_file(root / MANIFEST_NAME, MANIFEST_NAME)  # last: the remote cache is complete
        elapsed = time.time() - t0
        nbytes = sum(done[n].bytes for n in names)
        summary = {
            "status": "complete",
            "root": where,
            "samples": manifest.n_samples,
            "written_this_run": result["written"],
            "rejected": dict(sorted(rejects.items())),
            "rejected_total": sum(rejects.values()),
            "substituted_captions": captions["substituted_captions"],
            "null_captions": captions["null_captions"],
            "null_caption_rule": cfg.text.null_caption,
            "shards": len(names),
            "shards_this_run": len(todo),
            "bytes": nbytes,
            "seconds": round(elapsed, 2),
            "encode_seconds": round(result["seconds"], 2),
            "samples_per_s": round(result["written"] / result["seconds"], 3) if result["seconds"] > 0 else None,
            "steady_samples_per_s": round(result["steady"], 3) if result.get("steady") else None,
            "driver_cpu_s": round(result["driver_cpu_s"], 4),
            "driver_thread_cpu_s": round(result["driver_thread_cpu_s"], 4),
            "driver_loop_s": round(result["driver_loop_s"], 3),
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


def _execute(
    cfg: EncodeConfig,
    root: Path,
    spec: CacheSpec,
    dims: dict,
    todo: list[Partition],
    total: int,
    store: RemoteStore | None = None,
) -> dict:
    progress = Progress(total, cfg.log.progress, cfg.log.interval_s)
    t_start = time.time()
    marker = None
    if store is None:  # every writer checks that it sees this folder (one shared filesystem, or s3://)
        marker = tmp_path_for(root / "writer-check")
        token = secrets.token_hex(16)
        atomic_write_bytes(marker, token.encode("ascii"))
        job = WriterJob("", spec, config_to_dict(cfg), str(root.resolve()), marker.name, token)
    else:
        job = WriterJob("", spec, config_to_dict(cfg), "")
    try:
        d = Dispatcher(cfg, spec, job, todo, progress)
        arrays, meta = read_empty(d.encode_empty())
        # before any writer starts: no shard is ever committed with encoders other than the cache's
        out: dict[str, Any] = _accept_encoders(root, spec, dims, arrays, meta)
        if store is not None:
            store.upload_file(root / ENCODERS_NAME, ENCODERS_NAME)
            store.upload_file(root / EMPTY_CAPTION_NAME, EMPTY_CAPTION_NAME)
        # The driver's own CPU over the encode (bench/encode.py): the process (Ray's client threads included) and
        # this thread (the loop's per-chunk work alone).
        cpu0, thread0, wall0 = time.process_time(), time.thread_time(), time.perf_counter()
        results = d.run()
        out["driver_cpu_s"], out["driver_thread_cpu_s"] = time.process_time() - cpu0, time.thread_time() - thread0
        out["driver_loop_s"] = time.perf_counter() - wall0
    finally:
        progress.close()
        if marker is not None:
            remove_path(marker)
    out["written"] = sum(r["written"] for r in results)
    out["seconds"] = time.time() - t_start
    # Steady state: samples over [first chunk's encode start, last chunk's encode end] on the actors. Excludes
    # Ray start-up and model loading; includes every stall of the encoders (waiting for preprocessing or for the
    # writers to take their output).
    span = steady_span(results)
    if span is not None and span[1] > span[0]:
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
            raise ValueError(
                f"the {enc} tokenizer in encoders.root pads with ids {sorted(pads)} but the cache "
                f"records {enc}_pad_id={want} (the original's): use the original tokenizer files"
            )
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
