"""Corpus readers: Arrow IPC (+ IndexKits index JSON), Parquet, image folders, JSONL and CSV lists -> partitions.

`plan_partitions` runs once on the driver: it resolves the inputs, checks every file's schema (a missing column is a
`ValueError` naming the file, the column and the columns that exist) and cuts each source into row ranges.
`read_partition` runs in a Ray task and yields one raw row dict per input row, in row order:

    {"key": "00000-00000042-3f2a9c1b0d4e", "source": "/data/00000.arrow", "row": 42,
     "image": b"...encoded bytes..." | None, "caption": <raw value, any type>, "md5": "3f2a...", "error": None | str,
     "error_reason": None | str}

Nothing here decodes images or judges captions: stage 1's preprocessing does, so that a bad row becomes a recorded
reject instead of vanishing here. `image` is None (and `error` says why, `error_reason` the reject reason) only when
the bytes could not or must not be read, e.g. a list names a missing file. Keys are
`{source_stem}-{row:08d}-{md5[:12]}`: they depend on the input alone, never on the order of partitions or on the worker
that reads them. A JSONL row number counts records (non-blank lines), in the planner and the reader alike, so blank
lines shift nothing.

Image files named by jsonl/csv lists and found in image folders are read only when they are regular files (a FIFO
would block the job, a device would never end) that resolve, symlinks followed, inside the list's folder (folder
corpora: the image folder) or one of `input.allowed_roots`; `input.allow_outside_paths: true` lifts the containment
for trusted lists. A refused file becomes a reject with its reason ("outside_roots", "not_regular_file",
"broken_symlink"), never an encoded sample.

Object storage. Arrow, Parquet, JSONL and CSV inputs may be `s3://bucket/prefix/...` objects (files, prefixes or glob
patterns), read through s3fs with the job's `storage:` section (endpoint, retries; credentials only from the standard
AWS variables, as for the cache). Keys are the same as for the same files on local disk: a stem is the object's file
stem, so a corpus copied to a bucket gives the same cache. Lists on s3:// name images by s3:// URL or by a path
relative to the list's prefix; `input.allowed_roots` may hold s3:// prefixes, and an image URL must lie under the
list's prefix or one of them (normalised, `..` resolved) unless `input.allow_outside_paths`. A missing image object
is a reject ("read_error"); an unreachable server stops the job (after the storage retries) instead of turning
every row into a reject. Image folders and IndexKits indexes are local only.
"""

from __future__ import annotations

import argparse
import csv
import errno
import glob
import hashlib
import io
import json
import logging
import os
import posixpath
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from shared.schema import make_key
from shared.storage import (
    MissingObjectError,
    RemoteStore,
    StorageConfig,
    StorageError,
    is_remote,
    split_url,
)

logger = logging.getLogger(__name__)

InputFormat = Literal["arrow", "parquet", "indexkits", "folder", "jsonl", "csv"]
FORMATS: tuple[str, ...] = ("arrow", "parquet", "indexkits", "folder", "jsonl", "csv")
# What a directory given in `paths` expands to, per format ("folder" takes the directory itself).
_DIR_PATTERNS = {"arrow": "*.arrow", "parquet": "*.parquet", "indexkits": "*.json", "jsonl": "*.jsonl", "csv": "*.csv"}
DEFAULT_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# The original loader falls back to a `binary` column when there is no `image` column (IndexKits indexer.py).
_FALLBACK_IMAGE_COLUMN = "binary"
_MD5_RE = re.compile(r"^[0-9a-fA-F]{32}$")


@dataclass
class InputConfig:
    """Where the corpus is and how to read it (the `input:` section of the encode config)."""

    format: InputFormat = "arrow"
    # Files, directories or glob patterns. A directory means every file of the format in it (`*.arrow`, `*.parquet`,
    # `*.json` for indexkits, ...); for "folder" each directory is one source of images. Not
    # folder / indexkits: s3:// objects, prefixes and patterns too (see the module docstring).
    paths: list[str] = field(default_factory=list)
    # arrow / parquet / indexkits: the encoded image bytes; "binary" is used when "image" is absent, as the original.
    image_column: str = "image"
    # All formats but folder: the caption column / JSON key. The original trains on `text_zh`.
    caption_column: str = "text_zh"
    # Hex md5 of the image bytes, as csv2arrow writes it; computed from the bytes when the column is absent or empty.
    md5_column: str | None = "md5"
    # jsonl / csv: the image path column (csv2arrow's name); relative paths are relative to the list file.
    image_path_column: str = "img_path"
    # folder: a caption sidecar next to each image (`cat.png` -> `cat.txt`); a missing sidecar gives caption None.
    caption_extension: str = ".txt"
    # folder: which files are images.
    image_extensions: list[str] = field(default_factory=lambda: list(DEFAULT_IMAGE_EXTENSIONS))
    # jsonl / csv / folder: folders that image (and caption sidecar) files may resolve into, besides the list's own
    # folder (folder corpora: the image folder). Symlinks are followed before the check.
    # s3:// prefixes admit image URLs below them.
    allowed_roots: list[str] = field(default_factory=list)
    # jsonl / csv / folder: true reads image paths wherever they point (absolute paths, `..`, symlinks out of the
    # folder). Only for lists you trust: a list could otherwise read any file the job can.
    allow_outside_paths: bool = False

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"input.format: {self.format!r} is not a known format; allowed: {', '.join(FORMATS)}")
        if isinstance(self.paths, (str, Path)):
            self.paths = [str(self.paths)]
        self.paths = [str(p) for p in self.paths]
        for name in ("image_column", "caption_column", "image_path_column"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"input.{name}: must be a non-empty string, got {getattr(self, name)!r}")
        if self.md5_column == "":
            self.md5_column = None
        self.image_extensions = [e.lower() if e.startswith(".") else "." + e.lower() for e in self.image_extensions]
        if isinstance(self.allowed_roots, (str, Path)):
            self.allowed_roots = [str(self.allowed_roots)]
        self.allowed_roots = [str(p) for p in self.allowed_roots]
        if not isinstance(self.allow_outside_paths, bool):
            raise ValueError(f"input.allow_outside_paths: must be true or false, got {self.allow_outside_paths!r}")


