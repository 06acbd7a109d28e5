"""Corruption is caught: verify names the shard and sample (CLI exits non-zero), the reader raises, never garbage."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from shared.cache import open_cache
from shared.cli import main as cli_main
from shared.inspection import write_synthetic_cache
from shared.manifest import shard_index_path
from shared.schema import CacheSpec, CorruptSampleError
from shared.shard_index import encode_index, read_index_columns
from shared.verify import verify_cache

SMALL = dict(clip_len=12, clip_dim=16, t5_len=24, t5_dim=20)
ROOT = Path(__file__).resolve().parents[1]


def _flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x5A]))


def _moments_offset_wds(root: Path, shard: str, i: int) -> int:
    header, cols = read_index_columns(shard_index_path(root, shard))
    fields = header["fields"]
    j = fields.index("moments_plain" if "moments_plain" in fields else "moments")  # sample layout 2 or 1
    return int(cols["member_offset"][i, j] + cols["member_size"][i, j]) - 7  # inside the array data, past the header


@pytest.mark.parametrize(
    "fmt, comp", [("webdataset", "none"), ("webdataset", "zstd"), ("zarr", "none"), ("zarr", "zstd")]
)
def test_corrupted_byte_is_named(tmp_path, fmt, comp, capsys):
    spec = CacheSpec(format=fmt, compression=comp, **SMALL)
    write_synthetic_cache(tmp_path, spec, n_samples=6, n_shards=2)
    rep = verify_cache(tmp_path, progress=False)
    assert rep.ok, str(rep)
    assert cli_main(["verify", str(tmp_path), "--no-progress"]) == 0
    cache = open_cache(tmp_path)
    victim = 1  # second sample of part-000001
    key = cache.keys()[3 + victim]
    if fmt == "webdataset":
        _flip_byte(tmp_path / "shards" / "part-000001.tar", _moments_offset_wds(tmp_path, "part-000001", victim))
    else:
        f = tmp_path / "shards" / "part-000001.zarr" / "moments" / "c" / "0"
        if comp == "none":
            # inner chunks are raw; the victim's moments start at moments_offsets[victim] elements
            per = int(np.prod(spec.latent_shape((64, 32 if victim % 2 else 64))))
            _flip_byte(f, 4 * int(np.prod(spec.latent_shape((64, 64)))) + 4 * per // 2)
        else:
            _flip_byte(f, f.stat().st_size // 3)
    rep = verify_cache(tmp_path, progress=False)
    assert not rep.ok
    assert "part-000001" in rep.bad_shards and "part-000000" not in rep.bad_shards
    assert any("sha256" in e and "part-000001" in e for e in rep.errors)
    if fmt == "webdataset" or comp == "none":
        assert rep.bad_samples == [("part-000001", key)]
    else:  # a compressed chunk holds several small samples: the ones whose bytes changed are reported
        assert rep.bad_samples and all(s == "part-000001" for s, _ in rep.bad_samples)
        key = rep.bad_samples[0][1]
    assert cli_main(["verify", str(tmp_path), "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "part-000001" in out
    fresh = open_cache(tmp_path)
    with pytest.raises(CorruptSampleError, match=rf"part-000001.*{key}"):
        fresh[key]
    fresh[0]  # the good shard still reads


def test_truncated_shard_and_leftovers(tmp_path):
    spec = CacheSpec(format="webdataset", **SMALL)
    write_synthetic_cache(tmp_path, spec, n_samples=4, n_shards=2)
    shards = tmp_path / "shards"
    (shards / ".tmp-part-000002.tar-123-abcd").write_bytes(b"half a tar")
    (shards / "stray.tar").write_bytes(b"no index")
    tar = shards / "part-000000.tar"
    data = tar.read_bytes()
    tar.write_bytes(data[: len(data) // 2])
    rep = verify_cache(tmp_path, progress=False)
    assert not rep.ok and rep.bad_shards == ["part-000000"]
    assert any("bytes on disk" in e for e in rep.errors)
    assert any(".tmp-part-000002" in w for w in rep.warnings)
    assert any("stray.tar" in w for w in rep.warnings)
    cache = open_cache(tmp_path)
    assert len(cache) == 4  # temp/stray files are not part of the cache
    with pytest.raises(CorruptSampleError, match="part-000000"):
        cache[1]
    cache[2]


def test_cli_verify_exit_code_and_inspect(tmp_path):
    spec = CacheSpec(format="zarr", **SMALL)
    write_synthetic_cache(tmp_path, spec, n_samples=4, n_shards=1)
    (tmp_path / "manifest.json").unlink()
    r = subprocess.run(
        [sys.executable, "-m", "shared.cli", "verify", str(tmp_path), "--no-progress"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 1 and "incomplete" in r.stdout
    assert cli_main(["inspect", str(tmp_path)]) == 2


def test_damaged_shard_index_is_a_clear_error(tmp_path):
    spec = CacheSpec(format="webdataset", **SMALL)
    write_synthetic_cache(tmp_path, spec, n_samples=2, n_shards=1)
    path = shard_index_path(tmp_path, "part-000000")
    header, cols = read_index_columns(path)
    cols["member_size"][1, header["fields"].index("moments_plain")] = -5
    path.write_bytes(encode_index(header["n_samples"], cols, header["fields"]))
    cache = open_cache(tmp_path)
    with pytest.raises(CorruptSampleError, match="part-000000.*moments_plain: bad member index"):
        cache[1]
    cache[0]


def test_damaged_index_file_is_named(tmp_path):
    spec = CacheSpec(format="webdataset", **SMALL)
    write_synthetic_cache(tmp_path, spec, n_samples=4, n_shards=2)
    path = shard_index_path(tmp_path, "part-000001")
    path.write_bytes(path.read_bytes()[:-64])  # the last column loses its tail
    cache = open_cache(tmp_path)
    cache[0]  # the good shard still reads
    with pytest.raises(CorruptSampleError, match=r"part-000001\.index.*past the end"):
        cache[3]
    with pytest.raises(CorruptSampleError, match=r"part-000001\.index"):
        cache.buckets()
    rep = verify_cache(tmp_path, progress=False)
    assert rep.bad_shards == ["part-000001"] and any("part-000001.index" in e for e in rep.errors)
    path.write_bytes(b"not an index")
    with pytest.raises(CorruptSampleError, match="bad magic"):
        open_cache(tmp_path)[3]
