"""webdataset shards: shards/<name>.tar, one tar member per stored field.

Members of a sample (webdataset groups them by the key before the first "."):
    {key}.caption.txt       UTF-8 caption
    {key}.meta.json         {"bucket": [H, W], "image_meta_size": [...6], "crc32": n}
    {key}.<array>.npy       moments, clip_ids, clip_mask, clip_rows, t5_ids, t5_mask, t5_rows, t5_index
                            (".npy.blosc" when spec.compression == "zstd": the .npy bytes through Blosc(zstd, byte
                            shuffle); t5_rows XOR-delta coded first, see schema.xor_delta_rows)
Plain .npy (never pickle; read with np.load(allow_pickle=False)), so `wds.WebDataset(url).decode()` can read a shard
too. Member headers have fixed mtime/owner, so the same samples give the same bytes and the same sha256.
The shard's index file shards/<name>.index (shared.shard_index) records each member's data offset and size, which
gives random access with one pread per sample and no tar scan.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .fsutil import file_sha256, remove_path, tmp_path_for
from .manifest import ShardInfo
from .schema import CacheSpec, CorruptSampleError, encode_sample, undo_xor_delta_rows, xor_delta_rows
from .shard_index import ShardIndex
from .shard_writer import ShardWriterBase

NPY_FIELDS = ("moments", "clip_ids", "clip_mask", "clip_rows", "t5_ids", "t5_mask", "t5_rows", "t5_index")
ALL_FIELDS = ("caption", "meta") + NPY_FIELDS


def _ext(field: str, spec: CacheSpec) -> str:
    if field == "caption":
        return "txt"
    if field == "meta":
        return "json"
    return "npy.blosc" if spec.compression == "zstd" else "npy"


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def _blosc(level: int):
    import numcodecs.blosc
    from numcodecs import Blosc

    numcodecs.blosc.use_threads = False  # blosc's thread pool and forked DataLoader workers do not mix
    return Blosc(cname="zstd", clevel=level, shuffle=Blosc.SHUFFLE)


def _compress(npy: bytes, itemsize: int, level: int) -> bytes:
    # the .npy header is padded to a multiple of 64 bytes, so the array data stays aligned for the byte shuffle
    return bytes(_blosc(level).encode(np.frombuffer(npy, dtype=f"u{itemsize}")))


def encode_members(stored: dict, spec: CacheSpec) -> list[tuple[str, bytes]]:
    """(field, payload bytes) for one stored sample, in member order."""
    meta = {
        "bucket": [int(x) for x in stored["bucket"]],
        "image_meta_size": [int(x) for x in stored["image_meta_size"]],
        "crc32": int(stored["crc32"]),
    }
    out = [("caption", stored["caption"].encode("utf-8")), ("meta", json.dumps(meta).encode("utf-8"))]
    for f in NPY_FIELDS:
        a = stored[f]
        if spec.compression == "zstd":
            if f == "t5_rows":
                a = xor_delta_rows(a)
            out.append((f, _compress(_npy_bytes(a), a.dtype.itemsize, spec.zstd_level)))
        else:
            out.append((f, _npy_bytes(a)))
    return out


def decode_members(key: str, payloads: dict[str, bytes | memoryview], spec: CacheSpec, where: str) -> dict:
    """Inverse of encode_members. Raises CorruptSampleError naming `where` and the key."""
    missing = [f for f in ALL_FIELDS if f not in payloads]
    if missing:
        raise CorruptSampleError(f"{where}: sample {key!r} lacks members {missing}")
    try:
        meta = json.loads(bytes(payloads["meta"]).decode("utf-8"))
        out = {
            "key": key,
            "caption": bytes(payloads["caption"]).decode("utf-8"),
            "bucket": np.asarray(meta["bucket"], dtype=np.int32),
            "image_meta_size": np.asarray(meta["image_meta_size"], dtype=np.int32),
            "crc32": int(meta["crc32"]),
        }
        z = _blosc(spec.zstd_level) if spec.compression == "zstd" else None
        for f in NPY_FIELDS:
            b = payloads[f]
            if z is not None:
                # straight into a writable buffer (load_npy returns a view of it): bytes 4..8 of a blosc frame
                # hold its decompressed size
                dest = bytearray(int.from_bytes(bytes(b[4:8]), "little"))
                z.decode(b, out=dest)
                b = dest
            out[f] = load_npy(b)
        if z is not None:
            out["t5_rows"] = undo_xor_delta_rows(out["t5_rows"], spec.storage_dtype("t5"))
    except Exception as e:
        raise CorruptSampleError(
            f"{where}: sample {key!r} is unreadable ({type(e).__name__}: {e}); run `python -m shared.cli verify`"
        ) from e
    return out


# The header np.lib.format.write_array gives a C-order array: {'descr': '<f2', 'fortran_order': False, 'shape': (..), }
_NPY_HEADER = re.compile(rb"\{'descr': '([<>|][a-z]\d{1,2})', 'fortran_order': False, 'shape': \(([\d, ]*)\), \}")
_NPY_MAGIC_V1 = b"\x93NUMPY\x01\x00"


def load_npy(payload: bytes | bytearray | memoryview) -> np.ndarray:
    """``np.load(allow_pickle=False)`` of one member, without numpy's literal_eval of the header for the headers this
    module writes (a quarter of a 1024x1024 sample's read time went there). A header of another form, a dtype that
    is not a plain number or bool, or a payload of the wrong size goes to np.load."""
    if payload[:8] == _NPY_MAGIC_V1:
        end = 10 + int.from_bytes(payload[8:10], "little")
        m = _NPY_HEADER.match(payload, 10, end)
        try:
            dtype = np.dtype(m.group(1).decode()) if m is not None else None
        except TypeError:  # e.g. '<f3'
            dtype = None
        if dtype is not None:
            shape = tuple(int(v) for v in m.group(2).split(b",") if v.strip())
            if dtype.kind in "biuf" and len(payload) - end == dtype.itemsize * math.prod(shape):
                out = np.frombuffer(payload, dtype=dtype, offset=end).reshape(shape)
                return out if out.flags.writeable else out.copy()
    return np.load(io.BytesIO(payload), allow_pickle=False)


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = size, 0, 0o444, 0, 0, "", ""
    return ti


class WdsShardWriter(ShardWriterBase):
    """w.add(sample) ...; info = w.close(). Streams members to shards/.tmp-<name>-..., fsyncs, renames, sidecar."""

    format = "webdataset"

    def __init__(self, root: str | Path, name: str, spec: CacheSpec, overwrite: bool = False) -> None:
        super().__init__(root, name, spec, overwrite)
        self.tmp = tmp_path_for(self.final)
        self._f = open(self.tmp, "wb")
        self._tar = tarfile.open(fileobj=self._f, mode="w", format=tarfile.PAX_FORMAT)

    def add(self, sample: dict) -> None:
        self._check_open()
        stored = encode_sample(sample, self.spec)
        self._stats.add(stored)  # raises on a duplicate key before anything is written
        for field, payload in encode_members(stored, self.spec):
            self._tar.addfile(
                _tarinfo(f"{stored['key']}.{field}.{_ext(field, self.spec)}", len(payload)), io.BytesIO(payload)
            )

    def close(self) -> ShardInfo:
        self._check_open()
        self._closed = True
        try:
            self._tar.close()
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            members = index_members(self.tmp, self._stats.keys, self.spec)
            built = self._stats.build(nbytes=self.tmp.stat().st_size, sha256=file_sha256(self.tmp), members=members)
        except BaseException:
            self._f.close()
            remove_path(self.tmp)
            raise
        return self._publish(self.tmp, built)

    def abort(self) -> None:
        if not self._closed:
            self._closed = True
            self._f.close()
            remove_path(self.tmp)


def index_members(path: Path, keys: list[str], spec: CacheSpec) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(ALL_FIELDS, (N, F) member data offsets, (N, F) member sizes) in key order, from the tar headers."""
    pos = {k: i for i, k in enumerate(keys)}
    col = {f: j for j, f in enumerate(ALL_FIELDS)}
    n = len(keys)
    offset = np.full((n, len(ALL_FIELDS)), -1, dtype="<i8")
    size = np.full((n, len(ALL_FIELDS)), -1, dtype="<i8")
    with tarfile.open(path, mode="r") as tf:
        for m in tf:
            key, _, rest = m.name.partition(".")
            field = rest.split(".", 1)[0]
            i, j = pos.get(key), col.get(field)
            if i is None or j is None:
                raise AssertionError(f"unexpected member {m.name} in {path}")
            offset[i, j], size[i, j] = m.offset_data, m.size
    assert (offset >= 0).all(), "a member is missing from the tar just written"
    return list(ALL_FIELDS), offset, size


# A sample's members sit back to back in the tar, each after a 512-byte header (a PAX name record adds a few more
# blocks): one pread covers them all unless the index says they are further apart than that.
_MAX_HEADER_GAP = 4 * 512


class WdsShardReader:
    """Random access into a completed tar via the shard's index file (member offsets): one pread per sample."""

    def __init__(self, path: str | Path, spec: CacheSpec, shard: ShardIndex) -> None:
        self.path, self.spec, self.shard = Path(path), spec, shard
        self._fd = -1
        self._pid = -1

    def __len__(self) -> int:
        return self.shard.n_samples

    def __getstate__(self) -> dict:
        d = dict(self.__dict__)
        d["_fd"], d["_pid"] = -1, -1
        return d

    def __del__(self) -> None:
        self.close()

    def close(self) -> None:
        if self._fd >= 0 and self._pid == os.getpid():
            try:
                os.close(self._fd)
            except OSError:
                pass
        self._fd, self._pid = -1, -1

    def _open(self) -> int:
        if self._fd < 0 or self._pid != os.getpid():
            self._fd = os.open(self.path, os.O_RDONLY)
            self._pid = os.getpid()
        return self._fd

    def members(self, i: int) -> tuple[str, list[int], list[int]]:
        """(key, member data offsets, member sizes) of sample i, in ALL_FIELDS order, from the mapped index."""
        m = self.shard.mapped
        if m.fields != list(ALL_FIELDS) or "member_offset" not in m.columns:
            raise CorruptSampleError(
                f"shard {self.path}: its index {self.shard.index_path.name} has no member "
                f"offsets for {list(ALL_FIELDS)}; run `python -m shared.cli verify`"
            )
        return m.key(i), m.columns["member_offset"][i].tolist(), m.columns["member_size"][i].tolist()

    def read_stored(self, i: int) -> dict:
        key, offs, sizes = self.members(i)
        fd = self._open()
        bad = [f for f, o, n in zip(ALL_FIELDS, offs, sizes) if o < 0 or n < 0]
        if bad:
            raise CorruptSampleError(
                f"shard {self.path}: sample {key!r} field {bad[0]}: bad member index in "
                f"{self.shard.index_path.name} (offset/size < 0)"
            )
        lo, hi = min(offs), max(o + n for o, n in zip(offs, sizes))
        payloads = {}
        if hi - lo <= sum(sizes) + _MAX_HEADER_GAP * len(offs):
            try:
                span = os.pread(fd, hi - lo, lo)
            except (OSError, ValueError, OverflowError) as e:
                raise CorruptSampleError(
                    f"shard {self.path}: sample {key!r}: bad member index in "
                    f"{self.shard.index_path.name} ({type(e).__name__}: {e})"
                ) from e
            view = memoryview(span)  # members as views of the one read, not copies
            for f, o, n in zip(ALL_FIELDS, offs, sizes):
                b = view[o - lo : o - lo + n]
                if len(b) != n:
                    raise CorruptSampleError(
                        f"shard {self.path}: sample {key!r} field {f} is truncated "
                        f"({len(b)} of {n} bytes); run `python -m shared.cli verify`"
                    )
                payloads[f] = b
        else:  # members far apart: the index is odd, read field by field so that no huge read happens
            for f, o, n in zip(ALL_FIELDS, offs, sizes):
                try:
                    b = os.pread(fd, n, o)
                except (OSError, ValueError, OverflowError) as e:
                    raise CorruptSampleError(
                        f"shard {self.path}: sample {key!r} field {f}: bad member index in "
                        f"{self.shard.index_path.name} ({type(e).__name__}: {e})"
                    ) from e
                if len(b) != n:
                    raise CorruptSampleError(
                        f"shard {self.path}: sample {key!r} field {f} is truncated "
                        f"({len(b)} of {n} bytes); run `python -m shared.cli verify`"
                    )
                payloads[f] = b
        return decode_members(key, payloads, self.spec, f"shard {self.path}")


def iter_tar_stored(path: str | Path, spec: CacheSpec, keys: list[str] | None = None) -> Iterator[dict]:
    """Sequential read of a tar (no seeks), yielding stored samples in file order. Checks key order if given."""
    where = f"shard {path}"
    cur, payloads, n = None, {}, 0

    def emit() -> dict:
        if keys is not None and (n >= len(keys) or keys[n] != cur):
            raise CorruptSampleError(
                f"{where}: sample #{n} has key {cur!r}, the shard index says "
                f"{keys[n] if n < len(keys) else 'nothing'!r}"
            )
        return decode_members(cur, payloads, spec, where)

    try:
        with tarfile.open(path, mode="r|") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                key, _, rest = m.name.partition(".")
                field = rest.split(".", 1)[0]
                if key != cur:
                    if cur is not None:
                        yield emit()
                        n += 1
                    cur, payloads = key, {}
                f = tf.extractfile(m)
                payloads[field] = f.read() if f is not None else b""
    except tarfile.TarError as e:
        raise CorruptSampleError(
            f"{where}: broken tar after sample #{n} ({e}); run `python -m shared.cli verify`"
        ) from e
    if cur is not None:
        yield emit()
        n += 1
    if keys is not None and n != len(keys):
        raise CorruptSampleError(f"{where}: holds {n} samples, the shard index says {len(keys)}")