@dataclass(frozen=True)
class Partition:
    """A contiguous row range [start, stop) of one source: the unit of work of one Ray task and one cache shard."""

    name: str  # shard name: `{source_stem}-{start:08d}`, unique, filesystem-safe (letters, digits, "_", "-")
    source: str  # the file (or image folder) the rows come from
    source_stem: str  # first part of every key of this partition
    start: int
    stop: int
    rows: tuple[int, ...] | None = None  # indexkits: the selected rows (sorted, in [start, stop)); None = all
    files: tuple[str, ...] | None = None  # folder: the image files of rows start..stop-1, relative to `source`
    offset: int = 0  # jsonl: byte offset of row `start` (rows count non-blank lines)
    # jsonl / csv / folder: the resolved folders every file read must stay inside; None = no containment
    # (input.allow_outside_paths, or a format whose rows carry their bytes)
    roots: tuple[str, ...] | None = None

    @property
    def num_rows(self) -> int:
        return len(self.rows) if self.rows is not None else self.stop - self.start


class S3Path:
    """An s3:// object as the planner and readers use a `Path`: name, stem, parent, `/`, open, exists.

    Picklable and cheap: the filesystem is the process's s3fs instance for `storage` (shared.storage). The key is
    normalised (`a/./b/../c` -> `a/c`) so that containment checks compare canonical URLs. Every call that talks to
    the server goes through RemoteStore's retries: a transient error is retried, then a StorageError names the
    object; a missing object is a MissingObjectError naming it.
    """

    def __init__(self, url: str, storage: StorageConfig | None = None) -> None:
        scheme, rest = split_url(url)
        key = posixpath.normpath(rest)
        self.bucket, _, self.key = key.partition("/")
        if self.bucket in ("", ".", ".."):
            raise ValueError(f"{url!r} names no bucket: use s3://BUCKET/KEY")
        self.scheme, self.storage = scheme, storage or StorageConfig()

    def __str__(self) -> str:
        return f"{self.scheme}://{self.bucket}/{self.key}" if self.key else f"{self.scheme}://{self.bucket}"

    def __repr__(self) -> str:
        return f"S3Path({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, S3Path) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def __lt__(self, other: S3Path) -> bool:
        return str(self) < str(other)

    @property
    def store(self) -> RemoteStore:
        return RemoteStore(f"{self.scheme}://{self.bucket}", self.storage)

    @property
    def name(self) -> str:
        return posixpath.basename(self.key)

    @property
    def stem(self) -> str:
        return Path(self.name).stem

    @property
    def suffix(self) -> str:
        return Path(self.name).suffix

    @property
    def parent(self) -> S3Path:
        return S3Path(f"{self.scheme}://{self.bucket}/{posixpath.dirname(self.key)}", self.storage)

    @property
    def parts(self) -> tuple[str, ...]:
        return (self.bucket, *[x for x in self.key.split("/") if x])

    def __truediv__(self, other: str) -> S3Path:
        if is_remote(other):
            return S3Path(other, self.storage)
        return S3Path(f"{self}/{other}", self.storage)

    def _call(self, what: str, fn: Any) -> Any:
        store = self.store
        return store._retry(what, self.key, lambda: fn(store.fs, f"{self.bucket}/{self.key}"))

    def is_dir(self) -> bool:
        return bool(self._call("stat", lambda fs, k: fs.isdir(k)))

    def is_file(self) -> bool:
        return bool(self._call("stat", lambda fs, k: fs.isfile(k)))

    def exists(self) -> bool:
        return bool(self._call("stat", lambda fs, k: fs.exists(k)))

    def glob(self, pattern: str) -> list[S3Path]:
        """Objects (not prefixes) matching `pattern` below this prefix (`**` recursive, as fsspec's glob)."""
        found = self._call("list", lambda fs, k: fs.glob(f"{k.rstrip('/')}/{pattern}", detail=True))
        return sorted(
            S3Path(f"{self.scheme}://{k}", self.storage) for k, info in found.items() if info.get("type") != "directory"
        )

    def read_bytes(self) -> bytes:
        return self.store.read_bytes(self.key)

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def open(
        self, mode: str = "r", newline: str | None = None, encoding: str | None = None, block_size: int = 8 << 20
    ) -> Any:
        """A seekable file over ranged GETs of `block_size` (s3fs's read-ahead buffer); text mode wraps it."""
        fh = self._call("open", lambda fs, k: fs.open(k, "rb", block_size=block_size, cache_type="readahead"))
        if "b" in mode:
            return fh
        return io.TextIOWrapper(fh, encoding=encoding or "utf-8", newline=newline)


