"""What every shard format's writer shares: the per-sample index a writer collects (ShardInfoBuilder) and the
writer base (ShardWriterBase: name and target checks, the `with` block, the commit order). The formats themselves
are shared/zarr_store.py and shared/wds_store.py, behind shared/formats.py."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from .fsutil import atomic_replace, atomic_write_bytes, atomic_write_json, remove_path
from .manifest import ShardInfo, shard_data_path, shard_index_path, shard_sidecar_path
from .schema import CacheSpec, check_shard_name, stored_nbytes
from .shard_index import INDEX_SUFFIX, INDEX_VERSION, encode_index, index_columns


class ShardInfoBuilder:
    """Collects the per-sample index of a shard while its writer runs (one shard's worth: temporary)."""

    def __init__(self, name: str, fmt: str) -> None:
        self.name, self.format = name, fmt
        self.keys: list[str] = []
        self._seen: set[str] = set()
        self.buckets: list[list[int]] = []
        self.clip_lens: list[int] = []
        self.t5_lens: list[int] = []
        self.t5_unique: list[int] = []
        self.field_bytes: dict[str, int] = {}

    def add(self, stored: dict) -> None:
        key = stored["key"]
        if key in self._seen:
            raise ValueError(f"duplicate sample key {key!r} in shard {self.name!r}")
        self._seen.add(key)
        self.keys.append(key)
        self.buckets.append([int(x) for x in stored["bucket"]])
        self.clip_lens.append(int(stored["clip_mask"].sum()))
        self.t5_lens.append(int(stored["t5_mask"].sum()))
        self.t5_unique.append(int(stored["t5_rows"].shape[0]))
        for k, v in stored_nbytes(stored).items():
            self.field_bytes[k] = self.field_bytes.get(k, 0) + v

    def build(
        self, nbytes: int, sha256: str, members: tuple[list[str], Any, Any] | None = None
    ) -> tuple[ShardInfo, bytes]:
        """(the sidecar, the index file's bytes). `members`: webdataset (fields, (N, F) offsets, (N, F) sizes)."""
        fields, off, size = members if members is not None else ([], None, None)
        cols = index_columns(self.keys, self.buckets, self.clip_lens, self.t5_lens, self.t5_unique, off, size)
        data = encode_index(len(self.keys), cols, fields)
        index = {
            "file": f"{self.name}{INDEX_SUFFIX}",
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "version": INDEX_VERSION,
        }
        info = ShardInfo(
            name=self.name,
            format=self.format,
            n_samples=len(self.keys),
            bytes=nbytes,
            sha256=sha256,
            field_bytes=self.field_bytes,
            index=index,
        )
        return info, data


class ShardWriterBase:
    """What the zarr and webdataset writers share: the name and target checks, the per-sample index, the
    `with` block, and the commit order (data renamed into place first, its index file second, its sidecar last:
    the sidecar's presence means the shard is complete)."""

    format = ""

    def __init__(self, root: str | Path, name: str, spec: CacheSpec, overwrite: bool = False) -> None:
        if spec.format != self.format:
            raise ValueError(f"{type(self).__name__} needs spec.format={self.format!r}, got {spec.format!r}")
        self.root, self.name, self.spec, self.overwrite = Path(root), check_shard_name(name), spec, overwrite
        self.final = shard_data_path(root, name, self.format)
        self.final.parent.mkdir(parents=True, exist_ok=True)
        if self.final.exists() and not overwrite:
            raise FileExistsError(f"shard {self.final} already exists; pass overwrite=True to rewrite it")
        self._stats = ShardInfoBuilder(name, self.format)
        self._closed = False

    def __len__(self) -> int:
        return len(self._stats.keys)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"shard {self.name!r} is already closed")

    def _publish(self, tmp: Path, built: tuple[ShardInfo, bytes]) -> ShardInfo:
        """Rename the finished (fsynced) temp shard into place, then write its index file and its sidecar; `tmp` is
        removed on failure."""
        info, index_bytes = built
        side = shard_sidecar_path(self.root, self.name)
        try:
            if self.overwrite and side.exists():
                side.unlink()  # never let an old index describe new data
            atomic_replace(tmp, self.final, overwrite=self.overwrite)
        except BaseException:
            remove_path(tmp)
            raise
        atomic_write_bytes(shard_index_path(self.root, self.name), index_bytes)
        atomic_write_json(side, info.to_dict())
        return info

    def abort(self) -> None:
        self._closed = True

    def __enter__(self) -> ShardWriterBase:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def close(self) -> ShardInfo:  # pragma: no cover - each format implements it
        raise NotImplementedError
