"""zarr v3 shards: one group per shard (shards/<name>.zarr), written by exactly one writer, in one go.

Layout of a shard group with N samples (ragged fields are flat arrays + (N+1,) int64 offsets):
    attrs: schema_version, spec, keys
    bucket (N,2) int32, image_meta_size (N,6) int32, crc32c (N, 3+V) uint32 (schema.part_crcs; sample layout 2,
    attrs sample_layout=2) or, in groups written before, crc32 (N,) uint32 (layout 1)
    clip_ids/t5_ids (N,L) int32, clip_mask/t5_mask (N,L) bool, t5_index (N,Lt) uint16
    caption_utf8 (B,) uint8 + caption_offsets
    moments (E,) vae storage dtype + moments_offsets      (per-sample shape comes from the bucket)
    clip_rows (R1,Dc) + clip_row_offsets, t5_rows (R2,Dt) + t5_row_offsets
With spec.compression == "zstd" every array goes through Blosc(zstd, byte shuffle) and t5_rows holds the
XOR-delta coded bit patterns of each sample's unique rows (see schema.xor_delta_rows).
Big arrays use zarr's sharding codec (one file per array, inner chunks of ~128-256 KiB) so a shard is a handful
of files and a sample read touches one or two inner chunks. The writer buffers the shard's (compact) stored samples
and writes every array with a single assignment: zarr 3.1 rewrites a whole shard object on a partial write, and two
writers on one shard lose data (ecosystem-notes 3.3), so one writer owns one group, start to finish.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from . import schema
from .fsutil import fsync_tree, remove_path, tmp_path_for, tree_bytes, tree_sha256
from .manifest import ShardInfo
from .schema import SCHEMA_VERSION, CacheSpec, CorruptSampleError, encode_sample, undo_xor_delta_rows, xor_delta_rows
from .shard_index import ShardIndex
from .shard_writer import ShardWriterBase

_SMALL = (
    "bucket",
    "image_meta_size",
    "clip_ids",
    "clip_mask",
    "t5_ids",
    "t5_mask",
    "t5_index",
    "caption_utf8",
    "caption_offsets",
    "moments_offsets",
    "clip_row_offsets",
    "t5_row_offsets",
)
_FLAT_CHUNK_BYTES = 1 << 18
_ROW_CHUNK = 64


def _compressors(spec: CacheSpec):
    if spec.compression == "zstd":
        # lazy: zarr/numcodecs cost ~1-2 s to import; webdataset caches never load them
        import numcodecs.blosc
        from zarr.codecs import BloscCodec

        numcodecs.blosc.use_threads = False  # blosc's thread pool and forked DataLoader workers do not mix
        return BloscCodec(cname="zstd", clevel=spec.zstd_level, shuffle="shuffle")
    return None


@functools.cache
def _blosc_codec(spec: CacheSpec):
    """numcodecs' Blosc, which decodes what zarr's BloscCodec wrote (the same blosc frames)."""
    if spec.compression != "zstd":
        return None
    # lazy: as in _compressors
    import numcodecs.blosc
    from numcodecs import Blosc

    numcodecs.blosc.use_threads = False  # blosc's thread pool and forked DataLoader workers do not mix
    return Blosc(cname="zstd", clevel=spec.zstd_level, shuffle=Blosc.SHUFFLE)


def _offsets(lengths: list[int]) -> np.ndarray:
    out = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


class ZarrShardWriter(ShardWriterBase):
    """w.add(sample) ...; info = w.close(). Writes shards/.tmp-<name>-..., fsyncs, renames, then the sidecar."""

    format = "zarr"

    def __init__(self, root: str | Path, name: str, spec: CacheSpec, overwrite: bool = False) -> None:
        super().__init__(root, name, spec, overwrite)
        self._samples: list[dict] = []

    def add(self, sample: dict) -> None:
        self._check_open()
        stored = encode_sample(sample, self.spec)
        self._stats.add(stored)
        self._samples.append(stored)

    def _write_group(self, path: Path) -> None:
        import zarr  # lazy: ~1-2 s to import; webdataset caches never load it

        spec, S, n = self.spec, self._samples, len(self._samples)
        layout = (2 if "crc32c" in S[0] else 1) if S else schema.SAMPLE_LAYOUT  # encode_sample's
        comp = _compressors(spec)
        g = zarr.open_group(str(path), mode="w", zarr_format=3)
        g.attrs.update(
            {
                "schema_version": SCHEMA_VERSION,
                "spec": spec.to_dict(),
                "keys": [s["key"] for s in S],
                "shard": self.name,
                **({"sample_layout": 2} if layout == 2 else {}),  # layout 1 groups (written before) have none
            }
        )

        def small(name: str, data: np.ndarray) -> None:
            g.create_array(
                name, data=data, chunks=tuple(max(1, d) for d in data.shape), compressors=comp, write_data=True
            )

        def big(name: str, data: np.ndarray) -> None:
            if data.ndim == 1:
                ch = max(1, _FLAT_CHUNK_BYTES // data.itemsize)
                chunks = (ch,)
            else:
                chunks = (_ROW_CHUNK,) + data.shape[1:]
            n0 = max(data.shape[0], 1)
            shards = ((n0 + chunks[0] - 1) // chunks[0] * chunks[0],) + chunks[1:]
            g.create_array(name, data=data, chunks=chunks, shards=shards, compressors=comp)

        def stack(field: str, shape: tuple, dtype) -> np.ndarray:
            return np.stack([s[field] for s in S]) if n else np.zeros((0,) + shape, dtype=dtype)

        small("bucket", stack("bucket", (2,), np.int32))
        small("image_meta_size", stack("image_meta_size", (6,), np.int32))
        if layout == 2:
            small("crc32c", stack("crc32c", (3 + spec.n_views,), np.uint32).astype(np.uint32))
        else:
            small("crc32", np.array([s["crc32"] for s in S], dtype=np.uint32))
        for enc, L in (("clip", spec.clip_len), ("t5", spec.t5_len)):
            small(f"{enc}_ids", stack(f"{enc}_ids", (L,), np.int32))
            small(f"{enc}_mask", stack(f"{enc}_mask", (L,), np.bool_))
        small("t5_index", stack("t5_index", (spec.t5_len,), np.uint16))

        caps = [s["caption"].encode("utf-8") for s in S]
        small("caption_offsets", _offsets([len(c) for c in caps]))
        big("caption_utf8", np.frombuffer(b"".join(caps), dtype=np.uint8).copy())

        vae_dt = spec.storage_dtype("vae")
        small("moments_offsets", _offsets([s["moments"].size for s in S]))
        big("moments", np.concatenate([s["moments"].ravel() for s in S]) if n else np.zeros(0, vae_dt))
        for enc, D in (("clip", spec.clip_dim), ("t5", spec.t5_dim)):
            rows = [s[f"{enc}_rows"] for s in S]
            if enc == "t5" and spec.compression == "zstd":
                rows = [xor_delta_rows(r) for r in rows]
            small(f"{enc}_row_offsets", _offsets([r.shape[0] for r in rows]))
            dt = rows[0].dtype if n else spec.storage_dtype(enc)
            big(f"{enc}_rows", np.concatenate(rows) if n else np.zeros((0, D), dt))

    def close(self) -> ShardInfo:
        """Write the group under a temp name, fsync, rename into place, then write the sidecar index."""
        self._check_open()
        self._closed = True
        tmp = tmp_path_for(self.final)
        try:
            self._write_group(tmp)
            fsync_tree(tmp)
            built = self._stats.build(nbytes=tree_bytes(tmp), sha256=tree_sha256(tmp))
        except BaseException:
            remove_path(tmp)
            raise
        finally:
            self._samples = []
        return self._publish(tmp, built)

    def abort(self) -> None:
        self._closed, self._samples = True, []


_NO_CHUNK = (1 << 64) - 1  # a sharding index entry for a chunk that was not written (all fill value)


class _FlatShardArray:
    """One big array of a shard group read through its stored offsets, without zarr's machinery.

    The writer gives each big array ONE zarr shard file (`big` above: the outer chunk covers the array) of inner
    chunks along axis 0, each `bytes` (little endian) then optionally Blosc, and the shard's index at the end:
    (chunks, 2) uint64 (offset, nbytes) then its crc32c. The index is read and its crc32c checked once per process;
    a sample's rows then cost one pread of the inner chunks they touch (written back to back) and their decode.
    `layout()` returns None for any other layout, and the reader falls back to zarr for that array.
    """

    def __init__(
        self, path: Path, shape: tuple, dtype: np.dtype, inner: int, fill: Any, blosc: bool, n_chunks: int
    ) -> None:
        self.path, self.shape, self.dtype, self.inner, self.blosc = path, shape, dtype, inner, blosc
        self.fill, self.n_chunks = fill, n_chunks
        self.index: np.ndarray | None = None

    @classmethod
    def layout(cls, array_dir: Path) -> _FlatShardArray | None:
        try:
            meta = json.loads((array_dir / "zarr.json").read_text())
            shape = tuple(int(v) for v in meta["shape"])
            outer = tuple(int(v) for v in meta["chunk_grid"]["configuration"]["chunk_shape"])
            (shard,) = meta["codecs"]
            conf = shard["configuration"]
            inner = tuple(int(v) for v in conf["chunk_shape"])
            names = [c["name"] for c in conf["codecs"]]
            index_names = [c["name"] for c in conf["index_codecs"]]
            ok = (
                meta["chunk_grid"]["name"] == "regular"
                and shard["name"] == "sharding_indexed"
                and meta["chunk_key_encoding"]["name"] == "default"
                and meta["chunk_key_encoding"].get("configuration", {}).get("separator", "/") == "/"
                and conf.get("index_location", "end") == "end"
                and index_names == ["bytes", "crc32c"]
                and names in (["bytes"], ["bytes", "blosc"])
                and conf["codecs"][0].get("configuration", {}).get("endian", "little") == "little"
                and len(shape) >= 1
                and shape[0] <= outer[0]
                and outer[1:] == shape[1:] == inner[1:]
                and outer[0] % inner[0] == 0
                and meta.get("storage_transformers", []) == []
            )
            if not ok:
                return None
            dtype = np.dtype(meta["data_type"]).newbyteorder("<")
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return cls(
            array_dir / "c" / "/".join("0" * len(shape)),
            shape,
            dtype,
            inner[0],
            meta["fill_value"],
            names[-1] == "blosc",
            outer[0] // inner[0],
        )

    def _read_index(self, fd: int, size: int) -> np.ndarray:
        import google_crc32c  # lazy: zarr's own (undeclared) dependency; only zarr shard reads need it

        n = self.n_chunks * 16
        if size < n + 4:
            raise CorruptSampleError(f"{self.path}: {size} bytes, shorter than its chunk index ({n + 4} bytes)")
        raw = os.pread(fd, n + 4, size - n - 4)
        if google_crc32c.value(raw[:n]) != int.from_bytes(raw[n:], "little"):
            raise CorruptSampleError(f"{self.path}: its chunk index fails its crc32c check")
        index = np.frombuffer(raw[:n], dtype="<u8").reshape(self.n_chunks, 2)
        written = index[:, 0] != _NO_CHUNK
        if (index[written, 0] + index[written, 1] > size - n - 4).any():
            raise CorruptSampleError(f"{self.path}: its chunk index points past the end of the file")
        return index

    def rows(self, a: int, b: int, blosc_codec: Any) -> np.ndarray:
        """Rows [a, b) along axis 0 (one open and one pread, unless the chunks lie apart)."""
        tail = self.shape[1:]
        if b <= a:
            return np.zeros((0, *tail), dtype=self.dtype)
        if not (0 <= a < b <= self.shape[0]):
            raise CorruptSampleError(f"{self.path}: rows [{a}, {b}) outside the array's {self.shape[0]}")
        c0, c1 = a // self.inner, (b - 1) // self.inner + 1
        fd = os.open(self.path, os.O_RDONLY)
        try:
            if self.index is None:
                self.index = self._read_index(fd, os.fstat(fd).st_size)
            ix = self.index[c0:c1]
            written = ix[:, 0] != _NO_CHUNK
            span = b""
            lo = 0
            if written.any():
                lo, hi = int(ix[written, 0].min()), int((ix[written, 0] + ix[written, 1]).max())
                span = os.pread(fd, hi - lo, lo)
                if len(span) != hi - lo:
                    raise CorruptSampleError(f"{self.path}: truncated ({len(span)} of {hi - lo} bytes read)")
        finally:
            os.close(fd)
        view = memoryview(span)
        chunk_items = self.inner * int(np.prod(tail, dtype=np.int64))
        parts = []
        for (off, nbytes), w in zip(ix.tolist(), written.tolist()):
            if not w:
                parts.append(np.full((self.inner, *tail), self.fill, dtype=self.dtype))
                continue
            raw = view[off - lo : off - lo + nbytes]
            if self.blosc:
                dest = np.empty(chunk_items * self.dtype.itemsize, dtype=np.uint8)  # no zero fill: decoded over
                blosc_codec.decode(raw, out=dest)
                raw = memoryview(dest)
            if len(raw) != chunk_items * self.dtype.itemsize:
                raise CorruptSampleError(
                    f"{self.path}: an inner chunk decodes to {len(raw)} bytes, expected "
                    f"{chunk_items * self.dtype.itemsize}"
                )
            parts.append(np.frombuffer(raw, dtype=self.dtype).reshape(self.inner, *tail))
        out = parts[0] if len(parts) == 1 else np.concatenate(parts)
        start = a - c0 * self.inner
        return out[start : start + b - a]


class ZarrShardReader:
    """Random access into one completed zarr shard. Opens lazily (per process) so it pickles to DataLoader workers.

    The per-sample arrays are read once per process with zarr (`_SMALL`: ids, masks, offsets); the three big ones
    through their stored chunk offsets (`_FlatShardArray`), one pread each per sample, as the webdataset reader does.
    """

    def __init__(self, path: str | Path, spec: CacheSpec, shard: ShardIndex) -> None:
        self.path, self.spec, self.shard = Path(path), spec, shard
        self._g: Any = None
        self._small: dict[str, np.ndarray] = {}
        self._flat: dict[str, _FlatShardArray | None] = {}
        self._pid = -1

    def __len__(self) -> int:
        return self.shard.n_samples

    def __getstate__(self) -> dict:
        d = dict(self.__dict__)
        d["_g"], d["_small"], d["_pid"], d["_flat"] = None, {}, -1, {}
        return d

    def _open(self) -> None:
        import zarr  # lazy: ~1-2 s to import; webdataset caches never load it

        if self._g is not None and self._pid == os.getpid():
            return
        try:
            g = zarr.open_group(str(self.path), mode="r")
            crc = "crc32c" if "crc32c" in g else "crc32"  # sample layout 2 or 1
            self._small = {k: np.asarray(g[k][...]) for k in _SMALL + (crc,)}
            self._g = {k: g[k] for k in ("moments", "clip_rows", "t5_rows")}  # array handles: one metadata read
            self._flat = {k: _FlatShardArray.layout(self.path / k) for k in self._g}
            self._pid = os.getpid()
        except Exception as e:  # any decode/IO error inside a shard is corruption from the reader's view
            raise CorruptSampleError(
                f"shard {self.path}: cannot open ({type(e).__name__}: {e}); run `python -m shared.cli verify`"
            ) from e

    def _read_big(self, reads: tuple) -> list[np.ndarray]:
        """The three big reads of a sample: through the stored offsets, or (another layout) in one trip through
        zarr's event loop (they run concurrently)."""
        if all(self._flat.get(n) is not None for n, _ in reads):
            codec = _blosc_codec(self.spec)
            return [self._flat[n].rows(int(sl.start), int(sl.stop), codec) for n, sl in reads]
        try:
            from zarr.core.sync import sync  # zarr internals: guarded, a move falls back below

            async def gather():
                return await asyncio.gather(*(self._g[n]._async_array.getitem(sl) for n, sl in reads))

            return [np.asarray(x) for x in sync(gather())]
        except (ImportError, AttributeError):  # zarr internals moved: fall back to one read per call
            return [np.asarray(self._g[n][sl]) for n, sl in reads]

    def read_stored(self, i: int) -> dict:
        """Sample i's stored form, every part read (the caller checks it: schema.check_stored)."""
        return self._read(i, None, True, True)

    def read_parts(self, i: int, view: int, clip: bool, t5: bool) -> dict:
        """What a training read needs of sample i: "moments_view" (2C, h, w) of `view` (its own range of the flat
        moments, so the other view's chunks are not read), the text rows only if asked; a layout-1 group (one
        checksum over everything) is read whole (the caller tells the two apart by "crc32c")."""
        self._open()
        if "crc32c" not in self._small:
            return self._read(i, None, True, True)
        return self._read(i, view, clip, t5)

    def _read(self, i: int, view: int | None, clip: bool, t5: bool) -> dict:
        key = self.shard.key(i) if 0 <= i < self.shard.n_samples else "?"
        self._open()
        try:
            sm = self._small
            co, mo, c1, t1 = (
                sm["caption_offsets"],
                sm["moments_offsets"],
                sm["clip_row_offsets"],
                sm["t5_row_offsets"],
            )
            bucket = sm["bucket"][i]
            shape = self.spec.latent_shape(bucket)
            m0, m1 = int(mo[i]), int(mo[i + 1])
            if view is not None:
                per_view = (m1 - m0) // shape[0]
                m0, m1 = m0 + view * per_view, m0 + (view + 1) * per_view
            reads = [("moments", slice(m0, m1))]
            if clip:
                reads.append(("clip_rows", slice(c1[i], c1[i + 1])))
            if t5:
                reads.append(("t5_rows", slice(t1[i], t1[i + 1])))
            got = dict(zip([n for n, _ in reads], self._read_big(tuple(reads))))
            caption = sm["caption_utf8"][co[i] : co[i + 1]].tobytes().decode("utf-8")
            out = {
                "key": key,
                "caption": caption,
                "bucket": bucket,
                "image_meta_size": sm["image_meta_size"][i],
                "clip_ids": sm["clip_ids"][i],
                "clip_mask": sm["clip_mask"][i],
                "t5_ids": sm["t5_ids"][i],
                "t5_mask": sm["t5_mask"][i],
                "t5_index": sm["t5_index"][i],
            }
            if "crc32c" in sm:
                out["crc32c"] = sm["crc32c"][i]
            else:
                out["crc32"] = sm["crc32"][i]
            if view is None:
                out["moments"] = got["moments"].reshape(shape)
            else:
                out["view"] = int(view)
                out["moments_view"] = got["moments"].reshape(shape[1:])
            for name in ("clip_rows", "t5_rows"):
                if name in got:
                    out[name] = got[name]
            if self.spec.compression == "zstd" and "t5_rows" in out:
                t5 = out["t5_rows"]  # a decoded chunk's own buffer (writable), or zarr's fresh array
                out["t5_rows"] = undo_xor_delta_rows(t5, self.spec.storage_dtype("t5"), in_place=t5.flags.writeable)
        except CorruptSampleError:
            raise
        except Exception as e:
            raise CorruptSampleError(
                f"shard {self.path}: sample {key!r} (#{i}) is unreadable "
                f"({type(e).__name__}: {e}); run `python -m shared.cli verify`"
            ) from e
        return out