def glob_remote(pattern: str, storage: StorageConfig | None) -> list[S3Path]:
    """The objects an s3:// glob pattern (`s3://bucket/corpus/*.arrow`) matches."""
    scheme, rest = split_url(pattern)
    bucket, _, key = rest.partition("/")
    return S3Path(f"{scheme}://{bucket}", storage).glob(key)


def as_source(path: str, storage: StorageConfig | None = None) -> Path | S3Path:
    """A partition's `source` (or a configured path) as the object the readers open."""
    return S3Path(path, storage) if is_remote(path) else Path(path)


# ---------------------------------------------------------------------------------------------------------------------
# Planning


def plan_partitions(cfg: InputConfig, rows_per_shard: int, storage: StorageConfig | None = None) -> list[Partition]:
    """Check the inputs' schemas and cut them into partitions of at most `rows_per_shard` rows, sorted by name.

    `storage` is how s3:// inputs are reached (the job's `storage:` section)."""
    if not isinstance(rows_per_shard, int) or rows_per_shard < 1:
        raise ValueError(f"rows_per_shard must be a positive integer, got {rows_per_shard!r}")
    sources = _expand_paths(cfg, storage)
    if cfg.format == "indexkits":
        selected = _indexkits_selection(sources, cfg)
        stems = _source_stems(list(selected))
        parts = []
        for path, rows in selected.items():
            for i in range(0, len(rows), rows_per_shard):
                chunk = tuple(rows[i : i + rows_per_shard])
                parts.append(_partition(str(path), stems[path], chunk[0], chunk[-1] + 1, rows=chunk))
    else:
        stems = _source_stems(sources)
        extra_roots = _allowed_roots(cfg)
        parts = []
        for path in sources:
            parts.extend(_plan_source(path, stems[path], cfg, rows_per_shard, extra_roots))
    parts.sort(key=lambda p: (p.source_stem, p.start))
    names = [p.name for p in parts]
    if len(set(names)) != len(names):  # only crafted names can get here, e.g. files "a" and "a-00000000"
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"input.paths: sources give the same shard names {dup[:5]}; rename the files")
    if not parts:
        raise ValueError(f"input.paths: {cfg.paths} hold no rows (format {cfg.format!r})")
    return parts


def _partition(source: str, stem: str, start: int, stop: int, **extra: Any) -> Partition:
    return Partition(name=f"{stem}-{start:08d}", source=source, source_stem=stem, start=start, stop=stop, **extra)


def _allowed_roots(cfg: InputConfig) -> tuple[str, ...] | None:
    """input.allowed_roots resolved on the driver (workers may run elsewhere, in another working directory)."""
    if cfg.allow_outside_paths:
        return None
    out = []
    for r in cfg.allowed_roots:
        if is_remote(r):  # a prefix: an object is inside when its normalised URL lies below it
            out.append(str(S3Path(r)))
            continue
        p = Path(r).expanduser()
        if not p.is_dir():
            raise ValueError(f"input.allowed_roots: {r!r} is not a folder")
        out.append(str(p.resolve()))
    return tuple(out)


def _plan_source(
    path: Path | S3Path, stem: str, cfg: InputConfig, rows_per_shard: int, extra_roots: tuple[str, ...] | None
) -> list[Partition]:
    # reads stay under the list's folder (or the image folder itself) and the configured roots
    base = path if cfg.format == "folder" else path.parent
    roots = None if extra_roots is None else (str(base), *extra_roots)
    if cfg.format == "folder":
        files = _list_images(path, cfg)
        return [
            _partition(
                str(path),
                stem,
                s,
                min(s + rows_per_shard, len(files)),
                files=tuple(files[s : s + rows_per_shard]),
                roots=roots,
            )
            for s in range(0, len(files), rows_per_shard)
        ]
    if cfg.format == "jsonl":
        offsets = _jsonl_offsets(path, cfg)
        return [
            _partition(str(path), stem, s, min(s + rows_per_shard, len(offsets)), offset=offsets[s], roots=roots)
            for s in range(0, len(offsets), rows_per_shard)
        ]
    if cfg.format == "arrow":
        n = _arrow_num_rows(path, cfg)
    elif cfg.format == "parquet":
        n = _parquet_num_rows(path, cfg)
    elif cfg.format == "csv":
        n = _csv_num_rows(path, cfg)
    else:  # pragma: no cover - InputConfig validates the format
        raise AssertionError(cfg.format)
    if n == 0:
        logger.warning("%s has no rows", path)
    roots = roots if cfg.format == "csv" else None  # arrow / parquet rows carry their bytes
    return [
        _partition(str(path), stem, s, min(s + rows_per_shard, n), roots=roots) for s in range(0, n, rows_per_shard)
    ]


