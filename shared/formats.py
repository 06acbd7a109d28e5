"""One object per shard format: its writer, its reader, its sequential pass and its verify hooks.

    fmt = shard_format(spec.format)          # FORMATS["zarr"] | FORMATS["webdataset"]
    w = fmt.writer(root, name, spec)         # a ShardWriterBase (shared/shard_writer.py)
    rd = fmt.reader(path, spec, shard)       # random access: rd.read_stored(i)
    for stored in fmt.iter_stored(rd, spec, keys): ...   # the cheapest whole-shard pass, in file order

shared/cache.py (open_shard_writer, the readers, streaming) and shared/verify.py go through these objects and never
branch on the format; a new format (or a shard layout on an object store) is one new store file and one ShardFormat
subclass here. The shard file name suffixes stay in shared/manifest.py (SHARD_SUFFIX): they are part of the cache
layout that stage 1 resumes from and upgrade-index / the remote mirror list.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from .manifest import SHARD_SUFFIX
from .schema import CacheSpec, CorruptSampleError
from .shard_index import ShardIndex
from .shard_writer import ShardWriterBase
from .wds_store import WdsShardReader, WdsShardWriter, iter_tar_stored
from .zarr_store import ZarrShardReader, ZarrShardWriter


class ShardFormat:
    """The hooks every format provides; the defaults suit a format whose random-access reader is also its fastest
    sequential one and whose files hold nothing beyond what the index and the sample crc already check."""

    name = ""
    writer_class: type[ShardWriterBase] = ShardWriterBase
    reader_class: type = object

    @property
    def suffix(self) -> str:
        return SHARD_SUFFIX[self.name]

    def writer(self, root: str | Path, shard_name: str, spec: CacheSpec, overwrite: bool = False) -> ShardWriterBase:
        return self.writer_class(root, shard_name, spec, overwrite=overwrite)

    def reader(self, path: Path, spec: CacheSpec, shard: ShardIndex) -> Any:
        return self.reader_class(path, spec, shard)

    streams_file = False  # iter_stored can read the shard's data from a sequential file object (one-file shards)

    def iter_stored(self, rd: Any, spec: CacheSpec, keys: list[str], data: BinaryIO | None = None) -> Iterator[dict]:
        """Every stored sample of one shard, in file order (`rd`: this format's reader of it; `data`: the shard's
        bytes as a sequential file object instead of rd's file, where streams_file)."""
        assert data is None, f"{self.name} shards are not read from a file object"
        return (rd.read_stored(j) for j in range(len(keys)))

    def index_problem(self, shard: ShardIndex, data_nbytes: int) -> str | None:
        """What is wrong with a shard's index columns that only this format knows about (None: nothing)."""
        return None

    def layout_problem(self, path: Path, keys: list[str]) -> tuple[str | None, bool]:
        """verify, before the samples are read: (problem or None, whether the samples can still be read)."""
        return None, True

    def sequential_problem(self, path: Path, spec: CacheSpec, keys: list[str]) -> str | None:
        """verify, after every sample read back by random access: what a sequential reader would meet."""
        return None


class ZarrFormat(ShardFormat):
    name = "zarr"
    writer_class = ZarrShardWriter
    reader_class = ZarrShardReader

    def layout_problem(self, path: Path, keys: list[str]) -> tuple[str | None, bool]:
        try:
            import zarr  # ~0.5 s to import: only a full verify of a zarr cache pays it here

            attrs_keys = zarr.open_group(str(path), mode="r").attrs.get("keys")
        except Exception as e:  # any failure to open the group
            return f"cannot open the zarr group ({type(e).__name__}: {e})", False
        if attrs_keys != keys:
            return "keys in the zarr group differ from its index", True
        return None, True


class WdsFormat(ShardFormat):
    name = "webdataset"
    writer_class = WdsShardWriter
    reader_class = WdsShardReader

    streams_file = True

    def iter_stored(self, rd: Any, spec: CacheSpec, keys: list[str], data: BinaryIO | None = None) -> Iterator[dict]:
        return iter_tar_stored(rd.path, spec, keys, data)  # one pass over the tar, no seeks

    def index_problem(self, shard: ShardIndex, data_nbytes: int) -> str | None:
        """Each member must lie inside the tar (the offset columns are read through the shared mapping, 160 bytes
        per sample)."""
        cols = shard.mapped.columns
        off, n = cols["member_offset"], cols["member_size"]
        if off.size and (int(off.min()) < 0 or int(n.min()) < 0 or int((off + n).max()) > data_nbytes):
            return f"{shard.data_path}: the index's member offsets do not fit the file ({data_nbytes} bytes)"
        return None

    def sequential_problem(self, path: Path, spec: CacheSpec, keys: list[str]) -> str | None:
        # the random-access path skips tar headers; a sequential pass checks what streaming readers see
        try:
            for _ in iter_tar_stored(path, spec, keys):
                pass
        except CorruptSampleError as e:
            return f"sequential read failed: {e}"
        return None


FORMATS: dict[str, ShardFormat] = {f.name: f for f in (ZarrFormat(), WdsFormat())}


def shard_format(name: str) -> ShardFormat:
    fmt = FORMATS.get(name)
    if fmt is None:
        raise ValueError(f"shard format {name!r} is not supported; choose one of {sorted(FORMATS)}")
    return fmt
