"""webdataset shards: shards/<name>.tar, one tar member per stored field.

Members of a sample (webdataset groups them by the key before the first "."), sample layout 2 (what is written):
    {key}.caption.txt       UTF-8 caption
    {key}.meta.json         {"bucket": [H, W], "image_meta_size": [...6], "crc32c": [head, clip_rows, t5_rows,
                            moments per view]} (schema.part_crcs)
    {key}.<small>.npy       clip_ids, clip_mask, t5_ids, t5_mask, t5_index: always plain .npy (a few hundred bytes;
                            a blosc frame of them cost more to decode than its bytes to read)
    {key}.<big>.npy         clip_rows, t5_rows, then moments_<view> per view ((2C, h, w) each, so that a training
                            read decodes only the view it draws); ".npy.blosc" when spec.compression == "zstd": the
                            .npy bytes through Blosc(zstd, byte shuffle, one block up to BLOSC_BLOCK bytes); t5_rows
                            XOR-delta coded first, see schema.xor_delta_rows
Sample layout 1 (caches written before; read, not written): caption, meta with one "crc32", then moments (all views),
clip_ids, clip_mask, clip_rows, t5_ids, t5_mask, t5_rows, t5_index, all through blosc under zstd. The shard's index
names its member fields, which says the layout.
Plain .npy (never pickle; read with np.load(allow_pickle=False)), so `wds.WebDataset(url).decode()` can read a shard
too. Member headers have fixed mtime/owner, so the same samples give the same bytes and the same sha256.
The shard's index file shards/<name>.index (shared.shard_index) records each member's data offset and size, which
gives random access with one pread per sample (at most two for a training read, which skips a view) and no tar
scan.
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from . import schema
from .fsutil import file_sha256, remove_path, tmp_path_for
from .manifest import ShardInfo
from .schema import VIEWS, CacheSpec, CorruptSampleError, encode_sample, undo_xor_delta_rows, xor_delta_rows
from .shard_index import ShardIndex
from .shard_writer import ShardWriterBase

# sample layout 1 (read only)
NPY_FIELDS = ("moments", "clip_ids", "clip_mask", "clip_rows", "t5_ids", "t5_mask", "t5_rows", "t5_index")
ALL_FIELDS = ("caption", "meta") + NPY_FIELDS
# sample layout 2
SMALL_FIELDS = ("clip_ids", "clip_mask", "t5_ids", "t5_mask", "t5_index")
TEXT_ROW_FIELDS = ("clip_rows", "t5_rows")
# One blosc block per member up to this size (a 1024^2 view's moments is 0.5 MiB): blosc's default blocks (tens of
# KiB at clevel 3) start a zstd context each, so on bench/loader.py's samples one block decoded ~2x faster and
# compressed ~4% smaller (measured in the session 5 note). Only the writer uses it: a blosc frame says its blocks.
BLOSC_BLOCK = 1 << 20


@functools.lru_cache(maxsize=64)
def member_fields(spec: CacheSpec, layout: int) -> tuple[str, ...]:
    """The member fields of one sample in tar order, for a sample layout (1 or 2). Cached: every read asks."""
    if layout == 1:
        return ALL_FIELDS
    return ("caption", "meta") + SMALL_FIELDS + TEXT_ROW_FIELDS + tuple(f"moments_{v}" for v in spec.views)


def member_fields_of(names: Any) -> tuple[str, ...] | None:
    """The member fields in tar order of a sample whose member field names are `names` (either layout), or None."""
    names = set(names)
    if "moments" in names:
        return ALL_FIELDS
    views = [v for v in VIEWS if f"moments_{v}" in names]
    return member_fields(CacheSpec(views=tuple(views)), 2) if views and views[0] == "plain" else None


def _layout_of(fields: list[str], spec: CacheSpec) -> int | None:
    for layout in (2, 1):
        if list(fields) == list(member_fields(spec, layout)):
            return layout
    return None


def _ext(field: str, spec: CacheSpec, layout: int = 2) -> str:
    if field == "caption":
        return "txt"
    if field == "meta":
        return "json"
    if layout == 2 and field in SMALL_FIELDS:
        return "npy"
    return "npy.blosc" if spec.compression == "zstd" else "npy"


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


@functools.cache
def _blosc(level: int, blocksize: int = 0):
    """One codec per setting per process (a codec holds only its settings; building one per sample cost ~7% of a
    worker's time)."""
    import numcodecs.blosc
    from numcodecs import Blosc

    numcodecs.blosc.use_threads = False  # blosc's thread pool and forked DataLoader workers do not mix
    return Blosc(cname="zstd", clevel=level, shuffle=Blosc.SHUFFLE, blocksize=blocksize)


@functools.cache
def _blosc_decompress() -> Any:
    """numcodecs.blosc.decompress itself (a frame says its codec and settings), not through Blosc.decode, whose buffer
    checks and conversions ran again on every member for nothing."""
    import numcodecs.blosc  # lazy, as in _blosc

    numcodecs.blosc.use_threads = False  # see _blosc
    return numcodecs.blosc.decompress


def _compress(npy: bytes, itemsize: int, level: int, blocksize: int = 0) -> bytes:
    # the .npy header is padded to a multiple of 64 bytes, so the array data stays aligned for the byte shuffle
    return bytes(_blosc(level, blocksize).encode(np.frombuffer(npy, dtype=f"u{itemsize}")))


def encode_members(stored: dict, spec: CacheSpec) -> list[tuple[str, bytes]]:
    """(field, payload bytes) for one stored sample, in member order (its layout: crc32c present = 2)."""
    layout = 2 if "crc32c" in stored else 1
    meta: dict = {
        "bucket": [int(x) for x in stored["bucket"]],
        "image_meta_size": [int(x) for x in stored["image_meta_size"]],
    }
    if layout == 2:
        meta["crc32c"] = [int(x) for x in stored["crc32c"]]
    else:
        meta["crc32"] = int(stored["crc32"])
    out = [("caption", stored["caption"].encode("utf-8")), ("meta", json.dumps(meta).encode("utf-8"))]
    for f in member_fields(spec, layout)[2:]:
        a = stored["moments"][spec.views.index(f[8:])] if f.startswith("moments_") else stored[f]
        if _ext(f, spec, layout) == "npy.blosc":
            if f == "t5_rows":
                a = xor_delta_rows(a)
            block = BLOSC_BLOCK if layout == 2 else 0
            out.append((f, _compress(_npy_bytes(a), a.dtype.itemsize, spec.zstd_level, block)))
        else:
            out.append((f, _npy_bytes(a)))
    return out


def _decode_npy(b: bytes | memoryview, blosc: Any) -> np.ndarray:
    if blosc is not None:
        # straight into a writable buffer (load_npy returns a view of it): bytes 4..8 of a blosc frame hold its
        # decompressed size. np.empty, not bytearray: no zero fill of bytes the decoder overwrites (~1.2 MB/sample)
        # bytes 12..16 hold the frame's compressed size: blosc trusts it, so a frame that claims more bytes than its
        # member holds (a damaged header) is refused here instead of read past its end
        if int.from_bytes(b[12:16], "little") != len(b):
            raise ValueError(f"blosc frame of {len(b)} bytes says {int.from_bytes(b[12:16], 'little')}")
        dest = np.empty(int.from_bytes(b[4:8], "little"), dtype=np.uint8)
        _blosc_decompress()(b, dest)
        b = memoryview(dest)
    return load_npy(b)


def decode_members(
    key: str,
    payloads: dict[str, bytes | memoryview],
    spec: CacheSpec,
    where: str,
    *,
    view: int | None = None,
    clip: bool = True,
    t5: bool = True,
) -> dict:
    """Inverse of encode_members: the stored sample (its layout from its members). Raises CorruptSampleError naming
    `where` and the key.

    `view` given (layout 2 only): the parts a training read needs, nothing else decoded: "moments_view" (2C, h, w)
    of that view instead of "moments", and clip_rows / t5_rows only if `clip` / `t5`. The caller checks them
    (schema.check_read_parts)."""
    layout = 2 if "moments" not in payloads else 1
    fields = member_fields(spec, layout)
    missing = [f for f in fields if f not in payloads]
    if missing:
        raise CorruptSampleError(f"{where}: sample {key!r} lacks members {missing}")
    assert view is None or layout == 2, "a part read of a layout-1 sample (read_stored it whole)"
    try:
        meta = json.loads(bytes(payloads["meta"]).decode("utf-8"))
        out = {
            "key": key,
            "caption": bytes(payloads["caption"]).decode("utf-8"),
            "bucket": np.asarray(meta["bucket"], dtype=np.int32),
            "image_meta_size": np.asarray(meta["image_meta_size"], dtype=np.int32),
        }
        if layout == 2:
            out["crc32c"] = np.asarray(meta["crc32c"], dtype=np.int64).astype(np.uint32)
        else:
            out["crc32"] = int(meta["crc32"])
        z = _blosc(spec.zstd_level) if spec.compression == "zstd" else None
        if layout == 1:
            for f in NPY_FIELDS:
                out[f] = _decode_npy(payloads[f], z)
        else:
            for f in SMALL_FIELDS:
                out[f] = load_npy(payloads[f])
            for f, want in zip(TEXT_ROW_FIELDS, (clip, t5)):
                if want or view is None:
                    out[f] = _decode_npy(payloads[f], z)
            if view is None:
                out["moments"] = np.stack([_decode_npy(payloads[f"moments_{v}"], z) for v in spec.views])
            else:
                out["view"] = int(view)
                out["moments_view"] = _decode_npy(payloads[f"moments_{spec.views[view]}"], z)
        if z is not None and "t5_rows" in out:
            out["t5_rows"] = undo_xor_delta_rows(out["t5_rows"], spec.storage_dtype("t5"), in_place=True)
    except Exception as e:
        raise CorruptSampleError(
            f"{where}: sample {key!r} is unreadable ({type(e).__name__}: {e}); run `python -m shared.cli verify`"
        ) from e
    return out


# The header np.lib.format.write_array gives a C-order array: {'descr': '<f2', 'fortran_order': False, 'shape': (..), }
_NPY_HEADER = re.compile(rb"\{'descr': '([<>|][a-z]\d{1,2})', 'fortran_order': False, 'shape': \(([\d, ]*)\), \}")
_NPY_MAGIC_V1 = b"\x93NUMPY\x01\x00"
_NPY_HEADER_CACHED = 512  # longest header _npy_header caches (its cache: 4096 keys of at most this many bytes)


@functools.lru_cache(maxsize=4096)
def _npy_header(header: bytes) -> tuple[np.dtype, tuple[int, ...], int] | None:
    """(dtype, shape, data bytes) of a whole .npy v1 header of the form np.lib.format.write_array gives a C-order array
    of a plain number or bool dtype, else None. Cached: a cache holds a few hundred distinct headers (per field, one
    per shape: row counts up to the text lengths, one moments shape per bucket), and parsing one per member was ~8%
    of a loader worker's time; the whole header is the key, so a cached answer is that of the same bytes."""
    m = _NPY_HEADER.match(header, 10)
    try:
        dtype = np.dtype(m.group(1).decode()) if m is not None else None
    except TypeError:  # e.g. '<f3'
        dtype = None
    if dtype is None or dtype.kind not in "biuf":
        return None
    shape = tuple(int(v) for v in m.group(2).split(b",") if v.strip())
    return dtype, shape, dtype.itemsize * math.prod(shape)


def load_npy(payload: bytes | bytearray | memoryview) -> np.ndarray:
    """``np.load(allow_pickle=False)`` of one member, without numpy's literal_eval of the header for the headers this
    module writes (a quarter of a 1024x1024 sample's read time went there). A header of another form, a dtype that
    is not a plain number or bool, or a payload of the wrong size goes to np.load."""
    if payload[:8] == _NPY_MAGIC_V1:
        end = 10 + int.from_bytes(payload[8:10], "little")
        # the headers this module writes are 128 bytes; a damaged length (up to 64 KiB) is parsed, never cached
        header = bytes(payload[:end])
        parsed = _npy_header(header) if end <= _NPY_HEADER_CACHED else _npy_header.__wrapped__(header)
        if parsed is not None and len(payload) - end == parsed[2]:
            out = np.frombuffer(payload, dtype=parsed[0], offset=end).reshape(parsed[1])
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
        layout = 2 if "crc32c" in stored else 1
        for field, payload in encode_members(stored, self.spec):
            self._tar.addfile(
                _tarinfo(f"{stored['key']}.{field}.{_ext(field, self.spec, layout)}", len(payload)),
                io.BytesIO(payload),
            )

    def close(self) -> ShardInfo:
        self._check_open()
        self._closed = True
        try:
            self._tar.close()
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            members = index_members(self.tmp, self._stats.keys, self.spec, schema.SAMPLE_LAYOUT)
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


def index_members(
    path: Path, keys: list[str], spec: CacheSpec, layout: int = schema.SAMPLE_LAYOUT
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(member fields, (N, F) member data offsets, (N, F) member sizes) in key order, from the tar headers."""
    fields = member_fields(spec, layout)
    pos = {k: i for i, k in enumerate(keys)}
    col = {f: j for j, f in enumerate(fields)}
    n = len(keys)
    offset = np.full((n, len(fields)), -1, dtype="<i8")
    size = np.full((n, len(fields)), -1, dtype="<i8")
    with tarfile.open(path, mode="r") as tf:
        for m in tf:
            key, _, rest = m.name.partition(".")
            field = rest.split(".", 1)[0]
            i, j = pos.get(key), col.get(field)
            if i is None or j is None:
                raise AssertionError(f"unexpected member {m.name} in {path}")
            offset[i, j], size[i, j] = m.offset_data, m.size
    assert (offset >= 0).all(), "a member is missing from the tar just written"
    return list(fields), offset, size


# A sample's members sit back to back in the tar, each after a 512-byte header (a PAX name record adds a few more
# blocks): one pread covers them all unless the index says they are further apart than that.
_MAX_HEADER_GAP = 4 * 512


class WdsShardReader:
    """Random access into a completed tar via the shard's index file (member offsets): one pread per sample."""

    def __init__(self, path: str | Path, spec: CacheSpec, shard: ShardIndex) -> None:
        self.path, self.spec, self.shard = Path(path), spec, shard
        self._fd = -1
        self._pid = -1
        self._layout: int | None = None
        self._fields: list[str] = []
        self._skips: dict[tuple[int, bool, bool], frozenset[str]] = {}  # read_parts' skipped fields per request
        self._where = f"shard {self.path}"  # what errors name

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

    @property
    def layout(self) -> int:
        """The shard's sample layout (1 or 2), from the member fields its index lists (looked up once)."""
        if self._layout is not None:
            return self._layout
        m = self.shard.mapped
        layout = _layout_of(m.fields, self.spec) if "member_offset" in m.columns else None
        if layout is None:
            raise CorruptSampleError(
                f"shard {self.path}: its index {self.shard.index_path.name} has no member offsets for "
                f"{list(member_fields(self.spec, 2))} (or layout 1's {list(ALL_FIELDS)}); run "
                "`python -m shared.cli verify`"
            )
        self._layout, self._fields = layout, list(member_fields(self.spec, layout))
        return layout

    def members(self, i: int) -> tuple[str, list[str], list[int], list[int]]:
        """(key, fields, member data offsets, member sizes) of sample i, from the mapped index."""
        m = self.shard.mapped
        self.layout  # noqa: B018 (looks the fields up on first use)
        offs, sizes = m.columns["member_offset"][i].tolist(), m.columns["member_size"][i].tolist()
        return m.key(i), self._fields, offs, sizes

    def read_stored(self, i: int) -> dict:
        """Sample i's stored form, every part decoded (the caller checks it: schema.check_stored)."""
        key, fields, payloads = self._payloads(i)
        return decode_members(key, payloads, self.spec, self._where)

    def read_parts(self, i: int, view: int, clip: bool, t5: bool) -> dict:
        """What a training read needs of sample i, nothing else decoded (see decode_members); a layout-1 shard has
        one checksum over everything, so there it is read whole (the caller tells the two apart by "crc32c")."""
        if self.layout == 1:
            return self.read_stored(i)
        skip = self._skips.get((view, clip, t5))
        if skip is None:
            names = {f"moments_{v}" for j, v in enumerate(self.spec.views) if j != view}
            names |= {f for f, want in zip(TEXT_ROW_FIELDS, (clip, t5)) if not want}
            skip = self._skips[view, clip, t5] = frozenset(names)
        key, fields, payloads = self._payloads(i, skip)
        return decode_members(key, payloads, self.spec, self._where, view=view, clip=clip, t5=t5)

    def _payloads(self, i: int, skip: frozenset[str] = frozenset()) -> tuple[str, list[str], dict]:
        """(key, fields, {field: member bytes, or None for the `skip` fields}) of sample i. Members lie back to back
        (each after its tar header): the ones read are read in as few preads as the skipped ones allow (one for the
        whole sample, or two when a part read skips a view between them), as views of the read, not copies."""
        key, fields, offs, sizes = self.members(i)
        fd = self._open()
        bad = [f for f, o, n in zip(fields, offs, sizes) if o < 0 or n < 0]
        if bad:
            raise CorruptSampleError(
                f"shard {self.path}: sample {key!r} field {bad[0]}: bad member index in "
                f"{self.shard.index_path.name} (offset/size < 0)"
            )
        payloads: dict[str, Any] = {f: None for f in skip if f in fields}
        want = sorted((o, n, f) for f, o, n in zip(fields, offs, sizes) if f not in skip)
        runs: list[list[tuple[int, int, str]]] = []
        for m in want:  # a gap wider than a few tar headers (a skipped member, an odd index) starts a new read
            if runs and m[0] - (runs[-1][-1][0] + runs[-1][-1][1]) <= _MAX_HEADER_GAP:
                runs[-1].append(m)
            else:
                runs.append([m])
        for run in runs:
            lo, hi = run[0][0], max(o + n for o, n, _ in run)
            try:
                view = memoryview(os.pread(fd, hi - lo, lo))
            except (OSError, ValueError, OverflowError) as e:
                raise CorruptSampleError(
                    f"shard {self.path}: sample {key!r} field {run[0][2]}: bad member index in "
                    f"{self.shard.index_path.name} ({type(e).__name__}: {e})"
                ) from e
            for o, n, f in run:
                b = view[o - lo : o - lo + n]
                if len(b) != n:
                    raise CorruptSampleError(
                        f"shard {self.path}: sample {key!r} field {f} is truncated "
                        f"({len(b)} of {n} bytes); run `python -m shared.cli verify`"
                    )
                payloads[f] = b
        return key, fields, payloads


def iter_tar_stored(
    path: str | Path, spec: CacheSpec, keys: list[str] | None = None, data: BinaryIO | None = None
) -> Iterator[dict]:
    """Sequential read of a tar (no seeks), yielding stored samples in file order. Checks key order if given.
    `data`: the tar's bytes as a sequential file object (a shard still downloading) instead of opening `path`."""
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
        with tarfile.open(path if data is None else None, mode="r|", fileobj=data) as tf:
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