def _expand_paths(cfg: InputConfig, storage: StorageConfig | None = None) -> list[Path | S3Path]:
    """Files (or image folders) named by `cfg.paths`, resolved, deduplicated and sorted."""
    if not cfg.paths:
        raise ValueError("input.paths: empty; give at least one file, directory or glob pattern")
    out: set[Path | S3Path] = set()
    for entry in cfg.paths:
        if is_remote(entry):
            out.update(_expand_remote(entry, cfg, storage))
            continue
        if any(c in entry for c in "*?["):
            matches = [Path(m) for m in glob.glob(entry, recursive=True)]
        else:
            matches = [Path(entry)]
        if not matches or not matches[0].exists():
            raise ValueError(f"input.paths: {entry!r} matches no file or directory")
        for m in matches:
            if cfg.format == "folder":
                if not m.is_dir():
                    raise ValueError(
                        f"input.paths: {str(m)!r} is not a directory (format 'folder' takes image folders)"
                    )
                out.add(m.resolve())
            elif m.is_dir():
                found = sorted(m.glob(_DIR_PATTERNS[cfg.format]))
                if not found:
                    raise ValueError(
                        f"input.paths: directory {str(m)!r} holds no {_DIR_PATTERNS[cfg.format]} file "
                        f"(format {cfg.format!r})"
                    )
                out.update(f.resolve() for f in found)
            else:
                out.add(m.resolve())
    return sorted(out, key=str)


def _expand_remote(entry: str, cfg: InputConfig, storage: StorageConfig | None) -> list[S3Path]:
    """An s3:// entry of `input.paths`: an object, a prefix (every object of the format directly below it) or a
    glob pattern."""
    if cfg.format in ("folder", "indexkits"):
        raise ValueError(
            f"input.paths: {entry!r}: format {cfg.format!r} reads local files only; on object storage "
            "use arrow, parquet, or a jsonl/csv list of image URLs"
        )
    if any(c in entry for c in "*?["):
        found = glob_remote(entry, storage)
        if not found:
            raise ValueError(f"input.paths: {entry!r} matches no object")
        return found
    p = S3Path(entry, storage)
    if p.is_file():
        return [p]
    if p.is_dir():
        found = p.glob(_DIR_PATTERNS[cfg.format])
        if not found:
            raise ValueError(
                f"input.paths: prefix {entry!r} holds no {_DIR_PATTERNS[cfg.format]} object (format {cfg.format!r})"
            )
        return found
    raise ValueError(f"input.paths: {entry!r} matches no object or prefix")


def _safe(name: str) -> str:
    # no dots: webdataset cuts a key at its first dot
    safe = re.sub(r"[^A-Za-z0-9_-]+", "_", name)
    if safe != name:  # two names that differ only in unsafe characters must not meet
        safe = f"{safe}_{hashlib.sha1(name.encode()).hexdigest()[:6]}"
    return safe or "source"


def _source_stems(paths: list) -> dict:
    """Key prefix per source: the file stem, with as many parent folder names as it takes to be unique.

    Adding a source whose stem is already taken lengthens both stems, so both get new keys (and shard names).
    """

    def stem_at(p: Path, depth: int) -> str:
        parts = list(p.parent.parts[-(depth - 1) :]) if depth > 1 else []
        # s3:// sources are always objects (image folders are local only): no HEAD request per source
        return "_".join(_safe(x) for x in parts + [p.stem if isinstance(p, S3Path) or p.is_file() else p.name])

    stems = {p: stem_at(p, 1) for p in paths}
    depth = 1
    while len(set(stems.values())) < len(stems):
        depth += 1
        counts: dict[str, int] = {}
        for s in stems.values():
            counts[s] = counts.get(s, 0) + 1
        stems = {p: (stem_at(p, depth) if counts[s] > 1 else s) for p, s in stems.items()}
        if depth > 64:  # pragma: no cover - distinct resolved paths always separate in the end
            raise AssertionError(f"cannot give unique stems to {paths}")
    return stems


def _resolve_columns(
    names: list[str], types: dict[str, pa.DataType], cfg: InputConfig, path: Path
) -> tuple[str, str, str | None]:
    """(image, caption, md5 or None) column names of one Arrow/Parquet file; ValueError when the schema won't do."""
    have = ", ".join(f"{n} ({types[n]})" for n in names)
    image = cfg.image_column
    if image not in names:
        if image == "image" and _FALLBACK_IMAGE_COLUMN in names:
            image = _FALLBACK_IMAGE_COLUMN
        else:
            extra = f" (nor {_FALLBACK_IMAGE_COLUMN!r})" if image == "image" else ""
            raise ValueError(
                f"{path}: no image column {cfg.image_column!r}{extra} (input.image_column); columns are: {have}"
            )
    t = types[image]
    if not (pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t)):
        raise ValueError(
            f"{path}: image column {image!r} has type {t}, expected binary (the encoded image file bytes); "
            f"columns are: {have}"
        )
    if cfg.caption_column not in names:
        raise ValueError(
            f"{path}: no caption column {cfg.caption_column!r} (input.caption_column); columns are: {have}"
        )
    md5 = cfg.md5_column if cfg.md5_column in names else None
    return image, cfg.caption_column, md5


