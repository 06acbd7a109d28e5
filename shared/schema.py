"""The cache schema: CacheSpec, the logical sample, and its compact stored form.

Logical sample (what writers take and readers return; numpy arrays, bf16 as uint16 bit patterns):
    key, caption                       str
    bucket (2,) int32                  (H, W) pixels
    image_meta_size (6,) int32         (orig_W, orig_H, target_W, target_H, crop_left, crop_top)
    moments (V, 2C, H/ds, W/ds)        VAE posterior [mean, logvar], one set per view, VAE dtype
    clip_ids (Lc,) int32, clip_mask (Lc,) bool, clip_states (Lc, Dc) clip dtype
    t5_ids (Lt,) int32,   t5_mask (Lt,) bool,   t5_states (Lt, Dt) t5 dtype

Stored form (identical in both formats, so both return bit-identical samples):
    clip_rows (n_valid, Dc)  only the masked-in BERT rows. Padded rows are dropped (they come back as zeros):
                             the DiT replaces every padded text position by its learned text_embedding_padding
                             before anything reads it, so their values never reach the model.
    t5_rows (U, Dt) + t5_index (Lt,) uint16
                             ALL Lt mT5 rows, deduplicated bit-exactly. Padded rows must be kept: the original
                             AttentionPool averages and attends over all 256 positions without a mask, and a padded
                             row's hidden state depends on the caption through attention. Many padded rows are
                             bit-identical (same token, same relative-position buckets), hence the dedup.
    crc32c (3 + V,) uint32   sample layout 2 (what writers produce, SAMPLE_LAYOUT): one CRC-32C per part of the
                             sample (CHECK_PARTS: the head = key, caption and the small arrays; clip_rows; t5_rows;
                             each view's moments), so a reader that needs one view and maybe no text checks and
                             decodes only those parts (stage 2's loader: `part_crcs`, `check_parts`). CRC-32C runs in
                             hardware (google-crc32c: ~0.07 ms per MB against zlib.crc32's ~0.4).
    crc32                    sample layout 1 (caches written before): zlib.crc32 over key, caption and every stored
                             array's bytes. Still read and checked; which layout a shard holds is the shard's own
                             record (the webdataset index's member fields, the zarr group's arrays).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import re
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

SCHEMA_VERSION = 1
# The stored sample's integrity layout that writers produce: 2 = one CRC-32C per part (CHECK_PARTS), 1 = one zlib
# crc32 over the whole sample (read, never written, except by tests that build an old cache).
SAMPLE_LAYOUT = 2
FORMATS = ("zarr", "webdataset")
DTYPES = ("float32", "float16", "bfloat16")
VIEWS = ("plain", "flip")
COMPRESSIONS = ("none", "zstd")

# numpy storage dtype for each encoder dtype; zarr and .npy have no bf16, so it travels as its uint16 bit pattern.
STORAGE_DTYPE = {"float32": np.dtype("float32"), "float16": np.dtype("float16"), "bfloat16": np.dtype("uint16")}

# Stored arrays, in the order the crc walks them. (name, dtype or None = the spec's float dtype for that encoder)
STORED_ARRAYS = (
    "bucket",
    "image_meta_size",
    "moments",
    "clip_ids",
    "clip_mask",
    "clip_rows",
    "t5_ids",
    "t5_mask",
    "t5_rows",
    "t5_index",
)
LOGICAL_ARRAYS = (
    "bucket",
    "image_meta_size",
    "moments",
    "clip_ids",
    "clip_mask",
    "clip_states",
    "t5_ids",
    "t5_mask",
    "t5_states",
)
LOGICAL_FIELDS = ("key", "caption") + LOGICAL_ARRAYS

_KEY_RE = re.compile(r"^[A-Za-z0-9_\-]+$")
_SHARD_RE = re.compile(r"^[A-Za-z0-9_\-][A-Za-z0-9_\-.]*$")


class CorruptSampleError(ValueError):
    """A stored sample failed its checksum or could not be decoded."""


@dataclass
class PreprocessedImage:
    """One image as the VAE takes it (stage 1's preprocess_image; stage2_train.online encodes the same)."""

    views: np.ndarray  # (V, 3, H, W) float32 in [-1, 1]: "plain" then "flip"
    image_meta_size: np.ndarray  # (6,) int32
    bucket: tuple[int, int]  # (H, W)


@dataclass(frozen=True)
class CacheSpec:
    """Everything a shard writer/reader needs; stored in the manifest so stage 2 can check it."""

    format: str = "webdataset"
    views: tuple[str, ...] = ("plain",)
    clip_len: int = 77
    clip_dim: int = 1024
    t5_len: int = 256
    t5_dim: int = 2048
    latent_channels: int = 4
    downsample: int = 8
    vae_dtype: str = "float32"
    clip_dtype: str = "float32"
    t5_dtype: str = "float16"
    clip_pad_id: int = 0
    t5_pad_id: int = 1
    # Lossless. "zstd": Blosc(zstd, byte shuffle) on every stored array, and mT5 unique rows XOR-delta coded
    # against the previous row first (neighbouring padded rows differ in few bits). bench/cache_size.py measures it.
    compression: str = "zstd"
    zstd_level: int = 3

    def __post_init__(self) -> None:
        object.__setattr__(self, "views", tuple(self.views))
        self.validate()

    def validate(self) -> None:
        def bad(name: str, value: Any, allowed: str) -> ValueError:
            return ValueError(f"CacheSpec.{name}={value!r} is invalid; allowed: {allowed}")

        if self.format not in FORMATS:
            raise bad("format", self.format, " | ".join(FORMATS))
        if (
            not self.views
            or self.views[0] != "plain"
            or len(set(self.views)) != len(self.views)
            or any(v not in VIEWS for v in self.views)
        ):
            raise bad("views", self.views, "('plain',) or ('plain', 'flip')")
        for name in ("clip_len", "clip_dim", "t5_len", "t5_dim", "latent_channels", "downsample"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise bad(name, v, "a positive int")
        if self.t5_len > 65535:
            raise bad("t5_len", self.t5_len, "<= 65535 (the row index is uint16)")
        for name in ("vae_dtype", "clip_dtype", "t5_dtype"):
            if getattr(self, name) not in DTYPES:
                raise bad(name, getattr(self, name), " | ".join(DTYPES))
        if self.compression not in COMPRESSIONS:
            raise bad("compression", self.compression, " | ".join(COMPRESSIONS))
        if not 1 <= int(self.zstd_level) <= 22:
            raise bad("zstd_level", self.zstd_level, "1..22")

    @property
    def n_views(self) -> int:
        return len(self.views)

    def latent_shape(self, bucket: tuple[int, int] | np.ndarray) -> tuple[int, int, int, int]:
        """(V, 2C, H/ds, W/ds) of `moments` for a bucket (H, W) in pixels."""
        h, w = int(bucket[0]), int(bucket[1])
        if h % self.downsample or w % self.downsample or h <= 0 or w <= 0:
            raise ValueError(f"bucket {(h, w)} is not a positive multiple of downsample={self.downsample}")
        return (self.n_views, 2 * self.latent_channels, h // self.downsample, w // self.downsample)

    def storage_dtype(self, encoder: str) -> np.dtype:
        return STORAGE_DTYPE[getattr(self, f"{encoder}_dtype")]

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["views"] = list(self.views)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> CacheSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown CacheSpec fields {unknown}; known: {sorted(known)}")
        d = dict(d)
        if "views" in d:
            d["views"] = tuple(d["views"])
        return cls(**d)


def make_key(source_stem: str, row: int, md5: str) -> str:
    """Stable sample key `{source_stem}-{row:08d}-{md5[:12]}`; never depends on order or worker.

    Dots and other characters that webdataset or file systems treat specially become "_".
    """
    stem = re.sub(r"[^A-Za-z0-9_\-]", "_", str(source_stem)) or "src"
    if not isinstance(row, (int, np.integer)) or row < 0:
        raise ValueError(f"row must be a non-negative int, got {row!r}")
    m = re.sub(r"[^0-9a-fA-F]", "", str(md5))[:12].lower()
    return f"{stem}-{int(row):08d}-{m or '0' * 12}"


def check_key(key: Any) -> str:
    if not isinstance(key, str) or not _KEY_RE.match(key):
        raise ValueError(f"sample key {key!r} is invalid: use letters, digits, '_' and '-' only (see make_key)")
    return key


def check_shard_name(name: Any) -> str:
    if (
        not isinstance(name, str)
        or not _SHARD_RE.match(name)
        or name.startswith(".tmp-")
        or name.endswith((".tar", ".zarr", ".json"))
    ):
        raise ValueError(
            f"shard name {name!r} is invalid: letters, digits, '_', '-', '.', no extension, "
            "not starting with '.' (e.g. 'part-000017')"
        )
    return name


# ---------------------------------------------------------------------------------------------------------------
# logical <-> stored


def _float_array(x: Any, want: str, name: str, key: str) -> np.ndarray:
    """numpy array in the storage dtype for encoder dtype `want`; refuses a silent cast."""
    if hasattr(x, "detach"):  # torch tensor, imported lazily by the caller's world
        import torch

        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:
            if want != "bfloat16":
                raise ValueError(f"{name} of {key} is bfloat16 but the spec says {want}")
            return x.view(torch.int16).numpy().view(np.uint16)
        x = x.numpy()
    x = np.asarray(x)
    if x.dtype.name == "bfloat16":  # ml_dtypes
        x = x.view(np.uint16)
    if want == "bfloat16":
        if x.dtype != np.uint16:
            raise ValueError(
                f"{name} of {key} has dtype {x.dtype}; the spec says bfloat16 "
                "(pass a torch bf16 tensor or its uint16 bit pattern)"
            )
        return x
    if x.dtype != STORAGE_DTYPE[want]:
        raise ValueError(
            f"{name} of {key} has dtype {x.dtype} but the spec says {want}: store what the encoder "
            "computed in, or change the spec"
        )
    return x


class NonFiniteError(ValueError):
    """An encoder output of a sample holds inf/NaN (stage 1 records the sample as a "nonfinite_output" reject)."""

    def __init__(self, key: str, fields: list[str]) -> None:
        self.key, self.fields = key, fields
        super().__init__(f"{', '.join(fields)} of {key} holds inf/NaN (encoder overflow?)")


def _nonfinite(x: np.ndarray, dtype_name: str) -> bool:
    if dtype_name == "bfloat16":
        return bool(np.any((x & 0x7F80) == 0x7F80))
    return not bool(np.isfinite(x).all())


def _int_array(x: Any, shape: tuple, name: str, key: str, dtype=np.int32) -> np.ndarray:
    x = np.asarray(x.cpu().numpy() if hasattr(x, "cpu") else x)
    if x.shape != shape:
        raise ValueError(f"{name} of {key} has shape {x.shape}, expected {shape}")
    if x.dtype == np.bool_ or not np.issubdtype(x.dtype, np.integer):
        raise ValueError(f"{name} of {key} has dtype {x.dtype}, expected an integer array")
    info = np.iinfo(dtype)
    if x.size and (x.min() < info.min or x.max() > info.max):
        raise ValueError(f"{name} of {key} has values outside {np.dtype(dtype).name}")
    return np.ascontiguousarray(x.astype(dtype, copy=False))


def _mask_array(x: Any, n: int, name: str, key: str) -> np.ndarray:
    x = np.asarray(x.cpu().numpy() if hasattr(x, "cpu") else x)
    if x.shape != (n,):
        raise ValueError(f"{name} of {key} has shape {x.shape}, expected ({n},)")
    if x.dtype != np.bool_:
        if not np.isin(x, (0, 1)).all():
            raise ValueError(f"{name} of {key} must hold only 0/1")
        x = x.astype(bool)
    return np.ascontiguousarray(x)


def dedup_rows(states: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bit-exact row dedup: (unique rows in first-seen order, (L,) uint16 index) with rows[index] == states."""
    n, d = states.shape
    raw = np.ascontiguousarray(states).view(np.uint8).reshape(n, -1)
    seen: dict[bytes, int] = {}
    index = np.empty(n, dtype=np.uint16)
    first: list[int] = []
    for i in range(n):
        b = raw[i].tobytes()
        j = seen.get(b)
        if j is None:
            j = seen[b] = len(first)
            first.append(i)
        index[i] = j
    return np.ascontiguousarray(states[first]), index


def xor_delta_rows(rows: np.ndarray) -> np.ndarray:
    """Bit patterns of `rows` with row k replaced by row k XOR row k-1 (lossless; inverse: undo_xor_delta_rows)."""
    u = np.ascontiguousarray(rows).view(f"u{rows.dtype.itemsize}")
    out = u.copy()
    out[1:] ^= u[:-1]
    return out


def undo_xor_delta_rows(coded: np.ndarray, dtype: np.dtype, in_place: bool = False) -> np.ndarray:
    """`in_place`: overwrite `coded` (a reader's freshly decoded, writable rows: no copy)."""
    out = coded if in_place else coded.copy()
    if out.shape[0] > 1:
        # a row loop over 8-byte words (fewer, longer ufunc calls): ufunc.accumulate along axis 0 is ~50x slower
        # here, and indexing rows inside the loop costs as much as the XORs (a 1024^2 sample: 0.31 -> 0.18 ms). The
        # loop is ufunc call overhead more than XOR (~1 us a call, 4 KiB rows): `out` given positionally skips the
        # keyword parsing (~20% of it); fewer, 2-D calls (blocks of rows, then a carry) measured no faster.
        word = 8 if out.shape[1] * out.itemsize % 8 == 0 else out.itemsize
        rows = list(out.reshape(out.shape[0], -1).view(f"u{word}"))
        xor = np.bitwise_xor
        for prev, row in zip(rows, rows[1:]):
            xor(row, prev, row)
    return out.view(dtype)


# Layout-2 check parts, in the order of the stored crc32c array: the head (key, caption and HEAD_ARRAYS), the text
# rows, then one part per view of the moments. Text rows and each view are what a training read may skip.
HEAD_ARRAYS = ("bucket", "image_meta_size", "clip_ids", "clip_mask", "t5_ids", "t5_mask", "t5_index")


def check_parts(spec: CacheSpec) -> tuple[str, ...]:
    return ("head", "clip_rows", "t5_rows") + tuple(f"moments/{v}" for v in spec.views)


def _crc32c(data: Any, crc: int = 0) -> int:
    import google_crc32c  # lazy: only readers and writers of samples need it (a small C extension)

    if isinstance(data, np.ndarray):
        data = np.ascontiguousarray(data).reshape(-1).view(np.uint8)  # the module takes C-contiguous arrays
    return google_crc32c.extend(crc, data) if crc else google_crc32c.value(data)


def head_crc(key: str, caption: str, stored: dict[str, Any]) -> int:
    c = _crc32c(key.encode("utf-8"))
    c = _crc32c(caption.encode("utf-8"), c)
    for name in HEAD_ARRAYS:
        c = _crc32c(np.asarray(stored[name]), c)
    return c


def part_crcs(key: str, caption: str, stored: dict[str, Any]) -> np.ndarray:
    """(3 + V,) uint32 CRC-32C of each check part (see check_parts) of a stored sample."""
    parts = [head_crc(key, caption, stored), _crc32c(stored["clip_rows"]), _crc32c(stored["t5_rows"])]
    parts += [_crc32c(stored["moments"][v]) for v in range(stored["moments"].shape[0])]
    return np.asarray(parts, dtype=np.uint32)


def crc_problem(where: str, key: str, part: str, stored: int, computed: int) -> CorruptSampleError:
    return CorruptSampleError(
        f"{where}: sample {key!r} failed its crc check ({part}: stored {int(stored):#010x}, computed "
        f"{int(computed):#010x}): the shard is corrupt; run `python -m shared.cli verify`"
    )


@contextlib.contextmanager
def writing_layout(layout: int) -> Any:
    """Writers in this block produce sample layout `layout` (1: the caches written before layout 2), for tests and
    benches that need an old cache; not thread-safe, not for stage 1."""
    global SAMPLE_LAYOUT
    if layout not in (1, 2):
        raise ValueError(f"sample layout {layout!r} is not one of 1, 2")
    before, SAMPLE_LAYOUT = SAMPLE_LAYOUT, layout
    try:
        yield
    finally:
        SAMPLE_LAYOUT = before


def sample_crc(key: str, caption: str, stored: dict[str, np.ndarray]) -> int:
    """Sample layout 1's check: zlib.crc32 over key, caption and every stored array (caches written before layout 2)."""
    c = zlib.crc32(key.encode("utf-8"))
    c = zlib.crc32(caption.encode("utf-8"), c)
    for name in STORED_ARRAYS:
        c = zlib.crc32(memoryview(np.ascontiguousarray(stored[name])).cast("B"), c)
    return c & 0xFFFFFFFF


def encode_sample(sample: dict, spec: CacheSpec) -> dict:
    """Validate a logical sample and return its stored form: {"key", "caption", "crc32", <STORED_ARRAYS>}.

    Raises ValueError naming the field and key on any shape/dtype/value problem (stage 1 records it as a reject).
    """
    missing = [f for f in LOGICAL_FIELDS if f not in sample]
    if missing:
        raise ValueError(f"sample {sample.get('key', '?')!r} lacks fields {missing}; required: {list(LOGICAL_FIELDS)}")
    key = check_key(sample["key"])
    caption = sample["caption"]
    if not isinstance(caption, str):
        raise ValueError(f"caption of {key} must be str, got {type(caption).__name__}")
    out: dict[str, Any] = {"key": key, "caption": caption}
    out["bucket"] = _int_array(sample["bucket"], (2,), "bucket", key)
    out["image_meta_size"] = _int_array(sample["image_meta_size"], (6,), "image_meta_size", key)

    mom = _float_array(sample["moments"], spec.vae_dtype, "moments", key)
    want = spec.latent_shape(out["bucket"])
    if mom.ndim == 3 and spec.n_views == 1:
        mom = mom[None]
    if mom.shape != want:
        raise ValueError(
            f"moments of {key} has shape {mom.shape}, expected {want} = (views {list(spec.views)}, "
            f"2*latent_channels, H/{spec.downsample}, W/{spec.downsample}) for bucket "
            f"{tuple(out['bucket'])}"
        )
    out["moments"] = np.ascontiguousarray(mom)

    for enc, L, D in (("clip", spec.clip_len, spec.clip_dim), ("t5", spec.t5_len, spec.t5_dim)):
        out[f"{enc}_ids"] = _int_array(sample[f"{enc}_ids"], (L,), f"{enc}_ids", key)
        out[f"{enc}_mask"] = _mask_array(sample[f"{enc}_mask"], L, f"{enc}_mask", key)
        st = _float_array(sample[f"{enc}_states"], getattr(spec, f"{enc}_dtype"), f"{enc}_states", key)
        if st.shape != (L, D):
            raise ValueError(f"{enc}_states of {key} has shape {st.shape}, expected ({L}, {D})")
        out[f"_{enc}_states"] = st

    clip = out.pop("_clip_states")
    out["clip_rows"] = np.ascontiguousarray(clip[out["clip_mask"]])
    t5 = out.pop("_t5_states")
    out["t5_rows"], out["t5_index"] = dedup_rows(t5)

    bad = [
        name
        for name, enc in (("moments", "vae"), ("clip_rows", "clip"), ("t5_rows", "t5"))
        if _nonfinite(out[name], getattr(spec, f"{enc}_dtype"))
    ]
    if bad:
        raise NonFiniteError(key, bad)
    if SAMPLE_LAYOUT == 1:  # only tests write the old layout (to check that it stays readable)
        out["crc32"] = sample_crc(key, caption, out)
    else:
        out["crc32c"] = part_crcs(key, caption, out)
    return out


@functools.lru_cache(maxsize=1024)
def _expected_shapes(spec: CacheSpec, h: int, w: int) -> tuple[tuple[str, tuple[int, ...] | None, np.dtype], ...]:
    """(name, shape, dtype) of every array a read may return for bucket (h, w), in check order; shape None for the
    text rows (their row count is the sample's). Built once per spec and bucket, not per sample: a dict of eleven
    shapes and dtypes per read was a tenth of the check's time."""
    Lc, Lt = spec.clip_len, spec.t5_len
    latent = spec.latent_shape((h, w))
    i32 = np.dtype(np.int32)
    return (
        ("bucket", (2,), i32),
        ("image_meta_size", (6,), i32),
        ("moments", latent, spec.storage_dtype("vae")),
        ("moments_view", latent[1:], spec.storage_dtype("vae")),
        ("clip_ids", (Lc,), i32),
        ("clip_mask", (Lc,), np.dtype(np.bool_)),
        ("clip_rows", None, spec.storage_dtype("clip")),
        ("t5_ids", (Lt,), i32),
        ("t5_mask", (Lt,), np.dtype(np.bool_)),
        ("t5_rows", None, spec.storage_dtype("t5")),
        ("t5_index", (Lt,), np.dtype(np.uint16)),
    )


_SKIPPABLE = frozenset(("moments", "moments_view", "clip_rows", "t5_rows"))  # the parts a training read skips


def _check_shapes(stored: dict, spec: CacheSpec, where: str) -> None:
    """Shapes and dtypes of the arrays a read returned (a part read lacks some: those are not checked)."""
    key = stored.get("key", "?")
    try:
        bucket = stored["bucket"]
        for name, shape, dt in _expected_shapes(spec, int(bucket[0]), int(bucket[1])):
            if name not in stored and name in _SKIPPABLE:
                continue
            a = stored[name]
            if shape is None:
                n = int(np.count_nonzero(stored["clip_mask"])) if name == "clip_rows" else a.shape[0]
                shape = (n, spec.clip_dim if name == "clip_rows" else spec.t5_dim)
            if a.shape != shape or a.dtype != dt:
                raise CorruptSampleError(
                    f"{where}: sample {key!r}: {name} has shape {a.shape} {a.dtype}, expected {tuple(shape)} {dt}"
                )
        if "t5_rows" in stored and stored["t5_index"].size:
            if int(stored["t5_index"].max()) >= stored["t5_rows"].shape[0]:
                raise CorruptSampleError(f"{where}: sample {key!r}: t5_index points past t5_rows")
    except CorruptSampleError:
        raise
    except (KeyError, ValueError, TypeError) as e:
        raise CorruptSampleError(f"{where}: sample {key!r} is malformed: {e}") from e


def check_stored(stored: dict, spec: CacheSpec, where: str) -> None:
    """Shapes/dtypes of a stored sample read back from disk, and its crc (layout 2: every part's). Raises
    CorruptSampleError."""
    key = stored.get("key", "?")
    if "moments" not in stored:
        raise CorruptSampleError(f"{where}: sample {key!r} is malformed: no moments")
    _check_shapes(stored, spec, where)
    if "crc32c" in stored:  # layout 2: every part
        want = np.asarray(stored["crc32c"]).astype(np.int64).tolist()
        got = part_crcs(stored["key"], stored["caption"], stored).tolist()
        if len(want) != len(got):
            raise CorruptSampleError(f"{where}: sample {key!r} has {len(want)} part checksums, expected {len(got)}")
        for part, w, g in zip(check_parts(spec), want, got):
            if w != g:
                raise crc_problem(where, key, part, w, g)
        return
    crc = sample_crc(stored["key"], stored["caption"], stored)
    if crc != int(stored["crc32"]):
        raise CorruptSampleError(
            f"{where}: sample {key!r} failed its crc32 check "
            f"(stored {int(stored['crc32']):#010x}, "
            f"computed {crc:#010x}): the shard is corrupt; run `python -m shared.cli verify`"
        )


def check_read_parts(parts: dict, spec: CacheSpec, where: str) -> None:
    """A layout-2 part read (a reader's read_parts: the head, "moments_view" of "view", the text rows it asked for):
    shapes/dtypes and the crc of every part it holds. Raises CorruptSampleError."""
    key = parts.get("key", "?")
    _check_shapes(parts, spec, where)
    want = np.asarray(parts["crc32c"]).astype(np.int64)
    if want.shape != (3 + spec.n_views,):
        raise CorruptSampleError(f"{where}: sample {key!r} has {want.size} part checksums, expected {3 + spec.n_views}")
    view = int(parts["view"])
    checks = [("head", 0, None), ("clip_rows", 1, "clip_rows"), ("t5_rows", 2, "t5_rows")]
    checks.append((f"moments/{spec.views[view]}", 3 + view, "moments_view"))
    for part, j, name in checks:
        if name is not None and name not in parts:
            continue
        got = head_crc(parts["key"], parts["caption"], parts) if name is None else _crc32c(parts[name])
        if got != int(want[j]):
            raise crc_problem(where, key, part, int(want[j]), got)


def decode_sample(stored: dict, spec: CacheSpec) -> dict:
    """Stored form -> logical sample (numpy; bf16 fields as uint16 bit patterns)."""
    clip_mask = stored["clip_mask"]
    clip = np.zeros((spec.clip_len, spec.clip_dim), dtype=spec.storage_dtype("clip"))
    clip[clip_mask] = stored["clip_rows"]
    return {
        "key": stored["key"],
        "caption": stored["caption"],
        "bucket": stored["bucket"],
        "image_meta_size": stored["image_meta_size"],
        "moments": stored["moments"],
        "clip_ids": stored["clip_ids"],
        "clip_mask": clip_mask,
        "clip_states": clip,
        "t5_ids": stored["t5_ids"],
        "t5_mask": stored["t5_mask"],
        "t5_states": stored["t5_rows"][stored["t5_index"].astype(np.intp)],
    }


def stored_nbytes(stored: dict) -> dict[str, int]:
    """Raw (uncompressed) stored bytes per field of one sample; strings as UTF-8."""
    out = {"key": len(stored["key"].encode()), "caption": len(stored["caption"].encode())}
    out.update({n: int(stored[n].nbytes) for n in STORED_ARRAYS})
    if "crc32c" in stored:
        out["crc32c"] = int(np.asarray(stored["crc32c"]).nbytes)
    else:
        out["crc32"] = 4
    return out


def to_torch(sample: dict, spec: CacheSpec) -> dict:
    """Logical sample -> torch tensors, bf16 fields viewed back as torch.bfloat16 (bit-exact, no copy)."""
    import torch

    out: dict[str, Any] = {}
    for k, v in sample.items():
        if not isinstance(v, np.ndarray):
            out[k] = v
            continue
        v = np.ascontiguousarray(v)
        if not v.flags.writeable:  # a view of read-only bytes (an uncompressed member): a tensor is writable
            v = v.copy()
        t = torch.from_numpy(v)
        enc = {"moments": "vae", "clip_states": "clip", "t5_states": "t5"}.get(k)
        if enc and getattr(spec, f"{enc}_dtype") == "bfloat16":
            t = t.view(torch.int16).view(torch.bfloat16)
        out[k] = t
    return out


def synthetic_sample(
    spec: CacheSpec,
    key: str,
    bucket: tuple[int, int],
    rng: np.random.Generator,
    caption: str | None = None,
    clip_len: int | None = None,
    t5_len: int | None = None,
    t5_pad_pattern: np.ndarray | None = None,
) -> dict:
    """A random logical sample with the structure of a real one (for tests, benches and demos, not training).

    BERT rows past the mask are zero (as stored); mT5 padded rows repeat in runs like a relative-attention encoder's
    outputs do: `t5_pad_pattern` (Lt - t5_len,) gives, per padded position, which distinct padded row it equals
    (default: runs that lengthen with distance, ~log-spaced like T5's position buckets).
    """
    Lc = int(clip_len if clip_len is not None else rng.integers(2, spec.clip_len + 1))
    Lt = int(t5_len if t5_len is not None else rng.integers(1, spec.t5_len + 1))
    h, w = int(bucket[0]), int(bucket[1])
    V, C2, lh, lw = spec.latent_shape((h, w))

    def floats(shape: tuple, enc: str) -> np.ndarray:
        x = rng.standard_normal(shape, dtype=np.float32)
        if getattr(spec, f"{enc}_dtype") == "bfloat16":
            return (x.view(np.uint32) >> 16).astype(np.uint16)
        return x.astype(spec.storage_dtype(enc))

    clip_mask = np.arange(spec.clip_len) < Lc
    clip = floats((spec.clip_len, spec.clip_dim), "clip")
    clip[~clip_mask] = 0
    t5_mask = np.arange(spec.t5_len) < Lt
    n_pad = spec.t5_len - Lt
    if t5_pad_pattern is None:
        t5_pad_pattern = np.minimum(np.floor(np.log2(np.arange(n_pad) + 1) * 2), 15).astype(np.int64)
    distinct = floats((int(t5_pad_pattern.max()) + 1 if n_pad else 0, spec.t5_dim), "t5")
    t5 = np.concatenate([floats((Lt, spec.t5_dim), "t5"), distinct[t5_pad_pattern[:n_pad]]])
    return {
        "key": key,
        "caption": caption if caption is not None else f"合成样本 {key}",
        "bucket": np.array([h, w], dtype=np.int32),
        "image_meta_size": np.array([w + 17, h + 9, w, h, 3, 5], dtype=np.int32),
        "moments": floats((V, C2, lh, lw), "vae"),
        "clip_ids": np.where(clip_mask, rng.integers(100, 1000, spec.clip_len), spec.clip_pad_id).astype(np.int32),
        "clip_mask": clip_mask,
        "clip_states": clip,
        "t5_ids": np.where(t5_mask, rng.integers(2, 1000, spec.t5_len), spec.t5_pad_id).astype(np.int32),
        "t5_mask": t5_mask,
        "t5_states": t5,
    }
