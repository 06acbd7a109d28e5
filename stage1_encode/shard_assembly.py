"""One partition's encoded chunks (any arrival order) -> its shard, written in chunk order, notes first."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shared.cache import open_shard_writer
from shared.fsutil import atomic_write_json
from shared.manifest import ShardInfo
from shared.schema import CacheSpec
from stage1_encode.cache_dir import PARTS_DIR
from stage1_encode.payload import unpack


class ShardAssembler:
    """Collects one partition's encoded chunks (any arrival order) and writes its shard in chunk order."""

    def __init__(self, root: Path, name: str, spec: CacheSpec) -> None:
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