def _open_arrow(
    path: Path | S3Path, included_fields: list[int] | None = None, small: bool = False
) -> pa.ipc.RecordBatchFileReader:
    """Local files are memory-mapped (zero copy); an object is read through ranged GETs as batches are asked for,
    in small blocks when only metadata and a small column are wanted (`small`)."""
    # a StorageError opening an object is the server's, not the file's
    source = path.open("rb", block_size=(32 << 10) if small else (8 << 20)) if isinstance(path, S3Path) else None
    options = pa.ipc.IpcReadOptions(included_fields=included_fields) if included_fields else None
    try:
        return pa.ipc.open_file(source if source is not None else pa.memory_map(str(path), "r"), options=options)
    except StorageError:
        raise
    except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(
            f"{path}: not a readable Arrow IPC file (expected the file format written by pa.RecordBatchFileWriter, "
            f"as csv2arrow.py writes): {e}"
        ) from e


def _arrow_batch_rows(path: Path | S3Path, cfg: InputConfig) -> list[int]:
    """Rows per record batch, reading only the caption column's buffers: on object storage the planner (and a task
    skipping to its first batch) must not download the images to count them."""
    reader = _open_arrow(path, small=True)
    schema = reader.schema
    cols = _resolve_columns(schema.names, {f.name: f.type for f in schema}, cfg, path)
    counter = _open_arrow(path, included_fields=[schema.get_field_index(cols[1])], small=True)
    return [counter.get_batch(i).num_rows for i in range(counter.num_record_batches)]


def _arrow_num_rows(path: Path | S3Path, cfg: InputConfig) -> int:
    return sum(_arrow_batch_rows(path, cfg))


def _open_parquet(path: Path | S3Path) -> pq.ParquetFile:
    source = path.open("rb") if isinstance(path, S3Path) else str(path)
    try:
        return pq.ParquetFile(source)
    except StorageError:
        raise
    except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(f"{path}: not a readable Parquet file: {e}") from e


def _parquet_num_rows(path: Path, cfg: InputConfig) -> int:
    pf = _open_parquet(path)
    schema = pf.schema_arrow
    _resolve_columns(schema.names, {f.name: f.type for f in schema}, cfg, path)
    return pf.metadata.num_rows


def _list_images(folder: Path, cfg: InputConfig) -> list[str]:
    """Everything with an image extension that is not a folder: symlinks (broken ones too), FIFOs and devices are
    listed so that the reader records them as rejects instead of skipping them unseen."""
    exts = set(cfg.image_extensions)
    files = sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.suffix.lower() in exts and (p.is_symlink() or not p.is_dir())
    )
    if not files:
        raise ValueError(f"{folder}: no image files (input.image_extensions: {', '.join(cfg.image_extensions)})")
    return files


def _jsonl_offsets(path: Path, cfg: InputConfig) -> list[int]:
    """Byte offset of every record (non-blank line; the row number counts records); the first record is checked."""
    out = []
    offset = 0
    with path.open("rb") as fh:
        for lineno, line in enumerate(fh):
            if line.strip():
                if not out:
                    _check_record_keys(path, line, cfg, lineno)
                out.append(offset)
            offset += len(line)
    return out


def _check_record_keys(path: Path, line: bytes, cfg: InputConfig, lineno: int) -> None:
    try:
        rec = json.loads(line)
    except ValueError as e:
        raise ValueError(f"{path}: line {lineno + 1} is not JSON: {e}") from e
    if not isinstance(rec, dict):
        raise ValueError(f"{path}: line {lineno + 1} is a JSON {type(rec).__name__}, expected an object")
    for col, field_name in ((cfg.image_path_column, "image_path_column"), (cfg.caption_column, "caption_column")):
        if col not in rec:
            raise ValueError(
                f"{path}: no key {col!r} (input.{field_name}) in line {lineno + 1}; keys are: {', '.join(rec)}"
            )


def _csv_num_rows(path: Path, cfg: InputConfig) -> int:
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        for col, field_name in ((cfg.image_path_column, "image_path_column"), (cfg.caption_column, "caption_column")):
            if col not in header:
                raise ValueError(f"{path}: no column {col!r} (input.{field_name}); columns are: {', '.join(header)}")
        return sum(1 for _ in reader)


