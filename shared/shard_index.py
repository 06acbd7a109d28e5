"""The columnar per-shard sample index: shards/<name>.index, one small binary file per shard, memory-mappable.

Why not JSON: at 10^8 samples the per-sample lists cost ~1 KB of Python objects per sample in every rank and every
DataLoader worker. This file holds the same facts as flat numpy columns, so readers map it (ranks and workers share
the pages) and nothing per-sample lives as a Python object.

Layout (little-endian, never pickle):
    8 bytes   magic b"HYDIDX1\\n"
    8 bytes   uint64 header length H
    H bytes   UTF-8 JSON header {"version", "n_samples", "fields", "columns": {name: {"dtype", "shape", "offset"}}},
              space-padded so that the data starts at a multiple of 64 bytes
    data      the columns, each starting at a multiple of 64 bytes from the data start, in header order
Columns (N samples):
    key_blob (B,) uint8 + key_offsets (N+1,) int64   the UTF-8 keys, concatenated
    key_hash (N,) uint64                             blake2b-64 of each key, for key -> sample lookups
    bucket (N, 2) int32                              (H, W)
    clip_len, t5_len, t5_unique (N,) int32           masked-in tokens, distinct stored mT5 rows
    member_offset, member_size (N, F) int64          webdataset only: data offset and size of each tar member, in
                                                     the order of header["fields"]
The same inputs always give the same bytes (the sidecar records the file's sha256, the manifest repeats it).
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
from pathlib import Path
from typing import Any

import numpy as np

from .schema import CorruptSampleError

INDEX_VERSION = 1
INDEX_SUFFIX = ".index"
_MAGIC = b"HYDIDX1\n"
_ALIGN = 64
_COLUMN_DTYPES = {
    "key_blob": "|u1",
    "key_offsets": "<i8",
    "key_hash": "<u8",
    "bucket": "<i4",
    "clip_len": "<i4",
    "t5_len": "<i4",
    "t5_unique": "<i4",
    "member_offset": "<i8",
    "member_size": "<i8",
}


def key_hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")


def key_hashes(keys: list[str]) -> np.ndarray:
    return np.fromiter((key_hash(k) for k in keys), dtype="<u8", count=len(keys))


def index_columns(
    keys: list[str],
    buckets: Any,
    clip_lens: Any,
    t5_lens: Any,
    t5_unique: Any,
    member_offset: Any = None,
    member_size: Any = None,
) -> dict[str, np.ndarray]:
    """The columns of one shard from per-sample lists (what a writer collected, or an old JSON sidecar held)."""
    n = len(keys)
    enc = [k.encode("utf-8") for k in keys]
    offs = np.zeros(n + 1, dtype="<i8")
    np.cumsum([len(b) for b in enc], out=offs[1:])
    cols = {
        "key_blob": np.frombuffer(b"".join(enc), dtype="|u1"),
        "key_offsets": offs,
        "key_hash": key_hashes(keys),
        "bucket": np.asarray(buckets, dtype="<i4").reshape(n, 2),
        "clip_len": np.asarray(clip_lens, dtype="<i4").reshape(n),
        "t5_len": np.asarray(t5_lens, dtype="<i4").reshape(n),
        "t5_unique": np.asarray(t5_unique, dtype="<i4").reshape(n),
    }
    if member_offset is not None:
        n_fields = len(member_offset[0]) if n else np.shape(member_offset)[-1] if np.ndim(member_offset) == 2 else 0
        cols["member_offset"] = np.asarray(member_offset, dtype="<i8").reshape(n, n_fields)
        cols["member_size"] = np.asarray(member_size, dtype="<i8").reshape(n, n_fields)
    return cols


def encode_index(n_samples: int, columns: dict[str, np.ndarray], fields: list[str] | None = None) -> bytes:
    """The index file's bytes (deterministic: same columns, same bytes)."""
    meta: dict[str, Any] = {}
    pos = 0
    for name, a in columns.items():
        want = _COLUMN_DTYPES[name]
        assert a.dtype == np.dtype(want), (name, a.dtype, want)
        meta[name] = {"dtype": want, "shape": list(a.shape), "offset": pos}
        pos += -(-a.nbytes // _ALIGN) * _ALIGN
    header = {"version": INDEX_VERSION, "n_samples": int(n_samples), "fields": list(fields or []), "columns": meta}
    h = json.dumps(header, sort_keys=True).encode("utf-8")
    h += b" " * (-(len(_MAGIC) + 8 + len(h)) % _ALIGN)
    out = bytearray(_MAGIC + len(h).to_bytes(8, "little") + h)
    for a in columns.values():
        out += np.ascontiguousarray(a).tobytes()
        out += b"\0" * (-len(out) % _ALIGN)
    return bytes(out)


def _parse_header(head: bytes, path: Path, file_size: int) -> tuple[dict, int]:
    if head[:8] != _MAGIC:
        raise CorruptSampleError(f"shard index {path} is not an index file (bad magic)")
    n = int.from_bytes(head[8:16], "little")
    try:
        header = json.loads(head[16 : 16 + n])
        start = 16 + n
        for name, c in header["columns"].items():
            if name not in _COLUMN_DTYPES or c["dtype"] != _COLUMN_DTYPES[name]:
                raise ValueError(f"unknown column {name!r} of {c.get('dtype')!r}")
            end = start + int(c["offset"]) + np.dtype(c["dtype"]).itemsize * math.prod(c["shape"])
            if end > file_size:
                raise ValueError(f"column {name} ends at byte {end}, past the end of the file ({file_size} bytes)")
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptSampleError(
            f"shard index {path} is damaged ({type(e).__name__}: {e}); run `python -m shared.cli verify`"
        ) from e
    if header.get("version") != INDEX_VERSION:
        raise CorruptSampleError(
            f"shard index {path} has version {header.get('version')!r}; this code reads {INDEX_VERSION}"
        )
    return header, start


def read_index_header(path: str | Path) -> tuple[dict, int]:
    """(header, data start) of an index file, from its first bytes."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(16)
        if len(head) == 16 and head[:8] == _MAGIC:
            head += f.read(int.from_bytes(head[8:16], "little"))
        size = os.fstat(f.fileno()).st_size
    return _parse_header(head, path, size)


def read_index_column(path: str | Path, name: str) -> np.ndarray:
    """One column read into memory (one open, no mapping kept: the reader builds cache-wide columns from these)."""
    with open(path, "rb") as f:
        head = f.read(4096)
        if len(head) >= 16 and head[:8] == _MAGIC and 16 + int.from_bytes(head[8:16], "little") > len(head):
            head += f.read(16 + int.from_bytes(head[8:16], "little") - len(head))
        header, start = _parse_header(head, path, os.fstat(f.fileno()).st_size)
        if name not in header["columns"]:
            raise CorruptSampleError(f"shard index {path} has no column {name!r}")
        c = header["columns"][name]
        count = math.prod(c["shape"])
        f.seek(start + int(c["offset"]))
        a = np.empty(count, dtype=c["dtype"])
        got = f.readinto(memoryview(a).cast("B"))
    if got != a.nbytes:
        raise CorruptSampleError(f"shard index {path}: column {name} is truncated")
    return a.reshape(c["shape"])


def read_index_columns(path: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(header, every column as an in-memory array): for tools that rewrite an index, and tests."""
    header, _ = read_index_header(path)
    return header, {name: read_index_column(path, name) for name in header["columns"]}


class MappedIndex:
    """The columns of one index file as read-only numpy views of one shared mapping of the file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as f:
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.header, start = _parse_header(
            self._mm[: 16 + int.from_bytes(self._mm[8:16], "little")], self.path, len(self._mm)
        )
        self.n_samples = int(self.header["n_samples"])
        self.fields: list[str] = list(self.header["fields"])
        self.columns: dict[str, np.ndarray] = {}
        for name, c in self.header["columns"].items():
            count = math.prod(c["shape"])
            self.columns[name] = np.frombuffer(
                self._mm, dtype=c["dtype"], count=count, offset=start + int(c["offset"])
            ).reshape(c["shape"])

    def key(self, i: int) -> str:
        o = self.columns["key_offsets"]
        return self.columns["key_blob"][int(o[i]) : int(o[i + 1])].tobytes().decode("utf-8")

    def keys(self) -> list[str]:
        blob = self.columns["key_blob"].tobytes()
        o = self.columns["key_offsets"].tolist()
        return [blob[o[i] : o[i + 1]].decode("utf-8") for i in range(self.n_samples)]


class ShardIndex:
    """One shard as readers see it: its sidecar facts (n_samples, expected data bytes, sha256s) and, mapped on first
    use in each process, its columns. Pickles small (paths and numbers, never the mapping), so DataLoader workers map
    the same file and share its pages with the rank and with each other."""

    def __init__(self, root: str | Path, info: Any) -> None:
        from .manifest import shard_data_path, shard_index_path

        self.name: str = info.name
        self.format: str = info.format
        self.n_samples: int = int(info.n_samples)
        self.nbytes_expected: int = int(info.bytes)  # the data file (or zarr folder), as the sidecar says
        self.sha256: str = info.sha256
        self.index_nbytes_expected: int = int(info.index.get("bytes", -1))
        self.index_sha256: str | None = info.index.get("sha256")
        self.data_path: Path = shard_data_path(root, info.name, info.format)
        self.index_path: Path = shard_index_path(root, info.name)
        self._mapped: MappedIndex | None = None
        self._pid = -1

    def __getstate__(self) -> dict:
        d = dict(self.__dict__)
        d["_mapped"], d["_pid"] = None, -1
        return d

    @property
    def mapped(self) -> MappedIndex:
        if self._mapped is None or self._pid != os.getpid():
            try:
                m = MappedIndex(self.index_path)
            except (OSError, ValueError) as e:
                if isinstance(e, CorruptSampleError):
                    raise
                raise CorruptSampleError(
                    f"shard index {self.index_path} cannot be read ({type(e).__name__}: {e}); "
                    "run `python -m shared.cli verify`"
                ) from e
            if m.n_samples != self.n_samples:
                raise CorruptSampleError(
                    f"shard index {self.index_path} holds {m.n_samples} samples, its sidecar "
                    f"says {self.n_samples}; run `python -m shared.cli verify`"
                )
            self._mapped, self._pid = m, os.getpid()
        return self._mapped

    def release(self) -> None:
        """Drop this process's mapping (a reader keeps only so many shards mapped at once)."""
        self._mapped, self._pid = None, -1

    def column(self, name: str) -> np.ndarray:
        """A column read into memory without keeping a mapping (for cache-wide columns)."""
        a = read_index_column(self.index_path, name)
        if name != "key_blob" and a.shape[0] != self.n_samples + (name == "key_offsets"):
            raise CorruptSampleError(
                f"shard index {self.index_path}: column {name} has {a.shape[0]} rows, the "
                f"sidecar says {self.n_samples} samples"
            )
        return a

    def key(self, i: int) -> str:
        return self.mapped.key(i)

    def keys(self) -> list[str]:
        """Every key of the shard (read, not mapped: bulk listings must not pin mappings)."""
        blob, o = self.column("key_blob").tobytes(), self.column("key_offsets").tolist()
        return [blob[o[i] : o[i + 1]].decode("utf-8") for i in range(self.n_samples)]

    def __repr__(self) -> str:
        return f"ShardIndex({self.name!r}, {self.n_samples} samples)"
