"""The manifest: written last and atomically, read back exactly, and the compatibility check stage 2 runs."""

from __future__ import annotations

import json

import pytest

from shared.inspection import write_synthetic_cache
from shared.manifest import Manifest, check_manifest, encoders_hash, read_manifest, write_manifest
from shared.schema import SCHEMA_VERSION, CacheSpec

SMALL = dict(clip_len=12, clip_dim=16, t5_len=24, t5_dim=20)
ENCODERS = {
    "vae": {"class": "AutoencoderKL", "weights": {"diffusion_pytorch_model.safetensors": "aa"}, "dtype": "float32"},
    "t5": {"class": "T5EncoderModel", "weights": {"model.safetensors": "bb"}, "dtype": "float16"},
}


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> tuple[Manifest, object]:
    root = tmp_path_factory.mktemp("cache")
    write_synthetic_cache(
        root,
        CacheSpec(format="webdataset", **SMALL),
        n_samples=3,
        n_shards=1,
        encoders=ENCODERS,
        scaling_factor=0.13025,
    )
    return read_manifest(root), root


def test_manifest_contents(manifest):
    m, root = manifest
    d = json.loads((root / "manifest.json").read_text())
    assert d["schema_version"] == SCHEMA_VERSION and d["format"] == "webdataset" and d["n_samples"] == 3
    assert d["text"] == {"clip_len": 12, "t5_len": 24, "clip_pad_id": 0, "t5_pad_id": 1}
    assert d["latent"]["channels"] == 4 and d["latent"]["downsample"] == 8 and d["vae_scaling_factor"] == 0.13025
    assert d["dtypes"] == {"vae": "float32", "clip": "float32", "t5": "float16"}
    assert d["encoders"] == ENCODERS and d["encoders_hash"] == encoders_hash(ENCODERS)
    s = d["shards"][0]
    assert s["name"] == "part-000000" and s["n_samples"] == 3 and len(s["sha256"]) == 64 and s["bytes"] > 0
    assert d["empty_caption"]["sha256"] and d["preprocessing"]["synthetic"] is True
    assert Manifest.from_dict(d).to_dict() == d


def test_compatible_passes(manifest):
    m, _ = manifest
    m.check_compatible(
        clip_len=12,
        t5_len=24,
        clip_dim=16,
        t5_dim=20,
        latent_channels=4,
        vae_scaling_factor=0.13025,
        encoders_hash=encoders_hash(ENCODERS),
        encoders=ENCODERS,
        views=("plain",),
        format="webdataset",
        t5_dtype="float16",
        downsample=8,
    )


@pytest.mark.parametrize(
    "expected, message",
    [
        (
            {"clip_len": 64},
            "cache has clip_len=12 but the model expects clip_len=64; re-encode or change model.clip_len",
        ),
        ({"t5_len": 256}, "cache has t5_len=24 but the model expects t5_len=256"),
        ({"clip_dim": 1024}, "cache has clip_dim=16 but the model expects clip_dim=1024"),
        ({"t5_dim": 2048}, "cache has t5_dim=20 but the model expects t5_dim=2048"),
        ({"latent_channels": 16}, "cache has latent_channels=4 but the model expects latent_channels=16"),
        (
            {"vae_scaling_factor": 0.18215},
            "cache has vae_scaling_factor=0.13025 but the model expects vae_scaling_factor=0.18215",
        ),
        ({"encoders_hash": "0" * 64}, "cache has encoders_hash="),
        ({"views": ["plain", "flip"]}, "cache has views=['plain'] but the model expects views=['plain', 'flip']"),
    ],
)
def test_mismatch_is_refused_with_its_name(manifest, expected, message):
    m, _ = manifest
    with pytest.raises(ValueError) as e:
        check_manifest(m, expected)
    assert message in str(e.value)


def test_every_mismatch_is_listed_and_encoders_compared(manifest):
    m, _ = manifest
    other = json.loads(json.dumps(ENCODERS))
    other["t5"]["weights"]["model.safetensors"] = "cc"
    with pytest.raises(ValueError) as e:
        m.check_compatible(clip_len=77, t5_len=256, encoders=other)
    msg = str(e.value)
    assert "clip_len=77" in msg and "t5_len=256" in msg
    assert "different 't5' encoder (differs in ['weights'])" in msg and "'vae'" not in msg
    with pytest.raises(ValueError, match="unknown keys \\['txt_len'\\]"):
        check_manifest(m, {"txt_len": 77})
    with pytest.raises(ValueError, match="unknown keys \\['encoder_hash', 'text_len'\\]"):  # the model's old names
        check_manifest(m, {"text_len": 12, "encoder_hash": "0" * 64})


def test_write_manifest_refuses_unfinished_shards_and_old_schema(manifest, tmp_path):
    m, root = manifest
    bad = Manifest(spec=m.spec, shards=m.shards + [{"name": "ghost", "n_samples": 1, "bytes": 1, "sha256": "x"}])
    with pytest.raises(ValueError, match="shard 'ghost' but it is not complete"):
        write_manifest(root, bad)
    d = m.to_dict()
    d["schema_version"] = 0
    with pytest.raises(ValueError, match="schema_version=0"):
        Manifest.from_dict(d)
    with pytest.raises(FileNotFoundError, match="cache is incomplete"):
        read_manifest(tmp_path)