def _indexkits_selection(index_files: list[Path], cfg: InputConfig) -> dict[Path, list[int]]:
    """arrow file -> sorted unique local rows selected by the union of the index JSONs.

    Repeats in an index (IndexKits `repeat`, multi-resolution padding to whole batches) are a training-time sampling
    matter: the cache stores each row once.
    """
    selected: dict[Path, list[np.ndarray]] = {}
    row_counts: dict[Path, int] = {}
    for index_file in index_files:
        try:
            doc = json.loads(index_file.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{index_file}: not a readable IndexKits index JSON: {e}") from e
        if not isinstance(doc, dict) or "arrow_files" not in doc:
            keys = ", ".join(doc) if isinstance(doc, dict) else type(doc).__name__
            raise ValueError(f"{index_file}: no 'arrow_files' key, not an IndexKits index; keys are: {keys}")
        arrow_files = []
        for name in doc["arrow_files"]:
            p = Path(name)
            if not p.is_absolute():
                p = index_file.parent / p
            if not p.exists():
                raise ValueError(f"{index_file}: arrow file {name!r} listed in 'arrow_files' does not exist")
            arrow_files.append(p.resolve())
        for p in arrow_files:
            if p not in row_counts:
                row_counts[p] = _arrow_num_rows(p, cfg)
        cum = np.cumsum([row_counts[p] for p in arrow_files], dtype=np.int64)
        total = int(cum[-1]) if len(cum) else 0
        if "cum_length" in doc and [int(c) for c in doc["cum_length"]] != cum.tolist():
            raise ValueError(
                f"{index_file}: 'cum_length' {doc['cum_length']} does not match the arrow files' row counts "
                f"{cum.tolist()} (the index is stale; rebuild it with `idk`)"
            )
        indices = np.unique(_index_indices(index_file, doc))  # sorted, repeats dropped
        if len(indices) and (indices[0] < 0 or indices[-1] >= total):
            raise ValueError(
                f"{index_file}: indices range {int(indices[0])}..{int(indices[-1])} is outside the "
                f"{total} rows of its arrow files"
            )
        file_of = np.searchsorted(cum, indices, side="right")
        local = indices - np.concatenate([[0], cum[:-1]])[file_of]
        bounds = np.searchsorted(file_of, np.arange(len(arrow_files) + 1))
        for f, p in enumerate(arrow_files):
            if bounds[f + 1] > bounds[f]:
                selected.setdefault(p, []).append(local[bounds[f] : bounds[f + 1]])
    return {p: np.unique(np.concatenate(parts)).tolist() for p, parts in sorted(selected.items())}


def _index_indices(index_file: Path, doc: dict) -> np.ndarray:
    """All global row indices of a base index (list or `x` in the npz) or multi-resolution index (one npz key per
    "HxW" bucket), as one int64 array."""
    arrays = []
    indices = doc.get("indices", [])
    if isinstance(indices, dict):  # multireso JSON keeps {} here and the buckets in the npz
        arrays.extend(np.asarray(v, dtype=np.int64) for v in indices.values())
    elif indices:
        arrays.append(np.asarray(indices, dtype=np.int64))
    npz_name = doc.get("indices_file") or ""
    if npz_name:
        npz = Path(npz_name)
        if not npz.is_absolute():
            npz = index_file.parent / npz
        if not npz.exists():
            raise ValueError(f"{index_file}: 'indices_file' {npz_name!r} does not exist")
        try:
            with np.load(npz, allow_pickle=False) as z:
                arrays.extend(np.asarray(z[k], dtype=np.int64).ravel() for k in z.files)
        except (OSError, ValueError) as e:
            raise ValueError(f"{index_file}: cannot read 'indices_file' {npz}: {e}") from e
    return np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)


# ---------------------------------------------------------------------------------------------------------------------
# Reading


def read_partition(part: Partition, cfg: InputConfig, storage: StorageConfig | None = None) -> Iterator[dict[str, Any]]:
    """Yield the raw rows of `part` in row order (see the module docstring for the row dict); `storage` is how
    s3:// sources and image URLs are reached."""
    fmt = cfg.format
    if fmt in ("arrow", "indexkits"):
        yield from _read_table_rows(part, cfg, _arrow_batches(part, cfg, storage))
    elif fmt == "parquet":
        yield from _read_table_rows(part, cfg, _parquet_batches(part, cfg, storage))
    elif fmt == "folder":
        yield from _read_folder(part, cfg)
    elif fmt == "jsonl":
        yield from _read_jsonl(part, cfg, storage)
    elif fmt == "csv":
        yield from _read_csv(part, cfg, storage)
    else:  # pragma: no cover - InputConfig validates the format
        raise AssertionError(fmt)


def _row(
    part: Partition,
    row: int,
    image: bytes | None,
    caption: Any,
    md5: Any,
    error: str | None = None,
    source: str | None = None,
    reason: str | None = None,
) -> dict[str, Any]:
    if not (isinstance(md5, str) and _MD5_RE.match(md5)):
        md5 = hashlib.md5(image or b"").hexdigest()
    md5 = md5.lower()
    return {
        "key": make_key(part.source_stem, row, md5),
        "source": source or part.source,
        "row": row,
        "image": image,
        "caption": caption,
        "md5": md5,
        "error": error,
        "error_reason": (reason or "read_error") if error else None,
    }


def _arrow_batches(
    part: Partition, cfg: InputConfig, storage: StorageConfig | None = None
) -> Iterator[tuple[int, pa.RecordBatch, tuple]]:
    """(first row, batch, columns) of the record batches overlapping [start, stop); memory-mapped, zero-copy."""
    path = as_source(part.source, storage)
    # batches before the partition are counted, not read (one small column; see _arrow_batch_rows)
    counts = _arrow_batch_rows(path, cfg) if isinstance(path, S3Path) else None
    reader = _open_arrow(path)
    cols = _resolve_columns(reader.schema.names, {f.name: f.type for f in reader.schema}, cfg, path)
    first = 0
    for i in range(reader.num_record_batches):
        n = counts[i] if counts is not None else None
        if n is not None and not (first + n > part.start and first < part.stop):
            first += n
        else:
            batch = reader.get_batch(i)
            if first + batch.num_rows > part.start and first < part.stop:
                yield first, batch, cols
            first += batch.num_rows
        if first >= part.stop:
            break


