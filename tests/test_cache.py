"""Round trips through both shard formats: what is written is read back bit-identical, both formats agree."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from shared.cache import open_cache, open_shard_writer, read_empty_caption, write_empty_caption
from shared.inspection import write_synthetic_cache
from shared.manifest import completed_shards, manifest_from_shards, read_manifest, write_manifest
from shared.schema import (
    CacheSpec,
    dedup_rows,
    encode_sample,
    make_key,
    synthetic_sample,
    to_torch,
    undo_xor_delta_rows,
    xor_delta_rows,
)
from shared.shard_index import ShardIndex

SMALL = dict(clip_len=12, clip_dim=16, t5_len=24, t5_dim=20, latent_channels=4, downsample=8)
BUCKETS = [(64, 64), (64, 32), (32, 96)]
TEXT_FIELDS = ("clip_ids", "clip_mask", "clip_states", "t5_ids", "t5_mask", "t5_states")


def _text_of(sample: dict) -> dict:
    """The fields write_empty_caption takes, from a synthetic sample."""
    return {k: sample[k] for k in TEXT_FIELDS}


def _samples(spec: CacheSpec, n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        s = synthetic_sample(
            spec,
            make_key("src.v1", i, f"{i:032x}"),
            BUCKETS[i % 3],
            rng,
            caption=["一只猫", "", "a dog, 狗 🐕"][i % 3] + f" {i}",
            clip_len=[1, 5, SMALL["clip_len"]][i % 3],
            t5_len=[1, 7, SMALL["t5_len"]][i % 3],
        )
        out.append(s)
    return out


def _write(root, spec: CacheSpec, samples: list[dict], per_shard: int = 4) -> None:
    for s in range(0, len(samples), per_shard):
        with open_shard_writer(root, f"part-{s // per_shard:03d}", spec) as w:
            for x in samples[s : s + per_shard]:
                w.add(x)
    sha = write_empty_caption(root, spec, **_text_of(samples[0]))
    write_manifest(
        root,
        manifest_from_shards(
            root,
            spec,
            vae_scaling_factor=0.13025,
            empty_caption_sha256=sha,
            encoders={"vae": {"weights": {"a": "1"}}},
            rejects={"too_small": 2},
        ),
    )


def _assert_same(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        if isinstance(a[k], str):
            assert a[k] == b[k], k
        else:
            x, y = np.asarray(a[k]), np.asarray(b[k])
            assert x.shape == y.shape, (k, x.shape, y.shape)
            # compare dtypes and bit patterns: NaN-safe and -0.0 vs 0.0 sensitive
            assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), k


@pytest.mark.parametrize(
    "views, dtypes, comp",
    [
        (("plain",), ("float32", "float32", "float16"), "none"),
        (("plain", "flip"), ("float16", "bfloat16", "bfloat16"), "zstd"),
    ],
)
def test_round_trip_both_formats_identical(tmp_path, views, dtypes, comp):
    vae, clip, t5 = dtypes
    read = {}
    for fmt in ("zarr", "webdataset"):
        spec = CacheSpec(
            format=fmt, views=views, vae_dtype=vae, clip_dtype=clip, t5_dtype=t5, compression=comp, **SMALL
        )
        samples = _samples(spec, 9)
        root = tmp_path / fmt
        _write(root, spec, samples)
        cache = open_cache(root)
        assert len(cache) == 9
        assert cache.keys() == [s["key"] for s in samples]  # manifest shard order, then in-shard order
        got = [cache[i] for i in range(9)]
        for s, g in zip(samples, got):
            expect = dict(s)
            dense = s["clip_states"]
            expect["clip_states"] = np.where(s["clip_mask"][:, None], dense, 0).astype(dense.dtype)
            _assert_same(expect, g)
            assert g["t5_states"].shape == (SMALL["t5_len"], SMALL["t5_dim"])  # padded rows come back too
            assert g["moments"].shape[0] == len(views)
        _assert_same(cache[samples[4]["key"]], got[4])
        read[fmt] = got
        e = read_empty_caption(root, spec)
        assert set(e) == set(TEXT_FIELDS)  # all six, dense (padded BERT rows included)
        _assert_same({k: np.asarray(v) for k, v in _text_of(samples[0]).items()}, e)
        tt = to_torch(got[0], spec)
        if t5 == "bfloat16":
            assert tt["t5_states"].dtype == torch.bfloat16
            ref = torch.from_numpy(samples[0]["t5_states"].astype(np.int32) << 16).view(torch.float32)
            assert torch.equal(tt["t5_states"].float(), ref)
    for a, b in zip(read["zarr"], read["webdataset"]):
        _assert_same(a, b)


def test_stored_form_is_compact_and_exact():
    spec = CacheSpec(**SMALL)
    rng = np.random.default_rng(1)
    s = synthetic_sample(spec, "k-1", (64, 64), rng, clip_len=5, t5_len=7)
    st = encode_sample(s, spec)
    assert st["clip_rows"].shape == (5, SMALL["clip_dim"])
    assert st["t5_rows"].shape[0] < SMALL["t5_len"]
    assert np.array_equal(st["t5_rows"][st["t5_index"]], s["t5_states"])
    # -0.0 and 0.0 are different bits and must stay different rows
    x = np.zeros((3, 4), np.float16)
    x[1, 0] = -0.0
    rows, idx = dedup_rows(x)
    assert rows.shape[0] == 2 and idx.tolist() == [0, 1, 0]
    coded = xor_delta_rows(st["t5_rows"])
    assert coded.dtype == np.uint16 and not np.array_equal(coded, st["t5_rows"].view(np.uint16))
    assert undo_xor_delta_rows(coded, np.dtype(np.float16)).tobytes() == st["t5_rows"].tobytes()


def test_writer_refuses_bad_samples(tmp_path):
    spec = CacheSpec(format="webdataset", **SMALL)
    rng = np.random.default_rng(0)
    good = synthetic_sample(spec, "k-0", (64, 64), rng)
    w = open_shard_writer(tmp_path, "p", spec)
    bad = dict(good, moments=good["moments"].astype(np.float16))
    with pytest.raises(ValueError, match="moments of k-0 has dtype float16 but the spec says float32"):
        w.add(bad)
    bad = dict(good, t5_states=good["t5_states"][:-1])
    with pytest.raises(ValueError, match=r"t5_states of k-0 has shape"):
        w.add(bad)
    bad = dict(good, key="a.b")
    with pytest.raises(ValueError, match="key 'a.b' is invalid"):
        w.add(bad)
    nan = good["moments"].copy()
    nan[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="inf/NaN"):
        w.add(dict(good, moments=nan))
    w.add(good)
    with pytest.raises(ValueError, match="duplicate sample key"):
        w.add(good)
    w.close()
    with pytest.raises(FileExistsError):
        open_shard_writer(tmp_path, "p", spec)
    with pytest.raises(ValueError, match="CacheSpec.format='parquet' is invalid"):
        CacheSpec(format="parquet")


@pytest.mark.parametrize("fmt", ["zarr", "webdataset"])
def test_meta_filter_stream_and_workers(tmp_path, fmt):
    spec = CacheSpec(format=fmt, **SMALL)
    write_synthetic_cache(tmp_path, spec, n_samples=12, n_shards=4, buckets=BUCKETS)
    cache = open_cache(tmp_path)
    meta = cache.meta
    assert meta["bucket"].shape == (12, 2) and meta["clip_len"].shape == (12,)
    for i in (0, 5, 11):
        s = cache[i]
        assert tuple(meta["bucket"][i]) == tuple(s["bucket"])
        assert meta["clip_len"][i] == s["clip_mask"].sum() and meta["t5_len"][i] == s["t5_mask"].sum()
    b = cache.bucket_indices()
    assert sorted(b) == sorted(BUCKETS) and sum(len(v) for v in b.values()) == 12
    sub = cache.filter(bucket=(64, 32))
    assert len(sub) == 4 and all(tuple(sub[i]["bucket"]) == (64, 32) for i in range(len(sub)))
    with pytest.raises(KeyError):
        sub[cache.keys()[0]]  # a (64, 64) sample is not in the view
    # map-style through 2 forked workers (pickled reader, files opened lazily per process)
    clone = pickle.loads(pickle.dumps(cache))
    _assert_same(clone[3], cache[3])
    dl = torch.utils.data.DataLoader(cache, batch_size=None, num_workers=2)
    keys = [s["key"] for s in dl]
    assert keys == cache.keys()
    # streaming: every sample exactly once across workers, equal to random access
    dl = torch.utils.data.DataLoader(cache.stream(), batch_size=None, num_workers=2)
    streamed = {s["key"]: s for s in dl}
    assert sorted(streamed) == sorted(cache.keys())
    _assert_same(streamed[cache.keys()[7]], cache[7])
    # rank split: two ranks see disjoint shards covering everything
    r0 = [s["key"] for s in cache.stream(rank=0, world_size=2)]
    r1 = [s["key"] for s in cache.stream(rank=1, world_size=2)]
    assert not set(r0) & set(r1) and sorted(r0 + r1) == sorted(cache.keys())
    assert [s["key"] for s in sub.stream()] == sub.keys()
    summ = cache.summary()
    assert summ["samples"] == 12 and summ["buckets"]["64x32"] == 4
    assert "t5_len" in str(summ) and "moments" in str(summ)


def test_webdataset_library_reads_our_tars(tmp_path):
    import webdataset as wds

    # plain .npy members (compression="none") are what a stock webdataset pipeline decodes by itself
    spec = CacheSpec(format="webdataset", compression="none", **SMALL)
    write_synthetic_cache(tmp_path, spec, n_samples=4, n_shards=1)
    cache = open_cache(tmp_path)
    url = str(tmp_path / "shards" / "part-000000.tar")
    ds = wds.WebDataset(url, shardshuffle=False).decode()
    got = list(ds)
    assert [g["__key__"] for g in got] == cache.keys()
    s = cache[2]
    np.testing.assert_array_equal(got[2]["t5_ids.npy"], s["t5_ids"])
    assert got[2]["caption.txt"] == s["caption"]


def test_unfinished_and_temp_shards_are_never_read(tmp_path):
    spec = CacheSpec(format="webdataset", **SMALL)
    rng = np.random.default_rng(0)
    with open_shard_writer(tmp_path, "done", spec) as w:
        w.add(synthetic_sample(spec, "a-1", (64, 64), rng))
    dying = open_shard_writer(tmp_path, "dying", spec)  # a job that dies mid-shard: temp file, no sidecar
    dying.add(synthetic_sample(spec, "b-1", (64, 64), rng))
    dying._tar.fileobj.flush()
    assert any(p.name.startswith(".tmp-dying") for p in (tmp_path / "shards").iterdir())
    assert list(completed_shards(tmp_path)) == ["done"]
    # a failing writer inside `with` removes its temp file
    with pytest.raises(RuntimeError):
        with open_shard_writer(tmp_path, "boom", spec) as w:
            w.add(synthetic_sample(spec, "c-1", (64, 64), rng))
            raise RuntimeError("encoder crashed")
    assert not any(p.name.startswith(".tmp-boom") for p in (tmp_path / "shards").iterdir())
    with pytest.raises(FileNotFoundError, match="cache is incomplete"):
        open_cache(tmp_path)
    e = synthetic_sample(spec, "e", (64, 64), rng)
    write_empty_caption(tmp_path, spec, **_text_of(e))
    write_manifest(tmp_path, manifest_from_shards(tmp_path, spec))
    cache = open_cache(tmp_path)
    assert cache.keys() == ["a-1"]
    assert read_manifest(tmp_path).n_samples == 1
    dying.abort()


def test_overwrite_replaces_a_shard_atomically(tmp_path):
    for fmt in ("zarr", "webdataset"):
        spec = CacheSpec(format=fmt, **SMALL)
        rng = np.random.default_rng(0)
        root = tmp_path / fmt
        with open_shard_writer(root, "p", spec) as w:
            w.add(synthetic_sample(spec, "a-1", (64, 64), rng))
        with open_shard_writer(root, "p", spec, overwrite=True) as w:
            w.add(synthetic_sample(spec, "a-2", (64, 64), rng))
        assert ShardIndex(root, completed_shards(root)["p"]).keys() == ["a-2"]
        assert not [p for p in (root / "shards").iterdir() if p.name.startswith(".tmp-")]


def test_torch_inputs_and_empty_shards(tmp_path):
    """Stage 1 hands over torch tensors (bf16 included, masks as long); an all-rejected partition gives an empty
    shard that still counts as completed."""
    from shared.manifest import count_rejects

    for fmt in ("zarr", "webdataset"):
        root = tmp_path / fmt
        spec = CacheSpec(format=fmt, t5_dtype="bfloat16", **{k: v for k, v in SMALL.items()})
        assert open_shard_writer(root, "empty", spec).close().n_samples == 0
        s = synthetic_sample(spec, "k-1", (32, 32), np.random.default_rng(0))
        t = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in s.items()}
        t["t5_states"] = torch.from_numpy(s["t5_states"].astype(np.int32) << 16).view(torch.float32).bfloat16()
        t["clip_mask"] = t["clip_mask"].long()
        with open_shard_writer(root, "p1", spec) as w:
            w.add(t)
        write_empty_caption(root, spec, **{k: v[None] for k, v in _text_of(t).items()})
        (root / "rejects.jsonl").write_text(
            '{"key": "a", "reason": "too_small"}\n{"key": "b", "reason": "too_small"}\n'
        )
        write_manifest(root, manifest_from_shards(root, spec, rejects=count_rejects(root)))
        cache = open_cache(root)
        assert len(cache) == 1 and sorted(completed_shards(root)) == ["empty", "p1"]
        got = cache[0]
        assert got["t5_states"].tobytes() == s["t5_states"].tobytes()
        assert cache.empty_caption()["t5_states"].tobytes() == s["t5_states"].tobytes()
        assert cache.summary()["rejects"] == {"too_small": 2}


def test_empty_caption_file_is_byte_deterministic(tmp_path):
    # The manifest records this file's sha256, so identical runs must write identical bytes (safetensors keeps its
    # metadata in a hash map: several keys would come out in a random order).
    spec = CacheSpec(format="zarr", **SMALL)
    e = synthetic_sample(spec, "e", (64, 64), np.random.default_rng(0))
    shas = {write_empty_caption(tmp_path / str(i), spec, **_text_of(e)) for i in range(8)}
    assert len(shas) == 1


def test_npy_member_fast_path_equals_np_load():
    import io

    from shared.wds_store import _npy_bytes, load_npy

    rng = np.random.default_rng(0)
    arrays = [
        rng.standard_normal((1, 8, 4, 6)).astype(np.float16),
        rng.integers(0, 9, (77,), dtype=np.int32),
        rng.random(256) < 0.5,
        rng.integers(0, 300, (256,)).astype(np.uint16),
        np.zeros((0, 1024), np.float16),
        np.float32(3.5).reshape(()),
        rng.standard_normal((3, 5)).astype(">f4"),
    ]
    for a in arrays:
        got = load_npy(_npy_bytes(a))
        ref = np.load(io.BytesIO(_npy_bytes(a)), allow_pickle=False)
        assert got.dtype == ref.dtype and got.shape == ref.shape and np.array_equal(got, ref)
        assert got.flags.writeable  # torch.from_numpy warns on read-only arrays
        blob = bytearray(_npy_bytes(a))
        assert np.shares_memory(load_npy(blob), np.frombuffer(blob, np.uint8)) or a.size == 0  # no copy when writable
    # Headers it does not recognise go to np.load: Fortran order, and still no pickles.
    f = np.asfortranarray(rng.standard_normal((3, 4)).astype(np.float32))
    buf = io.BytesIO()
    np.lib.format.write_array(buf, f)
    assert np.array_equal(load_npy(buf.getvalue()), f)
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="pickle"):
        load_npy(buf.getvalue())
    with pytest.raises(ValueError):  # a payload shorter than its header says is not read past its end
        load_npy(_npy_bytes(arrays[0])[:-2])


def test_blosc_frame_is_not_read_past_its_member():
    """A blosc frame's header says its compressed size and blosc trusts it: a member cut short (or a header claiming
    more) was decoded from whatever bytes followed it in the read buffer. It is refused now."""
    from shared.wds_store import _blosc, _compress, _decode_npy, _npy_bytes

    a = np.random.default_rng(0).standard_normal((16, 256)).astype(np.float32)
    frame = memoryview(_compress(_npy_bytes(a), 4, 3, 1 << 20) + b"next member")  # what follows it in a pread
    n = len(frame) - len(b"next member")
    assert np.array_equal(_decode_npy(frame[:n], _blosc(3)), a)
    for cut in (1, n // 2, n - 8):
        with pytest.raises(ValueError, match="blosc frame"):
            _decode_npy(frame[: n - cut], _blosc(3))


def test_npy_header_cache_keys_on_the_whole_header():
    """Headers are parsed once per distinct header (shared.wds_store._npy_header): arrays of the same field with
    other shapes or dtypes must never get a cached answer of another header."""
    from shared.wds_store import _npy_bytes, load_npy

    rng = np.random.default_rng(1)
    for n in (3, 4, 3, 40, 4):
        for dt in (np.float16, np.float32, np.uint16, np.float32):
            a = rng.standard_normal((n, 8)).astype(dt)
            got = load_npy(_npy_bytes(a))
            assert got.dtype == a.dtype and got.shape == a.shape and np.array_equal(got, a)


def _to_legacy_layout(root) -> None:
    """Rewrite a cache as the layout before the columnar index wrote it: per-sample lists (and webdataset member
    offsets) in each sidecar, no .index files, manifest entries without index_sha256."""
    import json

    from shared.manifest import shard_index_path, shard_sidecar_path
    from shared.shard_index import read_index_columns

    m = json.loads((root / "manifest.json").read_text())
    for e in m["shards"]:
        side = shard_sidecar_path(root, e["name"])
        d = json.loads(side.read_text())
        header, cols = read_index_columns(shard_index_path(root, e["name"]))
        blob, offs = cols["key_blob"].tobytes(), cols["key_offsets"].tolist()
        old = {
            "name": d["name"],
            "format": d["format"],
            "n_samples": d["n_samples"],
            "bytes": d["bytes"],
            "sha256": d["sha256"],
            "keys": [blob[a:b].decode() for a, b in zip(offs, offs[1:])],
            "buckets": cols["bucket"].tolist(),
            "clip_lens": cols["clip_len"].tolist(),
            "t5_lens": cols["t5_len"].tolist(),
            "t5_unique": cols["t5_unique"].tolist(),
            "field_bytes": d["field_bytes"],
            "schema_version": d["schema_version"],
            "members": {
                f: {"offset": cols["member_offset"][:, j].tolist(), "size": cols["member_size"][:, j].tolist()}
                for j, f in enumerate(header["fields"])
            },
        }
        side.write_text(json.dumps(old, indent=1))
        shard_index_path(root, e["name"]).unlink()
        del e["index_sha256"]
    (root / "manifest.json").write_text(json.dumps(m, indent=1))


@pytest.mark.parametrize("fmt", ["webdataset", "zarr"])
def test_old_layout_is_refused_by_name_and_upgrade_index_converts_it(tmp_path, fmt):
    from shared.cli import main as cli_main
    from shared.manifest import LegacyIndexError

    spec = CacheSpec(format=fmt, **SMALL)
    write_synthetic_cache(tmp_path, spec, n_samples=5, n_shards=2)
    before = {p.name: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file() and "zarr" not in str(p)}
    want = [open_cache(tmp_path)[i] for i in range(5)]
    _to_legacy_layout(tmp_path)
    with pytest.raises(LegacyIndexError, match="upgrade-index"):
        open_cache(tmp_path)
    assert cli_main(["upgrade-index", str(tmp_path)]) == 0
    after = {p.name: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file() and "zarr" not in str(p)}
    assert after == before  # sidecars, index files and manifest: byte-identical to what the writers produce
    cache = open_cache(tmp_path)
    for i, w in enumerate(want):
        got = cache[i]
        assert got["key"] == w["key"] and all(np.array_equal(got[k], w[k]) for k in w if isinstance(w[k], np.ndarray))
    assert cli_main(["upgrade-index", str(tmp_path)]) == 0  # idempotent
    assert cli_main(["verify", str(tmp_path), "--no-progress"]) == 0


def test_key_lookup_views_and_a_small_pickle(tmp_path, monkeypatch):
    """Keys are found by binary search over hashes (no dict of keys), exactly even when hashes collide; views and
    pickles carry positions and paths, never the per-sample columns."""
    import shared.cache as cache_mod

    spec = CacheSpec(format="webdataset", **SMALL)
    write_synthetic_cache(tmp_path, spec, n_samples=12, n_shards=3, buckets=BUCKETS)
    cache = open_cache(tmp_path)
    keys = cache.keys()
    assert [cache[k]["key"] for k in keys[::-1]] == keys[::-1]
    with pytest.raises(KeyError):
        cache["no-such-key"]
    sub = cache.filter(keys=[keys[7], keys[2], "missing"])
    assert sub.keys() == [keys[2], keys[7]] and sub[keys[7]]["key"] == keys[7]
    assert cache.filter(bucket=(64, 32)).filter(keys=keys).keys() == [
        k for k, b in zip(keys, cache.buckets().tolist()) if tuple(b) == (64, 32)
    ]
    cache.buckets(), cache[0]  # build the cache-wide column and open a shard: neither may travel in a pickle
    blob = pickle.dumps(cache)
    assert len(blob) < 8192 and b"synthetic-00000005" not in blob
    # every key hashing alike: the exact comparison still picks the right sample
    monkeypatch.setattr(cache_mod, "key_hash", lambda k: 7)
    fresh = open_cache(tmp_path)
    fresh._key_lookup = (np.full(12, 7, dtype=np.uint64), np.arange(12))
    assert fresh[keys[9]]["key"] == keys[9]


def test_duplicate_keys_across_shards_are_refused_at_the_manifest(tmp_path):
    spec = CacheSpec(format="zarr", **SMALL)
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        with open_shard_writer(tmp_path, name, spec) as w:
            w.add(synthetic_sample(spec, f"only-{name}", (64, 64), rng))
            w.add(synthetic_sample(spec, "twice", (64, 64), rng))
    with pytest.raises(ValueError, match="duplicate keys across shards.*twice"):
        write_manifest(tmp_path, manifest_from_shards(tmp_path, spec))


def test_open_shards_are_bounded(tmp_path, monkeypatch):
    """A process keeps at most _OPEN_SHARDS webdataset shards (fd + index mapping) open; evicted ones reopen."""
    import shared.cache as cache_mod

    monkeypatch.setitem(cache_mod._OPEN_SHARDS, "webdataset", 2)
    spec = CacheSpec(format="webdataset", **SMALL)
    write_synthetic_cache(tmp_path, spec, n_samples=8, n_shards=4)
    cache = open_cache(tmp_path)
    keys = cache.keys()
    for i in (0, 2, 4, 6, 1, 7, 3, 5, 0):
        assert cache[i]["key"] == keys[i] and cache[keys[7 - i]]["key"] == keys[7 - i]
        assert cache.filter(keys=keys[i:]).keys() == keys[i:]
        assert len(cache._readers) <= 2
        assert sum(sh._mapped is not None for sh in cache.shards) <= 2


def test_zarr_reads_through_stored_offsets_like_zarr_itself(tmp_path):
    """The zarr reader's offsets path (shared.zarr_store._FlatShardArray) returns what zarr's own reads return, also
    for samples whose rows straddle inner chunks; a damaged chunk index is refused naming the file."""
    from shared.schema import CorruptSampleError

    spec = CacheSpec(format="zarr", views=("plain", "flip"), clip_len=77, clip_dim=16, t5_len=12, t5_dim=24)
    write_synthetic_cache(tmp_path / "c", spec, n_samples=14, n_shards=1, buckets=((128, 192), (64, 64)))
    reader = open_cache(tmp_path / "c")
    rd = reader._reader(0)
    rd._open()
    assert all(v is not None for v in rd._flat.values()), "the writer's layout must take the offsets path"
    flat = [reader.read_stored(i) for i in range(len(reader))]
    rd._flat = {}  # zarr's own (async) reads
    for i, a in enumerate(flat):
        b = reader.read_stored(i)
        for name in ("moments", "clip_rows", "t5_rows"):
            assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]), (i, name)
    shard_file = tmp_path / "c" / "shards" / "part-000000.zarr" / "moments" / "c" / "0"
    raw = bytearray(shard_file.read_bytes())
    raw[-1] ^= 0xFF  # the index's crc32c
    shard_file.write_bytes(bytes(raw))
    fresh = open_cache(tmp_path / "c")
    with pytest.raises(CorruptSampleError, match="moments/c/0.*crc32c"):
        fresh.read_stored(0)


@pytest.mark.parametrize("fmt", ["webdataset", "zarr"])
def test_old_sample_layout_stays_readable_and_part_reads_agree(tmp_path, fmt):
    """Caches of sample layout 1 (one zlib crc32 over the sample, both views in one member) read back the same
    samples as layout 2 (a CRC-32C per part, one member per view), by random access, streaming, part reads and
    verify; a part read returns exactly the drawn view's moments and the text rows asked for."""
    from shared.cli import main as cli_main
    from shared.schema import writing_layout

    spec = CacheSpec(format=fmt, views=("plain", "flip"), **SMALL)
    samples = _samples(spec, 6)
    caches = {}
    for layout in (1, 2):
        with writing_layout(layout):
            _write(tmp_path / str(layout), spec, samples, per_shard=3)
        caches[layout] = open_cache(tmp_path / str(layout))
        assert cli_main(["verify", str(tmp_path / str(layout)), "--no-progress"]) == 0
    old, new = caches[1], caches[2]
    assert "crc32" in old.read_stored(0) and "crc32c" in new.read_stored(0)
    streamed = {s["key"]: s for s in old.stream()}
    for i in range(6):
        _assert_same(old[i], new[i])
        _assert_same(streamed[old.keys()[i]], new[i])
        for view, clip, t5 in ((0, True, True), (1, False, True), (1, True, False)):
            a, b = old.read_parts(i, view, clip, t5), new.read_parts(i, view, clip, t5)
            assert a["moments_view"].tobytes() == new[i]["moments"][view].tobytes()
            for name in ("moments_view", "clip_rows", "t5_rows", "t5_index", "clip_mask", "image_meta_size"):
                assert (name in a) == (name in b), name
                if name in a:
                    assert a[name].dtype == b[name].dtype and a[name].tobytes() == b[name].tobytes(), name
            assert ("clip_rows" in b) == clip and ("t5_rows" in b) == t5


