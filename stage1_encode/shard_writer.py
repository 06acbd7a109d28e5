"""The shard writer Ray task: one partition -> its shard, committed.

The driver launches exactly one `write_shard` task per shard with the partition's plan and the encoder actors'
handles, never data. The task runs the partition's stream itself (shard_feed.py: its preprocessing task, the encoder
calls, the encoded items in chunk order), checks and splits each chunk per sample (inf/NaN rejects, the stored
layout: shared/schema.encode_sample), writes the shard (zstd, tar or zarr, sha256, fsync, rename, index, sidecar
last) and returns a few counts. The partition's note (rejects, substituted and null captions) is written before the
shard is closed, so a completed shard always has its rejects recorded.

Where it writes. A local output.root is written in place: every node that runs a writer must see the driver's folder
(a shared filesystem mounted at the same path); the task checks a marker file with the driver's random token before
it writes and raises ValueError otherwise. An s3:// root is written into this node's staging folder and published
from there (data, index, sidecar last), then the staged data is deleted: no shared filesystem is needed.

A writer that dies (SIGKILL, node loss) leaves only `.tmp-*` names, never a shard that looks complete: Ray reruns
the task (`ray.writer_retries`), which preprocesses, encodes and writes the shard again from its first sample (the
objects of the dead attempt were its own and went with it); after the last retry the driver fails naming the shard,
and a rerun resumes.
"""

from __future__ import annotations

import os
import signal
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shared.cache import open_shard_writer
from shared.fsutil import atomic_write_json, remove_dead_tmp_leftovers, remove_path, remove_tmp_leftovers
from shared.manifest import SHARDS_DIR, ShardInfo, shard_data_path
from shared.remote_cache import publish_shard
from shared.schema import LOGICAL_ARRAYS, CacheSpec, NonFiniteError
from shared.storage import RemoteStore
from stage1_encode.cache_dir import PARTS_DIR, staging_root
from stage1_encode.payload import read_chunks_item, read_item
from stage1_encode.preprocess_task import _worker_cfg
from stage1_encode.shard_feed import encoded_items

# the stored arrays of one sample; the bucket is the chunk's, shared by its samples
SAMPLE_ARRAYS = tuple(k for k in LOGICAL_ARRAYS if k != "bucket")

# Test plumbing, not a feature: "<shard name>:<n samples>:<marker file>" makes the writer of that shard SIGKILL its
# own process after writing n samples, once (it creates the marker first; a retry finds it and runs normally).
KILL_ENV = "HYDIT_TEST_KILL_WRITER"


@dataclass(frozen=True)
class WriterJob:
    """What one writer task needs: which shard, in which format, where (no payloads)."""

    name: str
    spec: CacheSpec
    cfg_dict: dict  # the job's config (output.root, storage) as a dict
    root: str  # absolute local cache folder; "" for an s3:// output.root (this node's staging folder is used)
    marker: str = ""  # name of the driver's marker file in `root` (local roots)
    token: str = ""


def check_root_visible(root: Path, marker: str, token: str) -> None:
    """ValueError unless `root/marker` holds `token`: this node sees the driver's output folder."""
    try:
        seen = (root / marker).read_text(encoding="utf-8")
    except OSError:
        seen = None
    if seen != token:
        raise ValueError(
            f"output.root {root} is not the driver's folder on node {socket.gethostname()} (the driver's marker "
            f"{marker} is {'missing' if seen is None else 'different'} here): a local output.root on a multi-node "
            "cluster must be a shared filesystem mounted at the same path on every node; otherwise use "
            "output.root=s3://bucket/prefix"
        )