def _parquet_batches(
    part: Partition, cfg: InputConfig, storage: StorageConfig | None = None
) -> Iterator[tuple[int, pa.RecordBatch, tuple]]:
    """(first row, batch, columns) of the row groups overlapping [start, stop); only the needed columns are read."""
    path = as_source(part.source, storage)
    pf = _open_parquet(path)
    schema = pf.schema_arrow
    cols = _resolve_columns(schema.names, {f.name: f.type for f in schema}, cfg, path)
    wanted = [c for c in cols if c is not None]
    first = 0
    for g in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if first + n > part.start and first < part.stop:
            table = pf.read_row_group(g, columns=wanted)
            for batch in table.to_batches():
                yield first, batch, cols
                first += batch.num_rows
        else:
            first += n
        if first >= part.stop:
            break


def _read_table_rows(
    part: Partition, cfg: InputConfig, batches: Iterator[tuple[int, pa.RecordBatch, tuple]]
) -> Iterator[dict[str, Any]]:
    wanted = None if part.rows is None else np.asarray(part.rows, dtype=np.int64)
    for first, batch, (image_col, caption_col, md5_col) in batches:
        lo, hi = max(part.start, first), min(part.stop, first + batch.num_rows)
        if wanted is None:
            rows = np.arange(lo, hi)
        else:
            rows = wanted[(wanted >= lo) & (wanted < hi)]
        if len(rows) == 0:
            continue
        sub = batch.take(pa.array(rows - first))
        images = sub.column(image_col).to_pylist()
        captions = sub.column(caption_col).to_pylist()
        md5s = sub.column(md5_col).to_pylist() if md5_col else [None] * len(rows)
        for row, image, caption, md5 in zip(rows.tolist(), images, captions, md5s):
            yield _row(part, row, image, caption, md5)


class _Refused(Exception):
    """A file that is not read: `reason` is the reject reason, the message the detail."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


_O_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def _safe_read(path: Path, roots: tuple[str, ...] | None, what: str = "image") -> bytes:
    """The bytes of `path` if it is, symlinks followed, a regular file inside one of `roots` (None: anywhere).

    Raises _Refused otherwise. The type is checked before opening (a FIFO would block open(), a device read forever)
    and again on the open descriptor (O_NONBLOCK, O_NOFOLLOW on the resolved path), so a file swapped in between
    is caught as well.
    """
    # Containment first, on the path as far as it resolves: an outside path is refused whether or not it exists.
    real = os.path.realpath(path)
    if roots is not None and not any(Path(real).is_relative_to(r) for r in roots):
        where = f" (resolves to {real})" if real != os.path.abspath(path) else ""
        raise _Refused(
            "outside_roots",
            f"{what} file {path}{where} is outside the allowed folders {list(roots)} "
            "(input.allowed_roots; input.allow_outside_paths: true reads anywhere)",
        )
    if not os.path.lexists(path):
        raise _Refused("read_error", f"cannot read {what} file {path}: FileNotFoundError: no such file")
    try:
        real = os.path.realpath(path, strict=True)
    except OSError as e:
        # it exists, so not found means a symlink on the way points to nothing; ELOOP a symlink loop
        reason = "broken_symlink" if isinstance(e, FileNotFoundError) or e.errno == errno.ELOOP else "read_error"
        raise _Refused(reason, f"cannot resolve {what} file {path}: {type(e).__name__}: {e.strerror or e}") from None
    try:
        mode = os.stat(real).st_mode
        if not stat.S_ISREG(mode):
            raise _Refused("not_regular_file", f"{what} file {path} is {_kind(mode)}; only regular files are read")
        fd = os.open(real, _O_FLAGS)
        with os.fdopen(fd, "rb") as fh:
            mode = os.fstat(fh.fileno()).st_mode
            if not stat.S_ISREG(mode):
                raise _Refused("not_regular_file", f"{what} file {path} is {_kind(mode)}; only regular files are read")
            return fh.read()
    except OSError as e:
        raise _Refused("read_error", f"cannot read {what} file {path}: {type(e).__name__}: {e.strerror or e}") from None


def _read_folder(part: Partition, cfg: InputConfig) -> Iterator[dict[str, Any]]:
    assert part.files is not None and len(part.files) == part.stop - part.start
    folder = Path(part.source)
    for row, rel in zip(range(part.start, part.stop), part.files):
        image_path = folder / rel
        image, error, reason = None, None, None
        try:
            image = _safe_read(image_path, part.roots)
        except _Refused as e:
            error, reason = str(e), e.reason
        sidecar = image_path.with_suffix(cfg.caption_extension)
        caption = None
        if os.path.lexists(sidecar):
            try:
                caption = _safe_read(sidecar, part.roots, "caption").decode("utf-8")
            except (_Refused, UnicodeDecodeError) as e:
                # caption stays None: the row is a reject, with the sidecar's reason unless the image already failed
                if error is None and isinstance(e, _Refused):
                    error, reason = str(e), e.reason
                elif error is None:
                    error, reason = f"cannot read caption file {sidecar}: {type(e).__name__}", "read_error"
        yield _row(part, row, image, caption, None, error, source=str(image_path), reason=reason)


def _remote_read(p: S3Path, roots: tuple[str, ...] | None) -> bytes:
    """The bytes of object `p` if its normalised URL lies below one of `roots` (None: anywhere); _Refused
    otherwise or when it does not exist. A StorageError (server unreachable after retries) propagates."""
    url = str(p)
    if roots is not None and not any(is_remote(r) and (url + "/").startswith(r.rstrip("/") + "/") for r in roots):
        raise _Refused(
            "outside_roots",
            f"image object {url} is outside the allowed folders {list(roots)} "
            "(input.allowed_roots; input.allow_outside_paths: true reads anywhere)",
        )
    try:
        return p.read_bytes()
    except MissingObjectError as e:
        raise _Refused("read_error", f"cannot read image object {url}: {e}") from None


def _list_image(
    part: Partition, value: Any, storage: StorageConfig | None = None
) -> tuple[bytes | None, str | None, str | None]:
    """(bytes, error, reason) of the image a list row names; paths are relative to the list's folder (or
    prefix), s3:// URLs are objects."""
    if not isinstance(value, str) or not value:
        return None, f"image path is {value!r}, expected a non-empty string", "read_error"
    if is_remote(value) or is_remote(part.source):
        try:
            p = (
                as_source(part.source, storage).parent / value
                if not (is_remote(value) or value.startswith("/"))
                else as_source(value, storage)
            )
            if isinstance(p, S3Path):
                return _remote_read(p, part.roots), None, None
        except ValueError as e:  # an s3:// URL without a bucket
            return None, f"image path {value!r}: {e}", "read_error"
        except _Refused as e:
            return None, str(e), e.reason
    p = Path(value)
    if not p.is_absolute():
        p = Path(part.source).parent / p
    try:
        return _safe_read(p, part.roots), None, None
    except _Refused as e:
        return None, str(e), e.reason