def test_part_reads_check_every_part_they_return(tmp_path):
    """A damaged byte is caught by every read that uses it, and only a read that skips it passes (sample layout 2:
    a part read decodes and checks the head, the drawn view and the kept text rows)."""
    from shared.manifest import shard_index_path
    from shared.schema import CorruptSampleError
    from shared.shard_index import read_index_columns

    spec = CacheSpec(format="webdataset", views=("plain", "flip"), compression="none", **SMALL)
    write_synthetic_cache(tmp_path, spec, n_samples=4, n_shards=1)
    want = open_cache(tmp_path)[2]
    header, cols = read_index_columns(shard_index_path(tmp_path, "part-000000"))
    tar = tmp_path / "shards" / "part-000000.tar"
    for field in ("moments_flip", "clip_rows"):
        j = header["fields"].index(field)
        end = int(cols["member_offset"][2, j] + cols["member_size"][2, j])
        raw = bytearray(tar.read_bytes())
        raw[end - 3] ^= 0x10  # inside the array data of sample 2's member
        tar.write_bytes(bytes(raw))
    cache = open_cache(tmp_path)
    ok = cache.read_parts(2, 0, clip=False, t5=True)  # neither damaged part is read
    assert ok["moments_view"].tobytes() == want["moments"][0].tobytes()
    with pytest.raises(CorruptSampleError, match=r"part-000000.*synthetic-00000002.*moments/flip"):
        cache.read_parts(2, 1, clip=False, t5=True)
    with pytest.raises(CorruptSampleError, match=r"part-000000.*synthetic-00000002.*clip_rows"):
        cache.read_parts(2, 0, clip=True, t5=False)
    with pytest.raises(CorruptSampleError, match="synthetic-00000002"):
        cache[2]
    cache.read_parts(1, 1)  # its neighbours are intact
    cache.read_parts(3, 1)