class ShardAssembler:
    """Writes one partition's encoded chunks, taken in chunk order, into its shard; then its note and the shard."""

    def __init__(self, root: Path, name: str, spec: CacheSpec) -> None:
        self.root, self.name = root, name
        # An earlier attempt at this shard that died (a rerun task) left its temp files: this task is the shard's
        # only writer now, so they are debris.
        for folder in (root / SHARDS_DIR, root / PARTS_DIR):
            remove_tmp_leftovers(folder, stem=name)
        # overwrite: a shard that is not complete may still have data from a run that died between rename and
        # sidecar; it is rewritten.
        self.writer = open_shard_writer(root, name, spec, overwrite=True)
        self.next_seq = 0
        self.rejects: list[dict] = []
        self.n_written = self.n_substituted = self.n_null = 0
        self.t_encode = [float("inf"), 0.0]

    def add_chunk(self, arrays: dict[str, Any], m: dict, after_sample=None) -> None:
        assert m["seq"] == self.next_seq, (self.name, m["seq"], self.next_seq)  # the driver keeps chunk order
        self.next_seq += 1
        bucket = np.array(m["bucket"], dtype=np.int32)
        for b, key in enumerate(m["keys"]):
            sample = {"key": key, "caption": m["captions"][b], "bucket": bucket}
            for k in SAMPLE_ARRAYS:
                sample[k] = arrays[k][b]
            try:
                self.writer.add(sample)
            except NonFiniteError as err:  # checked before anything of the sample is written
                self.rejects.append(
                    {
                        "key": key,
                        "source": m["sources"][b],
                        "row": m["rows"][b],
                        "reason": "nonfinite_output",
                        "detail": f"inf/NaN in {', '.join(err.fields)}",
                    }
                )
                continue
            self.n_written += 1
            self.n_substituted += bool(m["substituted"][b])
            self.n_null += bool(m["null"][b])
            if after_sample is not None:
                after_sample(self.n_written)
        if "t_encode" in m:
            self.t_encode = [min(self.t_encode[0], m["t_encode"][0]), max(self.t_encode[1], m["t_encode"][1])]

    def finish(self, end: dict) -> ShardInfo:
        """Notes first (atomically), then the shard: a completed shard always has its rejects recorded."""
        assert self.next_seq == end["n_chunks"], (self.name, self.next_seq, end["n_chunks"])
        rejects = end["rejects"] + self.rejects
        # every input row is accounted for: written or rejected, never silently dropped on the way
        assert self.n_written + len(rejects) == end["n_rows"], (self.name, self.n_written, len(rejects), end["n_rows"])
        self.rejects = rejects
        note = {
            "name": self.name,
            "written": self.n_written,
            "substituted_captions": self.n_substituted,
            "null_captions": self.n_null,
            "rejects": rejects,
        }
        path = self.root / PARTS_DIR / f"{self.name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, note)
        return self.writer.close()

    def abort(self) -> None:
        try:
            self.writer.abort()
        except Exception:  # best effort: temp names are ignored by readers anyway
            pass


def _kill_hook(name: str):
    """The KILL_ENV test hook for this shard, or None."""
    spec = os.environ.get(KILL_ENV, "")
    if not spec:
        return None
    shard, n, marker = spec.split(":", 2)
    if shard != name or os.path.exists(marker):
        return None

    def hook(written: int) -> None:
        if written >= int(n):
            Path(marker).write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


def write_shard(job: WriterJob, part: dict, actors: list, first_actor: int) -> dict:
    """Ray task: the shard of partition `part` (dataclasses.asdict of a Partition), encoded by `actors` (handles of
    the pool; this shard's first item goes to actors[first_actor]). Returns the counts the driver records (no
    per-sample data)."""
    cfg = _worker_cfg(job.cfg_dict)
    store = None
    if job.root:
        root = Path(job.root)
        check_root_visible(root, job.marker, job.token)
    else:
        store = RemoteStore(cfg.output.root, cfg.storage)
        root = staging_root(cfg)
        # this node's staging folder: a writer SIGKILLed here earlier left temp files that no writer of its shard
        # (rerun by Ray, perhaps on another node) will remove
        for folder in (root / SHARDS_DIR, root / PARTS_DIR):
            remove_dead_tmp_leftovers(folder)
    asm = ShardAssembler(root, job.name, job.spec)
    hook = _kill_hook(job.name)
    try:
        end_meta = None
        for item in encoded_items(job.cfg_dict, part, cfg.ray.preprocess_num_cpus, actors, first_actor):
            if item[0] == "end":
                _, _, end_meta = read_item(item)
                continue
            for arrays, meta in read_chunks_item(item):
                asm.add_chunk(arrays, meta, hook)
        assert end_meta is not None  # encoded_items ends with the partition's "end" item
        info = asm.finish(end_meta)
    except BaseException:
        asm.abort()
        raise
    if store is not None:
        # the note before the sidecar (publish_shard uploads the sidecar last): a complete shard has its note
        store.upload_file(root / PARTS_DIR / f"{job.name}.json", f"{PARTS_DIR}/{job.name}.json")
        publish_shard(store, root, job.name, job.spec.format)
        remove_path(shard_data_path(root, job.name, job.spec.format))  # this node's disk holds shards in flight only
    t = asm.t_encode
    return {
        "name": job.name,
        "written": asm.n_written,
        "rejected": len(asm.rejects),
        "bytes": info.bytes,
        "t_encode": t if t[1] >= t[0] else None,
        "node": socket.gethostname(),
    }