def _read_jsonl(part: Partition, cfg: InputConfig, storage: StorageConfig | None = None) -> Iterator[dict[str, Any]]:
    path = as_source(part.source, storage)
    with path.open("rb") as fh:
        fh.seek(part.offset)
        row = part.start
        while row < part.stop:
            line = fh.readline()
            if not line:
                break
            if not line.strip():  # not a record: rows count records, exactly as _jsonl_offsets does
                continue
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict):
                    raise ValueError(f"a JSON {type(rec).__name__}, expected an object")
            except ValueError as e:
                yield _row(part, row, None, None, None, f"record {row} is not a JSON object: {e}")
            else:
                image, error, reason = _list_image(part, rec.get(cfg.image_path_column), storage)
                yield _row(
                    part, row, image, rec.get(cfg.caption_column), rec.get(cfg.md5_column or ""), error, reason=reason
                )
            row += 1


def _read_csv(part: Partition, cfg: InputConfig, storage: StorageConfig | None = None) -> Iterator[dict[str, Any]]:
    path = as_source(part.source, storage)
    with path.open(newline="", encoding="utf-8") as fh:
        for row, rec in enumerate(csv.DictReader(fh)):
            if row < part.start:
                continue
            if row >= part.stop:
                break
            image, error, reason = _list_image(part, rec.get(cfg.image_path_column), storage)
            yield _row(
                part, row, image, rec.get(cfg.caption_column), rec.get(cfg.md5_column or ""), error, reason=reason
            )


# ---------------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m stage1_encode.readers",
        description="Plan the partitions of a corpus and print them with the first rows' keys and captions "
        "(a dry run of what stage 1 will read).",
    )
    parser.add_argument("paths", nargs="+", help="files, directories or glob patterns")
    parser.add_argument("--format", default="arrow", choices=FORMATS)
    parser.add_argument("--image-column", default="image")
    parser.add_argument("--caption-column", default="text_zh")
    parser.add_argument("--image-path-column", default="img_path", help="jsonl/csv: the image path column")
    parser.add_argument("--rows-per-shard", type=int, default=1000)
    parser.add_argument("--show", type=int, default=3, help="rows to print from the first partition")
    args = parser.parse_args(argv)
    cfg = InputConfig(
        format=args.format,
        paths=args.paths,
        image_column=args.image_column,
        caption_column=args.caption_column,
        image_path_column=args.image_path_column,
    )
    parts = plan_partitions(cfg, args.rows_per_shard)
    print(f"{len(parts)} partitions, {sum(p.num_rows for p in parts)} rows")
    for p in parts:
        print(f"  {p.name}: {p.source} rows {p.start}..{p.stop - 1} ({p.num_rows})")
    for i, row in enumerate(read_partition(parts[0], cfg)):
        if i >= args.show:
            break
        size = len(row["image"]) if row["image"] is not None else None
        print(
            f"  {row['key']}  {size} bytes  {row['caption']!r}" + (f"  error: {row['error']}" if row["error"] else "")
        )


if __name__ == "__main__":
    main()
