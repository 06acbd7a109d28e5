"""One writer factory and one reader over every shard format (each one object in shared/formats.py).

    w = open_shard_writer(root, "part-000017", spec); w.add(sample); info = w.close()
    write_empty_caption(root, spec, clip_ids=..., ...)          # once per cache
    write_manifest(root, manifest_from_shards(root, spec, ...))  # last
    cache = open_cache(root)                                     # CacheReader
    cache[i], cache["key"], len(cache), cache.keys(), cache.meta, cache.summary(), cache.filter(bucket=(H, W)),
    cache.decode(i, vae_path=...), cache.stream(...)
Sample order: manifest shard order, then order inside the shard. Both formats return bit-identical samples.
summary / decode / grid (for people) and the synthetic-cache writer live in shared/inspection.py.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import safetensors
from safetensors import SafetensorError

from .formats import shard_format
from .fsutil import atomic_write_bytes, file_sha256
from .manifest import (
    EMPTY_CAPTION_NAME,
    LEGACY_INDEX_FIX,
    LegacyIndexError,
    Manifest,
    ShardInfo,
    read_manifest,
    read_shard_info,
    shard_data_path,
)
from .schema import (
    STORAGE_DTYPE,
    CacheSpec,
    _float_array,
    _int_array,
    _mask_array,
    check_read_parts,
    check_stored,
    decode_sample,
    to_torch,
)
from .shard_index import ShardIndex, key_hash, key_hashes
from .shard_writer import ShardWriterBase
from .storage import is_remote

if TYPE_CHECKING:
    from .inspection import CacheSummary  # for the annotation only: shared.inspection imports this module


def open_shard_writer(root: str | Path, shard_name: str, spec: CacheSpec, overwrite: bool = False) -> ShardWriterBase:
    """A writer for one shard in spec.format; exactly one writer may own a shard name at a time."""
    return shard_format(spec.format).writer(root, shard_name, spec, overwrite=overwrite)


def _open_shard_reader(root: Path, spec: CacheSpec, shard: ShardIndex):
    return shard_format(spec.format).reader(shard_data_path(root, shard.name, spec.format), spec, shard)


# ---------------------------------------------------------------------------------------------------------------
# empty caption ("" through both text encoders), for train-time CFG text dropout

_ST_DTYPES = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I32": np.dtype("<i4"),
    "I64": np.dtype("<i8"),
    "BOOL": np.dtype("bool"),
    "U8": np.dtype("u1"),
    "I16": np.dtype("<i2"),
}
_EMPTY_FIELDS = ("clip_ids", "clip_mask", "clip_states", "t5_ids", "t5_mask", "t5_states")


def write_empty_caption(root: str | Path, spec: CacheSpec, **arrays: Any) -> str:
    """Save the BERT and mT5 encodings of "" (clip_ids, clip_mask, clip_states, t5_ids, t5_mask, t5_states; a
    leading batch dim of 1 is dropped) to empty_caption.safetensors, dense and in the encoder dtypes. Returns sha256."""
    import torch  # heavy: only stage 1 and tests write the file; readers, verify and inspect stay torch-free
    from safetensors.torch import save  # imports torch: lazy with it

    missing = [f for f in _EMPTY_FIELDS if f not in arrays]
    if missing:
        raise ValueError(f"write_empty_caption needs {list(_EMPTY_FIELDS)}; missing {missing}")
    key = "empty caption"
    out = {}
    for enc, L, D in (("clip", spec.clip_len, spec.clip_dim), ("t5", spec.t5_len, spec.t5_dim)):
        ids, mask, st = (arrays[f"{enc}_{n}"] for n in ("ids", "mask", "states"))
        squeeze = lambda x: x[0] if getattr(x, "ndim", 0) and x.shape[0] == 1 and len(x.shape) in (2, 3) else x  # noqa
        ids, mask, st = squeeze(ids), squeeze(mask), squeeze(st)
        out[f"{enc}_ids"] = torch.from_numpy(_int_array(ids, (L,), f"{enc}_ids", key))
        out[f"{enc}_mask"] = torch.from_numpy(_mask_array(mask, L, f"{enc}_mask", key))
        dt = getattr(spec, f"{enc}_dtype")
        st = _float_array(st, dt, f"{enc}_states", key)
        if st.shape != (L, D):
            raise ValueError(f"{enc}_states of the empty caption has shape {st.shape}, expected ({L}, {D})")
        t = torch.from_numpy(np.ascontiguousarray(st))
        out[f"{enc}_states"] = t.view(torch.int16).view(torch.bfloat16) if dt == "bfloat16" else t
    # One metadata key: safetensors keeps metadata in a hash map, so two keys come out in a random order and the
    # file (whose sha256 the manifest records) would differ between identical runs.
    data = save(out, metadata={"empty_caption": json.dumps({"caption": "", "spec": spec.to_dict()}, sort_keys=True)})
    path = Path(root) / EMPTY_CAPTION_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)
    return file_sha256(path)


def read_empty_caption(root: str | Path, spec: CacheSpec | None = None) -> dict[str, np.ndarray]:
    """The empty-caption encodings as numpy (bf16 as uint16 bit patterns, like samples); see to_torch().

    The safetensors library parses and checks the container (header, offsets, coverage); the raw little-endian
    bytes are viewed with numpy here, since safetensors.numpy has no bfloat16 and verify/inspect need no torch.
    """
    path = Path(root) / EMPTY_CAPTION_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: stage 1 must encode the empty caption for CFG text dropout")
    try:
        out = {
            name: np.frombuffer(t["data"], dtype=_ST_DTYPES[t["dtype"]]).reshape(t["shape"])
            for name, t in safetensors.deserialize(path.read_bytes())
        }
    except (SafetensorError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e})") from e
    if spec is not None:
        for enc, L, D in (("clip", spec.clip_len, spec.clip_dim), ("t5", spec.t5_len, spec.t5_dim)):
            st = out[f"{enc}_states"]
            want = STORAGE_DTYPE[getattr(spec, f"{enc}_dtype")]
            if st.shape != (L, D) or st.dtype != want:
                raise ValueError(f"{path}: {enc}_states is {st.shape} {st.dtype}, the manifest says ({L}, {D}) {want}")
    return out


# ---------------------------------------------------------------------------------------------------------------
# reading


# Shards whose index mapping and data file a process keeps open at once: bounded so that 10^5 shards never exhaust
# file descriptors or vm.max_map_count, least recently used first out. A zarr shard reader holds its small arrays
# (ids, masks, offsets: ~2 KB per sample) in memory and reopening one costs a whole-shard read of them, so with random
# access any bound would thrash; zarr keeps every shard it touched open, as before. (Its big arrays are read through
# their stored chunk offsets and hold no file open; the small ones would need per-sample offsets of their own.)
_OPEN_SHARDS = {"webdataset": 1024, "zarr": None}


def group_by_bucket(buckets: Any) -> tuple[np.ndarray, list[np.ndarray]]:
    """((K, 2) distinct buckets in (H, W) order, [positions of bucket k, ascending]) for an (N, 2) bucket array.

    O(N) numpy, no per-sample Python objects and no N-element sort: buckets sit on a grid (multiples of some step),
    so a bincount over grid cells finds the distinct ones already in (H, W) order, a lookup table maps every sample
    to its bucket number (a small integer), and a stable argsort of those small integers (numpy's radix sort) lists
    each bucket's positions in input order. Falls back to np.unique when the grid is too sparse.
    """
    b = np.asarray(buckets).reshape(-1, 2)
    n = b.shape[0]
    if n == 0:
        return np.zeros((0, 2), dtype=np.int64), []
    h, w = b[:, 0].astype(np.int64), b[:, 1].astype(np.int64)  # contiguous: reductions over (N, 2) columns crawl
    lo = np.array([h.min(), w.min()])
    if lo.min() < 0 or max(h.max(), w.max()) >= 1 << 31:
        raise ValueError(f"bucket sizes must lie in [0, 2**31), got {lo.min()}..{max(h.max(), w.max())}")
    h -= lo[0]
    w -= lo[1]
    step = int(np.gcd.reduce(np.concatenate([np.gcd.reduce(h, keepdims=True), np.gcd.reduce(w, keepdims=True)]))) or 1
    if step > 1:
        h //= step
        w //= step
    width = int(w.max()) + 1
    cells = (int(h.max()) + 1) * width
    if cells <= 1 << 22:
        codes = h
        codes *= width
        codes += w  # in place: codes is h's buffer
        del w
        counts = np.bincount(codes, minlength=cells)
        present = np.flatnonzero(counts)
        table = np.stack([present // width * step + lo[0], present % width * step + lo[1]], axis=1)
        lut = np.zeros(cells, dtype=np.int16 if present.size < 1 << 15 else np.int64)
        lut[present] = np.arange(present.size)
        inv = lut[codes]
        del codes, lut
        sizes = counts[present]
    else:  # a sparse grid (odd sizes): sort instead
        codes = (b[:, 0].astype(np.int64) << 32) | b[:, 1].astype(np.int64)
        uniq, first, inv, sizes = np.unique(codes, return_index=True, return_inverse=True, return_counts=True)
        table = b[first].astype(np.int64)
    order = np.argsort(inv, kind="stable")  # stable: positions stay in input order inside each bucket
    dt = np.int32 if n < 1 << 31 else np.int64
    order = order.astype(dt, copy=False)
    return table.astype(np.int64), np.split(order, np.cumsum(sizes)[:-1])


class CacheReader:
    """Map-style reader over every shard listed in the manifest (and nothing else).

    Per-sample facts (keys, buckets, token lengths, member offsets) stay in the shards' columnar index files
    (shared.shard_index): each shard's file is mapped on first use in each process, so ranks and DataLoader workers
    share its pages, and cache-wide columns (`buckets()`, `meta`) are built on demand with numpy. What lives in
    steady state is per shard (a ShardIndex and a cumulative count), never per sample. Picklable and small: files
    open lazily in each process (DataLoader workers). Views (`filter`) hold a sorted array of global positions.
    """

    def __init__(
        self,
        root: str | Path,
        vae: Any = None,
        *,
        _parent: CacheReader | None = None,
        _indices: np.ndarray | None = None,
    ) -> None:
        self.root = Path(root)
        self._vae = vae
        if _parent is None:
            self.manifest: Manifest = read_manifest(self.root)
            self.spec: CacheSpec = self.manifest.spec
            legacy = [e["name"] for e in self.manifest.shards if not e.get("index_sha256")]
            if legacy:
                raise LegacyIndexError(
                    f"cache {self.root}: shard {legacy[0]!r} and {len(legacy) - 1} more have no "
                    f"columnar index: {LEGACY_INDEX_FIX}"
                )
            self.infos: list[ShardInfo] = []
            for entry in self.manifest.shards:
                info = read_shard_info(self.root, entry["name"])
                if info.entry() != {k: entry.get(k) for k in info.entry()}:
                    raise ValueError(
                        f"shard {entry['name']!r}: its index disagrees with manifest.json "
                        "(rewritten after the manifest?); run `python -m shared.cli verify`"
                    )
                self.infos.append(info)
            self.shards: list[ShardIndex] = [ShardIndex(self.root, i) for i in self.infos]
            self._starts = np.zeros(len(self.shards) + 1, dtype=np.int64)  # global position of each shard's first
            np.cumsum([s.n_samples for s in self.shards], out=self._starts[1:])
            self._idx: np.ndarray | None = None  # None: every sample, in cache order
        else:
            self.manifest, self.spec, self.infos = _parent.manifest, _parent.spec, _parent.infos
            self.shards, self._starts = _parent.shards, _parent._starts
            self._idx = np.asarray(_indices, dtype=np.int64)
            self._source = _parent._source
            if hasattr(_parent, "url"):
                self.url = _parent.url
        if _parent is None:
            self._source = None  # a RemoteCacheMirror when the cache lives on object storage (see open_cache)
        self._local_state()

    def _local_state(self) -> None:
        """What each process builds for itself on demand and never pickles."""
        self._cols: dict[str, np.ndarray] = {}  # cache-wide columns (8 bytes per sample for buckets)
        self._readers: dict[int, Any] = {}  # open shard readers, least recently used first
        self._key_lookup: tuple[np.ndarray, np.ndarray] | None = None

    def _fetch(self, s: int, ahead: Sequence[int] = (), follow: bool = False) -> Any:
        """Remote caches: make shard s's data local (whole object, bounded LRU cache) and prefetch `ahead`.
        `follow` (a sequential reader of a one-file format): returns a file object that reads s's data while it
        downloads (RemoteCacheMirror.follow) when it is not local yet; otherwise None, and the data is local."""
        if self._source is None:
            return None
        # this shard first, alone: it is what the reader waits for (a prefetch started at the same time would
        # halve its bandwidth); the next ones then download while this one is read
        name = self.infos[s].name
        f = self._source.follow(name) if follow else None
        if f is None:
            self._source.ensure(name)
        if ahead:
            self._source.prefetch([self.infos[a].name for a in ahead])  # queued after s in the same thread
        return f

    def __getstate__(self) -> dict:
        d = dict(self.__dict__)
        for k in ("_cols", "_readers", "_key_lookup"):
            d.pop(k, None)
        if not isinstance(d.get("_vae"), (str, Path, type(None))):
            d["_vae"] = None  # never ship a loaded VAE to DataLoader workers
        return d

    def __setstate__(self, d: dict) -> None:
        self.__dict__.update(d)
        self._local_state()

    # -- positions ----------------------------------------------------------------------------------------------
    @property
    def n_total(self) -> int:
        """Samples in the whole cache (not only this view)."""
        return int(self._starts[-1])

    def _view(self) -> np.ndarray:
        return np.arange(self.n_total, dtype=np.int64) if self._idx is None else self._idx

    def locate(self, g: int | np.ndarray) -> tuple[Any, Any]:
        """Global position(s) -> (shard number, position inside that shard)."""
        s = np.searchsorted(self._starts, g, side="right") - 1
        return s, g - self._starts[s]

    def _column(self, name: str, cache: bool = False) -> np.ndarray:
        """A cache-wide column (all samples, cache order), concatenated from the shards' index files."""
        if name in self._cols:
            return self._cols[name]
        parts = [sh.column(name) for sh in self.shards]
        shape = (0, 2) if name == "bucket" else (0,)
        out = np.concatenate(parts) if parts else np.zeros(shape, dtype=np.int64)
        if cache:
            self._cols[name] = out
        return out

    def _view_column(self, name: str, cache: bool = False) -> np.ndarray:
        col = self._column(name, cache)
        return col if self._idx is None else col[self._idx]

    # -- map-style access -------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.n_total if self._idx is None else int(self._idx.size)

    def _key_at(self, s: int, loc: int) -> str:
        """Key of one sample; a shard mapped only for this is let go again (no reader holds it in the LRU)."""
        k = self.shards[s].key(loc)
        if s not in self._readers:
            self.shards[s].release()
        return k

    def _find_key(self, key: str) -> int | None:
        """Global position of a key: binary search over the sorted 64-bit key hashes (built once per process, 16
        bytes per sample), then an exact comparison, so a hash collision can never return the wrong sample."""
        if self._key_lookup is None:
            h = self._column("key_hash")
            order = np.argsort(h, kind="stable")
            self._key_lookup = (h[order], order)
        sorted_h, order = self._key_lookup
        kh = np.uint64(key_hash(key))
        lo, hi = np.searchsorted(sorted_h, kh, side="left"), np.searchsorted(sorted_h, kh, side="right")
        for j in range(int(lo), int(hi)):
            g = int(order[j])
            s, loc = self.locate(g)
            if self._key_at(int(s), int(loc)) == key:
                return g
        return None

    def _global(self, i: int | str) -> int:
        if isinstance(i, str):
            g = self._find_key(i)
            if g is not None and self._idx is not None:
                p = int(np.searchsorted(self._idx, g))
                g = g if p < self._idx.size and int(self._idx[p]) == g else None
            if g is None:
                raise KeyError(f"no sample with key {i!r} in this cache view")
            return g
        n = len(self)
        i = int(i)
        if not -n <= i < n:
            raise IndexError(f"sample index {i} out of range for {n} samples")
        if self._idx is None:
            return i % n if i < 0 else i
        return int(self._idx[i])

    def _reader(self, s: int):
        """The open reader of shard s (opened on first use in this process; the least recently used ones close)."""
        rd = self._readers.pop(s, None)
        if rd is None:
            rd = _open_shard_reader(self.root, self.spec, self.shards[s])
            limit = _OPEN_SHARDS.get(self.spec.format)
            while limit is not None and len(self._readers) >= limit:
                old = next(iter(self._readers))
                closing = self._readers.pop(old)
                getattr(closing, "close", lambda: None)()
                self.shards[old].release()
        self._readers[s] = rd  # most recently used last
        return rd

    def origin(self, i: int | str) -> tuple[str, str]:
        """(shard name, key) of sample i, from its shard's index file (the shard itself is not opened)."""
        s, loc = self.locate(self._global(i))
        return self.shards[int(s)].name, self.shards[int(s)].key(int(loc))

    def bucket_of(self, i: int | str) -> tuple[int, int]:
        """(H, W) bucket of sample i, from its shard's index file."""
        s, loc = self.locate(self._global(i))
        h, w = self.shards[int(s)].mapped.columns["bucket"][int(loc)].tolist()
        return int(h), int(w)

    def read_stored(self, i: int | str) -> dict:
        s, loc = self.locate(self._global(i))
        self._fetch(int(s))
        rd = self._reader(int(s))
        stored = rd.read_stored(int(loc))
        check_stored(stored, self.spec, f"shard {rd.path}")
        return stored

    def read_parts(self, i: int | str, view: int, clip: bool = True, t5: bool = True) -> dict:
        """What a training read needs of sample i, checked: the head (key, caption, bucket, image_meta_size, ids,
        masks, t5_index), "moments_view" (2C, h, w) of `view` and "view", clip_rows / t5_rows if `clip` / `t5`.
        Only those parts are read, decoded and crc-checked (sample layout 2); a shard of layout 1 has one checksum
        over the whole sample, so it is read and checked whole, then cut down to the same dict."""
        s, loc = self.locate(self._global(i))
        self._fetch(int(s))
        rd = self._reader(int(s))
        where = f"shard {rd.path}"
        parts = rd.read_parts(int(loc), int(view), bool(clip), bool(t5))
        if "crc32c" in parts and "moments_view" in parts:
            check_read_parts(parts, self.spec, where)
            return parts
        check_stored(parts, self.spec, where)
        out = {k: v for k, v in parts.items() if k != "moments"}
        out["moments_view"], out["view"] = parts["moments"][int(view)], int(view)
        for name, want in (("clip_rows", clip), ("t5_rows", t5)):
            if not want:
                del out[name]
        return out

    def __getitem__(self, i: int | str) -> dict:
        """Logical sample (numpy; bf16 as uint16 bit patterns; `to_torch` views them back)."""
        return decode_sample(self.read_stored(i), self.spec)

    def __iter__(self) -> Iterator[dict]:
        for i in range(len(self)):
            yield self[i]

    def key(self, i: int) -> str:
        s, loc = self.locate(self._global(i))
        return self._key_at(int(s), int(loc))

    def keys(self) -> list[str]:
        """Every key of this view, in order (a list: for people and tests, not for the training loop)."""
        if self._idx is None:
            return [k for sh in self.shards for k in sh.keys()]
        s, loc = self.locate(self._idx)
        out, keys_of = [], {}
        for a, b in zip(s.tolist(), loc.tolist()):  # one shard's key list at a time, read without mapping
            if a not in keys_of:
                keys_of = {a: self.shards[a].keys()}
            out.append(keys_of[a][b])
        return out

    def buckets(self) -> np.ndarray:
        """(len(self), 2) int32 (H, W) of this view's samples, read from the index files now (8 bytes per sample,
        not kept: the plan keeps what it needs)."""
        return self._view_column("bucket")

    @property
    def meta(self) -> dict[str, np.ndarray]:
        """Per-sample metadata columns for this view, built now (no big array is read): key, bucket, clip_len,
        t5_len, shard."""
        out = {"key": np.asarray(self.keys(), dtype=str), "bucket": self.buckets()}
        for name in ("clip_len", "t5_len", "t5_unique"):
            out[name] = self._view_column(name)
        out["shard"] = self.locate(self._view())[0].astype(np.int32)
        return out

    def bucket_indices(self) -> dict[tuple[int, int], np.ndarray]:
        """{(H, W): positions in this view}, for bucket-pure batch samplers."""
        uniq, members = group_by_bucket(self.buckets())
        return {(int(h), int(w)): m for (h, w), m in zip(uniq.tolist(), members)}

    def filter(self, bucket: tuple[int, int] | None = None, keys: Sequence[str] | None = None) -> CacheReader:
        """A view with only the samples of one bucket (H, W) and/or the given keys (in cache order)."""
        sel = np.ones(len(self), dtype=bool)
        if bucket is not None:
            h, w = (int(x) for x in bucket)
            b = self.buckets()
            sel &= (b[:, 0] == h) & (b[:, 1] == w)
        if keys is not None:
            want = set(keys)
            sel &= np.isin(self._view_column("key_hash"), key_hashes(list(want)))
            view = self._view()
            for p in np.flatnonzero(sel).tolist():  # only the hash matches: an exact check guards collisions
                s, loc = self.locate(int(view[p]))
                if self._key_at(int(s), int(loc)) not in want:
                    sel[p] = False
        return CacheReader(self.root, self._vae, _parent=self, _indices=self._view()[sel])

    def to_torch(self, sample: dict) -> dict:
        return to_torch(sample, self.spec)

    def empty_caption(self) -> dict[str, np.ndarray]:
        return read_empty_caption(self.root, self.spec)

    # -- streaming ------------------------------------------------------------------------------------------
    def stream(
        self, shuffle_shards: bool = False, seed: int = 0, rank: int | None = None, world_size: int | None = None
    ) -> CacheStream:  # noqa: F821 (built on first use)
        """Iterable over whole shards, split by rank then DataLoader worker; a webdataset shard is read
        sequentially (one pass over the tar). Yields the same logical samples as cache[i]."""
        return _stream_class()(self, shuffle_shards=shuffle_shards, seed=seed, rank=rank, world_size=world_size)

    # -- people -----------------------------------------------------------------------------------------------
    # -- people (shared/inspection.py) -------------------------------------------------------------------------
    def summary(self) -> CacheSummary:
        from .inspection import summarize  # shared.inspection imports this module: bound at call time

        return summarize(self)

    def decode(self, i: int | str, vae_path: str | Path | None = None, view: str = "plain"):
        """Decode sample i's posterior mean through the VAE decoder into a PIL image (shared.inspection)."""
        from .inspection import decode_image  # import cycle, as in summary()

        return decode_image(self, i, vae_path=vae_path, view=view)

    def grid(self, indices: Sequence[int], vae_path: str | Path | None = None, cell: int = 256, cols: int = 4):
        """A PIL grid of decoded samples with (the start of) their captions below each (shared.inspection)."""
        from .inspection import decode_grid  # import cycle, as in summary()

        return decode_grid(self, indices, vae_path=vae_path, cell=cell, cols=cols)

    def __repr__(self) -> str:
        return f"CacheReader({str(self.root)!r}, {len(self)} samples, {self.spec.format})"


class _CacheStreamBase:
    """Shards split by (rank, worker); samples within a shard in file order. (`CacheStream` adds torch's
    IterableDataset base; it is built on first use so that `import shared.cache` does not import torch.)"""

    def __init__(
        self,
        reader: CacheReader,
        shuffle_shards: bool = False,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        self.reader, self.shuffle_shards, self.seed = reader, shuffle_shards, seed
        self.rank = int(os.environ.get("RANK", 0)) if rank is None else rank
        self.world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def shard_plan(self) -> list[int]:
        r = self.reader
        shards = np.unique(r.locate(r._view())[0]).tolist()
        if self.shuffle_shards:
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(shards)
        import torch.utils.data  # lazy: `import shared.cache` stays torch-free (verify, inspect, the Ray driver)

        wi = torch.utils.data.get_worker_info()
        nw, w = (wi.num_workers, wi.id) if wi is not None else (1, 0)
        slot, nslots = self.rank * nw + w, self.world_size * nw
        return shards[slot::nslots]

    def __iter__(self) -> Iterator[dict]:
        r = self.reader
        plan = list(self.shard_plan())
        ahead = r._source.cfg.prefetch_shards if r._source is not None else 0
        fmt = shard_format(r.spec.format)
        for pos, s in enumerate(plan):
            # a remote shard not local yet is read while it downloads (a cold worker's first shard, or one the
            # prefetch has not finished): the same bytes, in the same order, as the file they become
            data = r._fetch(s, plan[pos + 1 : pos + 1 + ahead], follow=fmt.streams_file)
            sh, rd = r.shards[s], r._reader(s)
            first = int(r._starts[s])
            in_view = None
            if r._idx is not None:  # this shard's positions in the view, as a set (one shard's worth)
                lo, hi = np.searchsorted(r._idx, [first, first + sh.n_samples])
                in_view = set((r._idx[lo:hi] - first).tolist())
            try:
                for j, stored in enumerate(fmt.iter_stored(rd, r.spec, sh.keys(), data)):
                    if in_view is not None and j not in in_view:
                        continue
                    check_stored(stored, r.spec, f"shard {rd.path}")
                    yield decode_sample(stored, r.spec)
            finally:
                if data is not None:
                    data.close()


def _stream_class() -> type:
    cls = globals().get("CacheStream")
    if cls is None:
        import torch.utils.data  # lazy: as in shard_plan

        cls = type("CacheStream", (_CacheStreamBase, torch.utils.data.IterableDataset), {"__module__": __name__})
        globals()["CacheStream"] = cls
    return cls


def __getattr__(name: str) -> Any:  # `from shared.cache import CacheStream` and unpickling in spawned workers
    if name == "CacheStream":
        return _stream_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def open_cache(path: str | Path, vae: Any = None, storage: Any = None) -> CacheReader:
    """Open a complete cache (manifest.json present). `vae`: an AutoencoderKL or its folder, for decode().

    `path` may be an object-storage URL (s3://bucket/prefix): the small files are mirrored locally and shard data
    is fetched whole, on first use, into a bounded local shard cache (`storage`: a shared.storage.StorageConfig)."""
    if is_remote(path):
        from .remote_cache import RemoteCacheMirror  # object storage only: local caches never load its client

        mirror = RemoteCacheMirror(str(path), storage)
        reader = CacheReader(mirror.prepare(), vae=vae)
        reader._source = mirror
        reader.url = mirror.url
        return reader
    return CacheReader(path, vae=vae)
