"""Stage-1 job end to end: embedded Ray, `ray job submit` to a real `ray start` cluster, determinism with 1 and 2
encoder actors, SIGKILL + resume, a bad-input battery, schema errors and config conflicts.

One `ray start --head` cluster (own ports, own --temp-dir, own process group) serves every test that needs a
cluster; teardown kills only that process group (`ray stop` would stop every Ray on the machine).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pipeline.text import DEFAULT_CAPTION
from shared.manifest import completed_shards, read_manifest
from stage1_encode import job as job_mod
from stage1_encode import preprocess as pp
from stage1_encode import preprocess_task

REPO = Path(__file__).resolve().parents[1]
DEMO_CFG = REPO / "configs" / "encode" / "demo.yaml"
ENV = dict(
    os.environ,
    RAY_AUTH_MODE="disabled",
    RAY_USAGE_STATS_ENABLED="0",
    TOKENIZERS_PARALLELISM="false",
    PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    PYTHONPATH=str(REPO),
)


def shared_tiny_suite(tmp_path_factory) -> Path:
    """One tiny encoder suite per pytest session (test_preprocess.py reuses the same folder)."""
    root = tmp_path_factory.getbasetemp() / "stage1_tiny_suite" / "t2i"
    if not (root.parent / "done").exists():
        from pipeline.tiny_suite import write_tiny_suite

        write_tiny_suite(root, seed=0, overwrite=True)
        (root.parent / "done").write_text("ok")
    return root


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> Path:
    return shared_tiny_suite(tmp_path_factory)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    from stage1_encode.demo_corpus import write_demo_corpus

    # 24 rows in two arrow files, row 7 a truncated image; 6 rows per shard -> 4 partitions
    return write_demo_corpus(tmp_path_factory.mktemp("corpus"), n=24, seed=3, rows_per_file=12)


def overrides(corpus: dict, suite: Path, out: Path, **extra) -> list[str]:
    base = {
        "input.paths": f"[{corpus['arrow_dir']}]",
        "encoders.root": str(suite),
        "output.root": str(out),
        "output.rows_per_shard": 6,
        "encoders.batch_size": 4,
        "image.resolution": 64,
        "image.reso_step": 16,
        "image.min_size": 32,  # scaled down with the resolution (demo.yaml: 64 for base 256); the corpus' least is 38
        "ray.num_cpus": 3,
        "ray.preprocess_num_cpus": 0.25,
        "ray.num_cpus_per_actor": 0.5,
        "ray.torch_threads": 1,
        "ray.object_store_memory_gb": 0.3,
        "ray.actor_memory_gb": 0.2,
        "ray.writer_num_cpus": 0.25,
        "log.interval_s": 2,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def cli(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "stage1_encode", "--config", str(DEMO_CFG), *args],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        **kw,
    )


def load_cfg(args: list[str]):
    from shared.config import load_config
    from stage1_encode.config import EncodeConfig

    return load_config(EncodeConfig, DEMO_CFG, args)


def cache_content(root: Path) -> dict:
    """Everything that must be bit-identical between two caches of the same input and config."""
    from shared.cache import open_cache, read_empty_caption

    m = read_manifest(root)
    cache = open_cache(root)
    samples = {}
    for i in range(len(cache)):
        s = cache[i]
        samples[s["key"]] = {
            k: (v.tobytes(), v.dtype.str, v.shape) if isinstance(v, np.ndarray) else v for k, v in s.items()
        }
    return {
        "shards": [(s["name"], s["n_samples"], s["sha256"], s["index_sha256"]) for s in m.shards],
        "samples": samples,
        "rejects": (root / "rejects.jsonl").read_text(),
        "empty": {k: v.tobytes() for k, v in read_empty_caption(root).items()},
        "empty_sha256": m.empty_caption_sha256,  # the file is byte-deterministic (one safetensors metadata key)
        "encoders": m.encoders_hash,
        "manifest_rejects": m.rejects,
    }


def assert_same_cache(a: Path, b: Path) -> None:
    ca, cb = cache_content(a), cache_content(b)
    assert ca["shards"] == cb["shards"]
    assert sorted(ca["samples"]) == sorted(cb["samples"])
    for key in ca["samples"]:
        assert ca["samples"][key] == cb["samples"][key], key
    assert ca == cb


# ----------------------------------------------------------------------------------------------------------------------
# the cluster


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# `ray start` flags of every port a node opens: the tests give each one a free loopback port (no clash with a
# cluster the machine already runs)
RAY_PORT_FLAGS = (
    "port",
    "dashboard-port",
    "object-manager-port",
    "node-manager-port",
    "ray-client-server-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "runtime-env-agent-port",
    "metrics-export-port",
)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    names = RAY_PORT_FLAGS
    ports = {}
    while len(set(ports.values())) < len(names):
        ports = {n: _free_port() for n in names}
    temp_dir = tmp_path_factory.mktemp("raytmp")
    cmd = [
        str(Path(sys.executable).parent / "ray"),
        "start",
        "--head",
        "--block",
        "--node-ip-address",
        "127.0.0.1",
        "--num-cpus",
        "2",
        "--include-dashboard=true",
        "--dashboard-host",
        "127.0.0.1",
        "--temp-dir",
        str(temp_dir),
        "--object-store-memory",
        str(400 * 1024**2),
        "--disable-usage-stats",
    ]
    for name, port in ports.items():
        cmd += [f"--{name}", str(port)]
    log = open(temp_dir / "ray_start.log", "w")
    # Own session = own process group: teardown kills exactly this cluster's processes.
    proc = subprocess.Popen(cmd, env=ENV, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    dashboard = f"http://127.0.0.1:{ports['dashboard-port']}"
    deadline = time.time() + 180
    while True:
        try:
            urllib.request.urlopen(dashboard + "/api/version", timeout=2)
            break
        except Exception:
            if proc.poll() is not None or time.time() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                pytest.fail("ray start failed:\n" + (temp_dir / "ray_start.log").read_text()[-3000:])
            time.sleep(1)
    yield {"address": f"127.0.0.1:{ports['port']}", "dashboard": dashboard}
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=5)
    except Exception:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    log.close()


@pytest.fixture(scope="module")
def reference(corpus, suite, tmp_path_factory) -> Path:
    """The uninterrupted run, through the CLI on an embedded local Ray."""
    out = tmp_path_factory.mktemp("ref") / "cache"
    r = cli(overrides(corpus, suite, out, **{"ray.num_writers": 1}))  # 1 actor, 1 writer
    assert r.returncode == 0, r.stderr[-4000:]
    summary = json.loads(r.stdout)
    assert summary["status"] == "complete"
    return out


# ----------------------------------------------------------------------------------------------------------------------
# tests


@pytest.mark.exact
@pytest.mark.slow
def test_embedded_local_run(reference, corpus):
    m = read_manifest(reference)
    n = corpus["n"]
    bad = set(corpus["bad_rows"])  # row 7: truncated image
    assert m.n_samples == n - len(bad)
    assert m.rejects == {"decode_error": 1}
    rejects = [json.loads(line) for line in (reference / "rejects.jsonl").read_text().splitlines()]
    assert [(r["row"], r["reason"]) for r in rejects] == [(7, "decode_error")]
    assert m.spec.views == ("plain", "flip")
    assert len(m.shards) == 4 and m.encoders and m.vae_scaling_factor == pytest.approx(0.13025)
    assert (reference / "encode.log").read_text().count("summary:") == 1
    from shared.cache import open_cache

    cache = open_cache(reference)
    keys = cache.keys()
    assert len(set(keys)) == len(keys) == m.n_samples
    s = cache[0]
    H, W = (int(x) for x in s["bucket"])
    assert s["moments"].shape == (2, 8, H // 8, W // 8)
    assert tuple(s["image_meta_size"][2:4]) == (W, H)
    assert (H, W) in pp.resolution_buckets(64, 16)


@pytest.mark.slow
def test_finished_cache_left_alone_and_conflicts_refused(reference, corpus, suite, capsys):
    from stage1_encode.__main__ import main

    before = (reference / "manifest.json").read_bytes()
    # same identity, different runtime section: nothing to do, no Ray needed
    summary = job_mod.run(load_cfg(overrides(corpus, suite, reference, **{"ray.num_encoder_actors": 2})))
    assert summary["status"] == "already complete"
    assert (reference / "manifest.json").read_bytes() == before
    with pytest.raises(job_mod.CacheConflictError, match=r"image\.seed: 0 -> 5"):
        job_mod.run(load_cfg(overrides(corpus, suite, reference, **{"image.seed": 5})))
    rc = main(["--config", str(DEMO_CFG), *overrides(corpus, suite, reference, **{"encoders.batch_size": 3})])
    err = capsys.readouterr().err
    assert rc == 2 and "encoders.batch_size: 4 -> 3" in err and "--overwrite" in err
    assert (reference / "manifest.json").read_bytes() == before
    # a folder that is not a cache is never written into, even with --overwrite
    other = reference.parent / "not_a_cache"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    with pytest.raises(job_mod.CacheConflictError, match="not a stage-1 cache"):
        job_mod.run(load_cfg(overrides(corpus, suite, other)), overwrite=True)
    assert (other / "precious.txt").read_text() == "keep me"


@pytest.mark.exact
@pytest.mark.slow
def test_job_submit_two_actors_bit_identical(cluster, reference, corpus, suite, tmp_path):
    """`ray job submit` to a `ray start` cluster with 2 encoder actors, 2 shard writers and one chunk per item
    (`ray.item_mb` below one chunk's pixels) = the embedded run with 1 actor, 1 writer and a whole partition per
    item, bit for bit (each shard's writer takes its chunks in chunk order, and each chunk is encoded on its own).

    Exact by construction, not by luck of this CPU: a chunk's samples come from the data alone (bucket, row order,
    `encoders.batch_size`; see stage1_encode/job.py), every actor runs one torch thread, so both runs make the same
    encoder calls with the same shapes and contiguous layouts, and the same kernels compute the same bits."""
    out = tmp_path / "cache"
    cmd = [
        str(Path(sys.executable).parent / "ray"),
        "job",
        "submit",
        "--address",
        cluster["dashboard"],
        "--working-dir",
        str(REPO),
        "--",
        "python",
        "-m",
        "stage1_encode",
        "--config",
        "configs/encode/demo.yaml",
        *overrides(corpus, suite, out, **{"ray.num_encoder_actors": 2, "ray.num_writers": 2, "ray.item_mb": "0.0001"}),
    ]
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert '"status": "complete"' in r.stdout
    assert_same_cache(reference, out)


def _kill_when(proc: subprocess.Popen, ready, log: Path, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, "the job ended before the kill point: " + log.read_text()[-3000:]
        assert time.time() < deadline, "kill point never reached"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.exact
@pytest.mark.slow
def test_sigkill_and_resume(cluster, reference, corpus, suite, tmp_path):
    out = tmp_path / "cache"
    args = overrides(corpus, suite, out) + ["--address", cluster["address"]]
    base = [sys.executable, "-m", "stage1_encode", "--config", str(DEMO_CFG)]

    log = tmp_path / "driver.log"  # a file, not a pipe: a full pipe would stall the driver before the kill point

    def start() -> subprocess.Popen:
        with open(log, "w") as f:
            return subprocess.Popen(base + args, cwd=REPO, env=ENV, stdout=f, stderr=subprocess.STDOUT)

    # 1) killed right after the job wrote its config, before any shard
    proc = start()
    _kill_when(proc, lambda: (out / "encode_config.yaml").exists(), log)
    assert not (out / "manifest.json").exists()

    # 2) killed after the first shard completed
    proc = start()
    _kill_when(proc, lambda: len(completed_shards(out)) >= 1, log)
    first = set(completed_shards(out))
    assert 1 <= len(first) < 4 and not (out / "manifest.json").exists()

    # 3) the same command (here with 1 shard writer instead of 2: a runtime setting) finishes only what is missing
    r = subprocess.run(
        base + args + ["ray.num_writers=1"], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=400
    )
    assert r.returncode == 0, r.stderr[-4000:]
    summary = json.loads(r.stdout)
    assert summary["shards_this_run"] == 4 - len(first)
    assert_same_cache(reference, out)


@pytest.mark.exact
@pytest.mark.slow
def test_sigkill_a_writer_and_resume(cluster, reference, corpus, suite, tmp_path, monkeypatch):
    """A shard writer SIGKILLed mid-shard (test hook KILL_ENV: the writer kills its own process after 2 samples)
    leaves nothing visible of its shard. With ray.writer_retries=0 the job fails naming the shard; the rerun (whose
    writer of that shard is killed once more, and rerun by Ray, and whose first encoder actor to take a chunk is
    SIGKILLed at that call, then restarted by Ray with the call retried) completes: 0 lost, 0 duplicated,
    bit-identical."""
    from shared.manifest import shard_data_path, shard_sidecar_path
    from stage1_encode.encoder_actor import KILL_ENV as KILL_ENCODER_ENV
    from stage1_encode.shard_writer import KILL_ENV

    out = tmp_path / "cache"
    fmt = read_manifest(reference).format
    victim = read_manifest(reference).shards[1]["name"]
    args = {"ray.num_writers": 2, "ray.num_encoder_actors": 2}
    monkeypatch.setenv(KILL_ENV, f"{victim}:2:{tmp_path / 'killed-1'}")
    with pytest.raises(RuntimeError, match=rf"the writer of shard {victim} died"):
        job_mod.run(
            load_cfg(overrides(corpus, suite, out, **args, **{"ray.writer_retries": 0})), address=cluster["address"]
        )
    assert (tmp_path / "killed-1").exists()  # the kill happened, mid-shard
    first = set(completed_shards(out))
    assert victim not in first and not (out / "manifest.json").exists()
    assert not shard_data_path(out, victim, fmt).exists() and not shard_sidecar_path(out, victim).exists()

    monkeypatch.setenv(KILL_ENV, f"{victim}:2:{tmp_path / 'killed-2'}")
    # the victim's shard is encoded again in this run, so at least one encode call happens: the first one dies
    monkeypatch.setenv(KILL_ENCODER_ENV, f"1:{tmp_path / 'killed-encoder'}")
    summary = job_mod.run(load_cfg(overrides(corpus, suite, out, **args)), address=cluster["address"])
    assert (tmp_path / "killed-2").exists() and summary["status"] == "complete"
    assert (tmp_path / "killed-encoder").exists()  # an encoder actor's process was SIGKILLed mid-job
    assert summary["shards_this_run"] == 4 - len(first)
    assert not list((out / "shards").glob(".tmp-*"))
    assert_same_cache(reference, out)  # every key once, every byte equal


@pytest.mark.slow
def test_copied_cache_resumes_in_its_new_place(cluster, reference, corpus, suite, tmp_path):
    """Where a cache (or the encoder folder) is stored is not what it holds: a copy resumes there, encoding only the
    missing shards, and the rerun removes the .tmp leftovers of the killed run."""
    from shared.manifest import shard_data_path, shard_sidecar_path

    moved = tmp_path / "moved"
    shutil.copytree(reference, moved)
    assert job_mod.run(load_cfg(overrides(corpus, suite, moved)))["status"] == "already complete"

    partial = tmp_path / "partial"
    shutil.copytree(reference, partial)
    for name in ("manifest.json", "rejects.jsonl"):
        (partial / name).unlink()
    fmt = read_manifest(reference).format
    names = sorted(completed_shards(partial))
    dropped = names[1:3]
    for n in dropped:
        shard_data_path(partial, n, fmt).unlink()
        shard_sidecar_path(partial, n).unlink()
    leftover = partial / "shards" / f".tmp-{shard_data_path(partial, dropped[0], fmt).name}-4242-0badf00d"
    leftover.write_bytes(b"half a shard from a killed run")
    kept = {n: shard_data_path(partial, n, fmt).stat().st_mtime_ns for n in names if n not in dropped}
    suite_copy = tmp_path / "encoders" / "t2i"
    shutil.copytree(suite, suite_copy)
    r = cli(overrides(corpus, suite_copy, partial) + ["--address", cluster["address"]])  # no second Ray start-up
    assert r.returncode == 0, r.stderr[-4000:]
    summary = json.loads(r.stdout)
    assert summary["status"] == "complete" and summary["shards_this_run"] == len(dropped)
    assert {n: shard_data_path(partial, n, fmt).stat().st_mtime_ns for n in kept} == kept  # not re-encoded
    assert not leftover.exists() and not list((partial / "shards").glob(".tmp-*"))
    assert_same_cache(reference, partial)


def test_a_writer_removes_dead_writers_temp_files_from_its_node_staging(tmp_path):
    """An s3:// cache's per-node staging folder: a writer SIGKILLed there leaves temp files that no later writer of
    its shard removes (Ray may rerun it on another node). Each writer removes the temp files whose pid is dead on its
    machine, and keeps those of live writers and everything that is not a temp name. The folder is per machine, so a
    staging_dir on a shared filesystem never has another machine's pids checked here."""
    from shared.fsutil import remove_dead_tmp_leftovers

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    folder = tmp_path / "shards"
    folder.mkdir()
    gone = [
        folder / f".tmp-00000-00000004.tar-{dead.pid}-0badf00d",
        folder / f".tmp-00000-00000004.zarr-{dead.pid}-abcdef01",
    ]
    gone[0].write_bytes(b"half a shard")
    (gone[1] / "moments").mkdir(parents=True)
    kept = [
        folder / f".tmp-00000-00000008.tar-{os.getpid()}-0badf00d",
        folder / "00000-00000000.tar",
        folder / ".tmp-by-hand",
    ]
    for p in kept:
        p.write_bytes(b"x")
    assert sorted(remove_dead_tmp_leftovers(folder)) == sorted(gone)
    assert not any(p.exists() for p in gone) and all(p.exists() for p in kept)

    cfg = load_cfg(["output.root=s3://bucket/cache", f"storage.staging_dir={tmp_path / 'staging'}"])
    assert job_mod.staging_root(cfg).name.endswith("-" + socket.gethostname())


def test_one_job_per_cache_and_a_rerun_removes_only_its_own_leftovers(tmp_path):
    root = tmp_path / "cache"
    cfg = load_cfg([f"output.root={root}"])
    state, lock = job_mod.prepare_output(root, cfg, False)
    assert state == "fresh"
    with pytest.raises(job_mod.CacheConflictError, match="another stage-1 job is writing"):
        job_mod.prepare_output(root, cfg, False)
    lock.release()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("keep")
    (root / "shards").mkdir()
    (root / "partitions").mkdir()
    ours = [
        root / "shards" / ".tmp-00000-00000000.tar-4242-0123abcd",
        root / ".tmp-manifest.json-17-89abcdef",
        root / "partitions" / ".tmp-00000-00000000.json-3-00000000",
        root / ".encode_config.yaml.tmp",
    ]
    for p in ours:
        p.write_bytes(b"half")
    zarr_tmp = root / "shards" / ".tmp-00000-00000006.zarr-99-deadbeef"
    (zarr_tmp / "moments" / "c").mkdir(parents=True)
    (zarr_tmp / "moments" / "c" / "0").write_bytes(b"chunk")
    link = root / "shards" / ".tmp-00000-00000012.zarr-5-abcdef01"
    link.symlink_to(outside, target_is_directory=True)  # unlinked, never followed
    others = [
        root / "shards" / ".tmp-made-by-hand",
        root / "shards" / "notes.txt",
        tmp_path / ".tmp-x.tar-1-00000000",
    ]  # not a temp name of ours / not in the cache folder
    for p in others:
        p.write_bytes(b"not ours")
    state, lock = job_mod.prepare_output(root, cfg, False)
    try:
        assert state == "resume"
        assert sorted(job_mod.remove_leftovers(root)) == sorted(ours + [zarr_tmp, link])
    finally:
        lock.release()
    assert not any(p.exists() or p.is_symlink() for p in ours + [zarr_tmp, link])
    assert all(p.exists() for p in others) and (outside / "precious").read_text() == "keep"

    # a cache written before input.allowed_roots existed (its saved config lacks the key) still resumes
    import yaml

    saved = yaml.safe_load((root / "encode_config.yaml").read_text())
    del saved["input"]["allowed_roots"], saved["input"]["allow_outside_paths"]
    (root / "encode_config.yaml").write_text(yaml.safe_dump(saved))
    state, lock = job_mod.prepare_output(root, cfg, False)
    lock.release()
    assert state == "resume"


def _img_bytes(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


@pytest.mark.slow
def test_bad_input_battery(cluster, suite, tmp_path):
    rng = np.random.default_rng(0)
    noise = lambda w, h: Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))  # noqa: E731
    jpeg = _img_bytes(noise(80, 60), "JPEG")
    folder = tmp_path / "imgs"
    folder.mkdir()
    rgba = noise(70, 50).convert("RGBA")
    cases = [  # (name, bytes or None for a missing file, caption, expected reason or None = good)
        ("good_png", _img_bytes(noise(64, 64), "PNG"), "一只红色的猫", None),
        ("good_jpeg", jpeg, "a blue square", None),
        ("cmyk", _img_bytes(noise(60, 80).convert("CMYK"), "JPEG"), "青色", None),
        ("palette", _img_bytes(noise(64, 48).convert("P", palette=Image.ADAPTIVE), "PNG"), "调色板", None),
        (
            "sixteen_bit",
            _img_bytes(Image.fromarray((rng.integers(0, 65535, (40, 56))).astype(np.uint16)), "PNG"),
            "16 bit",
            None,
        ),
        ("rgba", _img_bytes(rgba, "PNG"), "透明", None),
        ("empty_caption", _img_bytes(noise(48, 48), "PNG"), "   ", None),
        ("null_caption", _img_bytes(noise(48, 40), "PNG"), None, None),
        ("corrupt", b"\x89PNG\r\n\x1a\n" + bytes(rng.integers(0, 256, 200, dtype=np.uint8)), "x", "decode_error"),
        ("truncated", jpeg[: len(jpeg) // 2], "x", "decode_error"),
        ("empty_bytes", b"", "x", "decode_error"),
        ("unknown_format", b"this is a text file, not an image", "x", "decode_error"),
        ("bomb", _img_bytes(Image.new("L", (1500, 1500), 0), "PNG"), "x", "pixel_limit"),
        ("too_small", _img_bytes(noise(6, 40), "PNG"), "x", "too_small"),
        ("extreme_aspect", _img_bytes(noise(300, 20), "PNG"), "x", "aspect_ratio"),
        ("int_caption", _img_bytes(noise(48, 48), "PNG"), 12345, "bad_caption"),
        ("list_caption", _img_bytes(noise(48, 48), "PNG"), ["a", "b"], "bad_caption"),
        ("missing_file", None, "x", "read_error"),
        # never read, whatever they hold: outside the list's folder, or not a regular file
        ("outside_relative", None, "x", "outside_roots"),
        ("outside_absolute", None, "x", "outside_roots"),
        ("symlink_out", None, "x", "outside_roots"),
        ("broken_symlink", None, "x", "broken_symlink"),
        ("fifo", None, "x", "not_regular_file"),
    ]
    outside = tmp_path.parent / f"{tmp_path.name}_outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(_img_bytes(noise(64, 64), "PNG"))  # a good image: read, it would be encoded
    (folder / "symlink_out.bin").symlink_to(outside / "secret.png")
    (folder / "broken_symlink.bin").symlink_to(folder / "gone.bin")
    os.mkfifo(folder / "fifo.bin")  # opening it for reading would block the job forever
    special = {"outside_relative": f"../{outside.name}/secret.png", "outside_absolute": str(outside / "secret.png")}
    lines = []
    for name, data, caption, _ in cases:
        if data is not None:
            (folder / f"{name}.bin").write_bytes(data)
        img_path = special.get(name, f"imgs/{name}.bin")
        lines.append(json.dumps({"img_path": img_path, "text_zh": caption}, ensure_ascii=False))
    (tmp_path / "list.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "cache"
    cfg = load_cfg(
        [
            "input.format=jsonl",
            f"input.paths=[{tmp_path / 'list.jsonl'}]",
            "input.md5_column=null",
            f"encoders.root={suite}",
            f"output.root={out}",
            "output.rows_per_shard=10",
            "output.format=zarr",
            "encoders.batch_size=3",
            "image.resolution=64",
            "image.reso_step=16",
            "image.min_size=8",
            "image.max_aspect_ratio=8",
            "image.max_pixels=1000000",
            "image.random_flip=false",
            "ray.preprocess_num_cpus=0.25",
            "ray.num_cpus_per_actor=0.5",
            "ray.torch_threads=1",
            "ray.actor_memory_gb=0.2",
        ]
    )
    summary = job_mod.run(cfg, address=cluster["address"])
    assert summary["status"] == "complete"
    good = [name for name, _, _, why in cases if why is None]
    bad = {name: why for name, _, _, why in cases if why is not None}
    from shared.cache import open_cache

    cache = open_cache(out)
    assert len(cache) == len(good)
    rows = {json.loads(line)["row"]: json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()}
    for i, (name, _, _caption, why) in enumerate(cases):
        if why is None:
            continue
        assert rows[i]["reason"] == why, (name, rows[i])
        assert rows[i]["source"] and rows[i]["detail"] is not None
    assert len(rows) == len(bad)
    assert summary["rejected"] == {r: list(bad.values()).count(r) for r in set(bad.values())}
    assert summary["substituted_captions"] == 2
    assert summary["null_captions"] == 1 and summary["null_caption_rule"] == "default"
    captions = sorted(cache[i]["caption"] for i in range(len(cache)))
    assert captions.count(DEFAULT_CAPTION) == 2
    m = read_manifest(out)
    assert m.extra["substituted_captions"] == 2 and m.spec.views == ("plain",) and m.format == "zarr"
    assert m.extra["null_captions"] == 1 and m.preprocessing["text"]["null_caption"] == "default"


@pytest.mark.parametrize("rule, null_becomes", [("default", DEFAULT_CAPTION), ("original", "None"), ("reject", None)])
def test_null_caption_rule(suite, tmp_path, rule, null_becomes):
    """text.null_caption: the default caption (default), the original's text "None", or a reject; always counted."""
    img = _img_bytes(Image.new("RGB", (64, 64), (200, 30, 30)), "PNG")
    (tmp_path / "a.png").write_bytes(img)
    rows = [
        {"img_path": "a.png", "text_zh": "红色"},
        {"img_path": "a.png", "text_zh": None},
        {"img_path": "a.png", "text_zh": " "},
    ]
    (tmp_path / "list.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    cfg = load_cfg(
        [
            "input.format=jsonl",
            f"input.paths=[{tmp_path / 'list.jsonl'}]",
            "input.md5_column=null",
            f"encoders.root={suite}",
            f"output.root={tmp_path / 'c'}",
            "image.resolution=64",
            "image.reso_step=16",
            f"text.null_caption={rule}",
        ]
    )
    from stage1_encode.readers import plan_partitions

    got = list(job_mod.partition_chunks(plan_partitions(cfg.input, 10)[0], cfg, pp.load_tokenizers(str(suite))))
    by_row = {r: (c, n) for _, _, m in got[:-1] for r, c, n in zip(m["rows"], m["captions"], m["null"])}
    assert by_row[0] == ("红色", False) and by_row[2] == (DEFAULT_CAPTION, False)
    rejects = got[-1][2]["rejects"]
    if null_becomes is None:
        assert 1 not in by_row and [(r["row"], r["reason"]) for r in rejects] == [(1, "null_caption")]
    else:
        assert by_row[1] == (null_becomes, True) and not rejects
    assert job_mod.preprocessing_record(cfg)["text"]["null_caption"] == rule


def test_schema_errors_stop_early(suite, tmp_path):
    # a caption column that does not exist: ValueError naming the file and the column, before any Ray starts
    table = pa.table({"image": [b"x"], "md5": ["0" * 32], "caption": ["a"]})
    path = tmp_path / "00000.arrow"
    with pa.OSFile(str(path), "wb") as sink, pa.RecordBatchFileWriter(sink, table.schema) as w:
        w.write_table(table)
    base = [f"input.paths=[{path}]", f"encoders.root={suite}", f"output.root={tmp_path / 'c'}"]
    with pytest.raises(ValueError) as e:
        job_mod.run(load_cfg(base))
    assert "00000.arrow" in str(e.value) and "text_zh" in str(e.value)
    bad = tmp_path / "bad" / "00001.arrow"
    bad.parent.mkdir()
    bad.write_bytes(b"not arrow at all")
    with pytest.raises(ValueError, match="00001.arrow"):
        job_mod.run(load_cfg([f"input.paths=[{bad}]", f"encoders.root={suite}", f"output.root={tmp_path / 'c'}"]))
    with pytest.raises(FileNotFoundError, match="sdxl-vae-fp16-fix"):
        job_mod.run(load_cfg([f"input.paths=[{path}]", f"encoders.root={tmp_path}", f"output.root={tmp_path / 'c'}"]))
    assert not (tmp_path / "c").exists()


def test_chunks_are_bucket_pure_in_row_order(suite, corpus):
    cfg = load_cfg(overrides(corpus, suite, Path("/nonexistent"), **{"output.rows_per_shard": 12}))
    from stage1_encode.readers import plan_partitions

    parts = plan_partitions(cfg.input, 12)
    toks = pp.load_tokenizers(str(suite))
    got = list(job_mod.partition_chunks(parts[0], cfg, toks))
    assert got[-1][0] == "end" and got[-1][2]["n_chunks"] == len(got) - 1
    seen = []
    for _kind, arrays, meta in got[:-1]:
        H, W = meta["bucket"]
        assert arrays["pixels"].shape[1:] == (H, W, 3) and 1 <= len(meta["keys"]) <= 4
        assert meta["rows"] == sorted(meta["rows"])
        seen += meta["rows"]
    assert sorted(seen + [r["row"] for r in got[-1][2]["rejects"]]) == list(range(12))
    again = list(job_mod.partition_chunks(parts[0], cfg, toks))
    assert [m for _, _, m in again] == [m for _, _, m in got]


def test_lost_and_crashing_rows_become_rejects(suite, corpus, monkeypatch):
    """A row the reader drops and rows whose processing raises something other than Reject are recorded."""
    cfg = load_cfg(overrides(corpus, suite, Path("/nonexistent"), **{"output.rows_per_shard": 12}))
    from stage1_encode.readers import plan_partitions

    part = plan_partitions(cfg.input, 12)[0]
    real_read, real_crop = preprocess_task.read_partition, pp.crop_to_target

    def lossy_read(p, icfg, storage=None):
        for row in real_read(p, icfg, storage):
            if row["row"] == 3:
                continue  # lost between planning and reading
            yield {k: v for k, v in row.items() if k != "caption"} if row["row"] == 5 else row

    def crashing_crop(img, key, im, target):
        if key.split("-")[-2] == "00000008":
            raise RuntimeError("boom")
        return real_crop(img, key, im, target)

    monkeypatch.setattr(preprocess_task, "read_partition", lossy_read)
    monkeypatch.setattr(pp, "crop_to_target", crashing_crop)
    got = list(job_mod.partition_chunks(part, cfg, pp.load_tokenizers(str(suite))))
    end = got[-1][2]
    written = [r for _, _, m in got[:-1] for r in m["rows"]]
    why = {r["row"]: (r["reason"], r["detail"]) for r in end["rejects"]}
    assert sorted(written + list(why)) == list(range(12)) and end["n_rows"] == 12
    assert why[3][0] == "read_error" and "planned but not returned" in why[3][1]
    assert why[5] == ("preprocess_error", "KeyError: 'caption'")
    assert why[7][0] == "decode_error" and why[8] == ("preprocess_error", "RuntimeError: boom")


def test_tokenizer_pad_ids_are_checked_against_the_manifest(tmp_path):
    import torch

    from shared.schema import CacheSpec

    spec = CacheSpec(clip_len=4, clip_dim=2, t5_len=4, t5_dim=2)
    dims = {"latent_channels": 4, "downsample": 8, "clip_dim": 2, "t5_dim": 2}
    arrays = {
        "clip_ids": torch.tensor([[101, 102, 5, 5]]),
        "clip_mask": torch.tensor([[True, True, False, False]]),
        "t5_ids": torch.tensor([[1, 1, 1, 1]]),
        "t5_mask": torch.tensor([[True, False, False, False]]),
    }
    with pytest.raises(ValueError, match=r"clip tokenizer .* pads with ids \[5\] .* clip_pad_id=0"):
        job_mod._accept_encoders(tmp_path, spec, dims, arrays, dict(dims))
    assert not list(tmp_path.iterdir())  # refused before anything was written


def test_non_utf8_file_names_travel_and_are_recorded(tmp_path):
    import pyarrow as pa

    source = "/data/imgs/caf\udce9.jpg"  # a Latin-1 file name as os.listdir returns it (surrogateescape)
    from stage1_encode.payload import make_item, read_item

    item = make_item("chunk", {}, {"sources": [source], "captions": ["猫"]})
    pa.array([item[2]])  # ASCII JSON: valid UTF-8 wherever it travels
    assert read_item(item)[2]["sources"] == [source]
    part = job_mod.Partition(name="p", source=source, source_stem="p", start=0, stop=1)
    (tmp_path / job_mod.PARTS_DIR).mkdir()
    note = {
        "name": "p",
        "written": 0,
        "substituted_captions": 0,
        "rejects": [{"key": None, "source": source, "row": 0, "reason": "read_error", "detail": source}],
    }
    (tmp_path / job_mod.PARTS_DIR / "p.json").write_text(json.dumps(note))
    counts, _ = job_mod._merge_notes(tmp_path, [part])
    assert counts == {"read_error": 1}
    assert json.loads((tmp_path / "rejects.jsonl").read_text("utf-8"))["source"] == source


def test_nonfinite_outputs_are_rejected(tmp_path):
    """The encoder actor returns raw outputs; the shard writer rejects a sample with inf/NaN in any stored field."""
    import torch

    from shared.schema import CacheSpec
    from stage1_encode.shard_writer import ShardAssembler

    class FakeEncoders:
        def encode_images(self, x):
            out = torch.zeros(x.shape[0], 8, x.shape[2] // 8, x.shape[3] // 8)
            out[2, 0, 0, 0] = float("nan")  # sample 1 (views 2, 3) gets a NaN in its plain view
            return out

        def encode_clip(self, ids, mask):
            return torch.zeros(ids.shape[0], ids.shape[1], 4)

        def encode_t5(self, ids, mask):
            out = torch.zeros(ids.shape[0], ids.shape[1], 4, dtype=torch.float16)
            out[2, -1, 0] = float("inf")  # sample 2: inf in a padded mT5 row still counts (the pooler reads it)
            return out

    actor = object.__new__(job_mod.EncoderActor)
    actor.enc, actor.views = FakeEncoders(), ("plain", "flip")
    B = 4
    arrays = {
        "pixels": torch.zeros(B, 16, 16, 3, dtype=torch.uint8),
        "image_meta_size": torch.tensor([[16, 16, 16, 16, 0, 0]] * B, dtype=torch.int32),
        "clip_ids": torch.zeros(B, 5, dtype=torch.int32),
        "clip_mask": torch.ones(B, 5, dtype=torch.bool),
        "t5_ids": torch.zeros(B, 6, dtype=torch.int32),
        "t5_mask": torch.ones(B, 6, dtype=torch.bool),
    }
    meta = {
        "bucket": [16, 16],
        "keys": list("abcd"),
        "captions": list("ABCD"),
        "sources": ["s"] * B,
        "rows": [0, 1, 2, 3],
        "substituted": [False] * B,
        "null": [False] * B,
        "seq": 0,
    }
    payload, out_meta = actor.encode_chunk(arrays, meta)
    assert job_mod.unpack(payload)["moments"].shape == (4, 2, 8, 2, 2)  # all samples: the writer decides
    spec = CacheSpec(
        views=("plain", "flip"),
        clip_len=5,
        clip_dim=4,
        t5_len=6,
        t5_dim=4,
        latent_channels=4,
        downsample=8,
        t5_dtype="float16",
    )
    asm = ShardAssembler(tmp_path, "p", spec)
    asm.add_chunk(job_mod.unpack(payload), out_meta)
    info = asm.finish({"n_chunks": 1, "n_rows": 4, "rejects": []})
    assert info.n_samples == 2 and asm.n_written == 2
    note = json.loads((tmp_path / job_mod.PARTS_DIR / "p.json").read_text())
    assert [(r["key"], r["reason"]) for r in note["rejects"]] == [("b", "nonfinite_output"), ("c", "nonfinite_output")]
    assert "moments" in note["rejects"][0]["detail"] and "t5_rows" in note["rejects"][1]["detail"]


def test_a_writer_refuses_an_output_root_it_does_not_see(tmp_path):
    """A local output.root on a multi-node cluster must be one shared folder: a writer that does not find the
    driver's marker token there refuses, naming the root and what to use instead."""
    from stage1_encode.shard_writer import check_root_visible

    (tmp_path / ".tmp-writer-check-1-0badf00d").write_text("token-of-the-driver")
    check_root_visible(tmp_path, ".tmp-writer-check-1-0badf00d", "token-of-the-driver")
    for marker, token in ((".tmp-writer-check-1-0badf00d", "another-driver"), (".tmp-writer-check-2-deadbeef", "t")):
        with pytest.raises(
            ValueError,
            match=rf"output.root {tmp_path} is not the driver's folder.*shared "
            r"filesystem.*s3://",
        ):
            check_root_visible(tmp_path, marker, token)
