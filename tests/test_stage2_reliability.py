"""Stage-2 reliability (issue 11): a failing run exits, a damaged cache or checkpoint is caught before use and named,
config values are checked, metrics.jsonl shows each step once after a resume."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from test_stage2_common import ROOT, read_metrics, tiny_overrides, train_cmd, write_synthetic_cache

from shared.config import load_config
from stage2_train.config import TrainConfig, validate_config

# encoders.vae.config as stage 1 records it: what the manifest's vae_scaling_factor is checked against
VAE_FP = {"vae": {"class": "AutoencoderKL", "config": {"scaling_factor": 0.13025}}}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return write_synthetic_cache(tmp_path_factory.mktemp("rel") / "cache", n=12, encoders=VAE_FP)


def _cfg(cache: Path, run_dir: Path, **extra) -> TrainConfig:
    return load_config(TrainConfig, "configs/train/demo.yaml", tiny_overrides(cache, run_dir, **extra))


def _train(cfg: TrainConfig):
    from stage2_train.trainer import Trainer

    torch.set_num_threads(1)
    trainer = Trainer(cfg)
    try:
        return trainer.train()
    finally:
        trainer.close()


def run_bounded(args: list[str], timeout: float) -> tuple[int | None, str, float]:
    """Run in its own process group; on timeout kill the whole group (loader workers too). rc None = it hung."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    t0 = time.monotonic()
    proc = subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out, time.monotonic() - t0
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return None, out, time.monotonic() - t0


def copy_cache(cache: Path, dst: Path) -> Path:
    shutil.copytree(cache, dst)
    return dst


def flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def biggest_chunk(shard_dir: Path) -> Path:
    """The moments chunk of a zarr shard (its largest file): flipping a byte there damages sample data."""
    return max((p for p in shard_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


# ------------------------------------------------------------------------------------------ 1: a failing run exits


def test_failing_run_with_loader_workers_exits_promptly(cache, tmp_path):
    """An exception in the loop (here: max_bad_steps exceeded at once) with data.num_workers=1 used to print its
    traceback and then hang forever on the SIGTERM-ignoring worker."""
    args = train_cmd(
        *tiny_overrides(cache, tmp_path / "run", steps=25, max_bad_steps=0, **{"optim.lr": 1e30, "data.num_workers": 1})
    )
    rc, out, took = run_bounded(args, timeout=120)
    assert rc is not None, f"the run hung after its error ({took:.0f} s):\n{out[-2000:]}"
    assert rc == 1 and "non-finite" in out, out[-2000:]


# ------------------------------------------------------------------------------------------ 5: config values


@pytest.mark.parametrize(
    "override,key",
    [
        ("optim.lr=.inf", "optim.lr"),
        ("optim.lr=.nan", "optim.lr"),
        ("optim.grad_clip=-1", "optim.grad_clip"),
        ("data.num_workers=-1", "data.num_workers"),
        ("data.prefetch_factor=0", "data.prefetch_factor"),
        ("data.max_corrupt_samples=-1", "data.max_corrupt_samples"),
    ],
)
def test_bad_config_values_are_errors_naming_the_key(cache, tmp_path, override, key):
    cfg = load_config(TrainConfig, "configs/train/demo.yaml", tiny_overrides(cache, tmp_path) + [override])
    with pytest.raises(ValueError, match=re.escape(f"config {key}=")):
        validate_config(cfg)


def test_metrics_after_resume_show_each_step_once(cache, tmp_path):
    run = tmp_path / "run"
    _train(_cfg(cache, run, steps=6, **{"checkpoint.every": 4, "checkpoint.keep_last": 0}))
    shutil.rmtree(run / "checkpoints" / "step_0000006")  # as if killed after logging step 6, before saving it
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "lo')  # and a line torn by the kill
    _train(_cfg(cache, run, steps=6, **{"checkpoint.resume": "auto"}))
    assert [m["step"] for m in read_metrics(run)] == [1, 2, 3, 4, 5, 6]


# ------------------------------------------------------------------------------------------ 2: the cache is checked


def _damage_deleted(c: Path) -> str:
    shutil.rmtree(c / "shards" / "part-00001.zarr")
    return "part-00001"


def _damage_truncated(c: Path) -> str:
    f = biggest_chunk(c / "shards" / "part-00000.zarr")
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return "part-00000"


def _damage_swapped(c: Path) -> str:
    a, b = c / "shards" / "part-00000.zarr", c / "shards" / "part-00001.zarr"
    a.rename(c / "shards" / "tmp.zarr")
    b.rename(a)
    (c / "shards" / "tmp.zarr").rename(b)
    return "part-0000"


def _damage_scaling(c: Path) -> str:
    m = json.loads((c / "manifest.json").read_text())
    m["vae_scaling_factor"] = 0.18215
    (c / "manifest.json").write_text(json.dumps(m))
    return "vae_scaling_factor"


def _damage_empty_caption(c: Path) -> str:
    flip_byte(c / "empty_caption.safetensors", offset=(c / "empty_caption.safetensors").stat().st_size - 3)
    return "empty_caption.safetensors"


def _damage_dtype(c: Path) -> str:
    m = json.loads((c / "manifest.json").read_text())
    m["spec"]["t5_dtype"] = m["dtypes"]["t5"] = "float32"
    (c / "manifest.json").write_text(json.dumps(m))
    return "t5_states"


def _damage_views(c: Path) -> str:
    m = json.loads((c / "manifest.json").read_text())
    m["spec"]["views"] = m["views"] = ["plain"]
    (c / "manifest.json").write_text(json.dumps(m))
    return "first sample"


CACHE_DAMAGE = {
    "deleted shard": _damage_deleted,
    "truncated shard": _damage_truncated,
    "swapped shards": _damage_swapped,
    "edited vae_scaling_factor": _damage_scaling,
    "flipped byte in empty caption": _damage_empty_caption,
    "edited t5 dtype": _damage_dtype,
    "edited views": _damage_views,
}


@pytest.mark.parametrize("damage", sorted(CACHE_DAMAGE))
def test_damaged_cache_is_refused_at_start_naming_the_file(cache, tmp_path, damage):
    from stage2_train.trainer import Trainer

    c = copy_cache(cache, tmp_path / "cache")
    named = CACHE_DAMAGE[damage](c)
    with pytest.raises(ValueError, match=re.escape(named)) as err:
        Trainer(_cfg(c, tmp_path / "run"))
    assert "data.cache" in str(err.value)


def test_webdataset_index_offsets_past_the_file_are_refused(tmp_path):
    from stage2_train.trainer import Trainer

    c = write_synthetic_cache(tmp_path / "wds", n=12, fmt="webdataset", encoders=VAE_FP)
    from shared.manifest import shard_index_path
    from shared.shard_index import encode_index, read_index_columns

    index = shard_index_path(c, "part-00001")
    header, cols = read_index_columns(index)
    cols["member_offset"][2, 0] += 10**6  # same file size: only the offsets can tell
    index.write_bytes(encode_index(header["n_samples"], cols, header["fields"]))
    with pytest.raises(ValueError, match=r"part-00001.*offsets do not fit"):
        Trainer(_cfg(c, tmp_path / "run"))


def test_verify_compares_the_scaling_factor_with_the_vae_config(cache, tmp_path):
    from shared.verify import verify_cache

    c = copy_cache(cache, tmp_path / "cache")
    assert verify_cache(c, progress=False).ok
    _damage_scaling(c)
    rep = verify_cache(c, progress=False)
    assert not rep.ok and any("vae_scaling_factor" in e for e in rep.errors), rep


def test_full_verify_option_catches_a_flipped_sample_byte_before_training(cache, tmp_path):
    from stage2_train.trainer import Trainer

    c = copy_cache(cache, tmp_path / "cache")
    flip_byte(biggest_chunk(c / "shards" / "part-00001.zarr"))
    Trainer(_cfg(c, tmp_path / "a")).close()  # same size: the structural check cannot see it
    with pytest.raises(ValueError, match="part-00001"):
        Trainer(_cfg(c, tmp_path / "b", **{"data.verify": "full"}))


@pytest.mark.exact
def test_corrupt_sample_mid_run_is_replaced_counted_then_stops(cache, tmp_path):
    c = copy_cache(cache, tmp_path / "cache")
    flip_byte(biggest_chunk(c / "shards" / "part-00001.zarr"))
    # within the limit: trained to the end on substitutes, the same way twice
    _train(_cfg(c, tmp_path / "a", steps=6, **{"data.max_corrupt_samples": 1000}))
    _train(_cfg(c, tmp_path / "b", steps=6, **{"data.max_corrupt_samples": 1000}))
    la, lb = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [m["step"] for m in la] == list(range(1, 7))
    assert [m["loss"] for m in la] == [m["loss"] for m in lb]
    # over the limit, with a loader worker (the case that used to hang): a prompt exit naming shard and sample
    args = train_cmd(
        *tiny_overrides(c, tmp_path / "c", steps=6, **{"data.max_corrupt_samples": 0, "data.num_workers": 1})
    )
    rc, out, took = run_bounded(args, timeout=120)
    assert rc is not None, f"hung ({took:.0f} s):\n{out[-2000:]}"
    assert rc == 1 and re.search(r"shard 'part-00001' sample 'syn-\d+", out), out[-2000:]
    assert "data.max_corrupt_samples=0" in out


def test_substitute_comes_from_the_same_bucket_and_is_deterministic(cache, tmp_path):
    from shared.cache import open_cache
    from stage2_train.data import BucketBatchPlan, CacheDataset, DrawSettings

    reader = open_cache(cache)
    plan = BucketBatchPlan([tuple(b) for b in reader.meta["bucket"].tolist()], batch_size=2, world_size=1, seed=3)
    settings = DrawSettings(
        seed=3, random_flip=True, uncond_p=0.0, uncond_p_t5=0.0, num_timesteps=1000, scaling_factor=0.13025
    )

    class Broken(CacheDataset):
        def _read(self, index, *at):
            if index == 4:
                raise ValueError("crc32 mismatch")
            return super()._read(index, *at)

    ds = Broken(reader, settings, plan)
    a, b = ds[(7, 1, 4)], ds[(7, 1, 4)]
    assert a["corrupt"] and a["corrupt"][0][1] == reader.origin(4)[1]
    assert a["key"] == b["key"] != reader.origin(4)[1] and a["bucket"] == reader.bucket_of(4)
    assert torch.equal(a["moments"], b["moments"]) and a["seed"] == b["seed"]


# ------------------------------------------------------------------------------------------ 3: checkpoints


@pytest.fixture(scope="module")
def trained(cache, tmp_path_factory):
    """A run with checkpoints at steps 2 and 4."""
    run = tmp_path_factory.mktemp("ck") / "run"
    _train(_cfg(cache, run, steps=4, **{"checkpoint.every": 2, "checkpoint.keep_last": 0}))
    return run


def _copy_run(trained: Path, dst: Path) -> Path:
    shutil.copytree(trained, dst)
    return dst


def test_checkpoint_index_records_every_file(trained):
    state = json.loads((trained / "checkpoints" / "step_0000004" / "trainer_state.json").read_text())
    assert {
        "model.safetensors",
        "optimizer.safetensors",
        "ema.safetensors",
        "config.yaml",
        "rng/rank_00000.safetensors",
    } <= set(state["files"])
    assert all(len(v["sha256"]) == 64 for v in state["files"].values())


@pytest.mark.parametrize(
    "damage", ["flipped byte in model", "flipped byte in optimizer", "truncated optimizer", "deleted rng file"]
)
def test_resume_auto_skips_a_damaged_checkpoint(cache, trained, tmp_path, damage):
    from stage2_train.trainer import Trainer

    run = _copy_run(trained, tmp_path / "run")
    step4 = run / "checkpoints" / "step_0000004"
    if damage == "flipped byte in model":
        flip_byte(step4 / "model.safetensors")
    elif damage == "flipped byte in optimizer":
        flip_byte(step4 / "optimizer.safetensors")
    elif damage == "truncated optimizer":
        (step4 / "optimizer.safetensors").write_bytes((step4 / "optimizer.safetensors").read_bytes()[:50])
    else:
        (step4 / "rng" / "rank_00000.safetensors").unlink()
    t = Trainer(_cfg(cache, run, steps=4, **{"checkpoint.resume": "auto"}))
    t.close()
    assert t.step == 2  # the newest checkpoint that verifies


def test_explicit_resume_of_a_damaged_checkpoint_names_the_file(cache, trained, tmp_path):
    from stage2_train.checkpointing import CheckpointError
    from stage2_train.trainer import Trainer

    run = _copy_run(trained, tmp_path / "run")
    step4 = run / "checkpoints" / "step_0000004"
    f = step4 / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])  # a truncated header
    with pytest.raises(CheckpointError, match=re.escape(str(f))):
        Trainer(_cfg(cache, run, steps=4, **{"checkpoint.resume": str(step4)}))


def test_truncated_trainer_state_names_the_file_and_auto_falls_back(cache, trained, tmp_path):
    from stage2_train.checkpointing import CheckpointError
    from stage2_train.trainer import Trainer

    run = _copy_run(trained, tmp_path / "run")
    state = run / "checkpoints" / "step_0000004" / "trainer_state.json"
    state.write_text(state.read_text()[:40])
    with pytest.raises(CheckpointError, match=re.escape(str(state))):
        Trainer(_cfg(cache, run, steps=4, **{"checkpoint.resume": str(state.parent)}))
    t = Trainer(_cfg(cache, run, steps=4, **{"checkpoint.resume": "auto"}))
    t.close()
    assert t.step == 2
    # nothing verifies: an error, not a silent fresh start
    flip_byte(run / "checkpoints" / "step_0000002" / "model.safetensors")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        Trainer(_cfg(cache, run, steps=4, **{"checkpoint.resume": "auto"}))


@pytest.mark.parametrize("kind", ["garbage", "foreign"])
def test_init_from_damaged_or_foreign_file_names_it(cache, trained, tmp_path, kind):
    from safetensors.torch import save_file

    from stage2_train.trainer import Trainer

    f = tmp_path / "weights.safetensors"
    if kind == "garbage":
        f.write_bytes((trained / "checkpoints" / "step_0000004" / "model.safetensors").read_bytes()[:1000])
    else:
        save_file({"encoder.layer.0.weight": torch.zeros(3, 3)}, str(f))
    with pytest.raises(ValueError, match=re.escape(f"model.init_from={str(f)!r}")):
        Trainer(_cfg(cache, tmp_path / "run", **{"model.init_from": str(f)}))
