"""Caches on object storage, against a real SeaweedFS S3 server (the `s3` fixture in conftest.py).

Stage 1 -> S3 is checked bit for bit against the same corpus cached on local disk (test_stage1_job's reference
run), including a server killed mid-job and restarted; stage 2 reading from S3 trains with losses bit-identical to
the same cache on local disk (same files, same readers, same kernels: exact by construction).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_stage1_job import DEMO_CFG, ENV, REPO, assert_same_cache, corpus, overrides, reference, suite  # noqa: F401
from test_stage2_common import read_metrics, tiny_overrides, write_synthetic_cache

from shared.storage import MissingObjectError, RemoteStore, StorageConfig, StorageError


def _samples(cache) -> dict:
    return {
        s["key"]: {k: (v.tobytes(), v.dtype.str, v.shape) if isinstance(v, np.ndarray) else v for k, v in s.items()}
        for s in (cache[i] for i in range(len(cache)))
    }


@pytest.mark.parametrize("fmt", ["webdataset", "zarr"])
def test_remote_cache_reads_like_local(s3, tmp_path, fmt):
    """open_cache("s3://...") returns the local cache's samples bit for bit, with one GET per shard for its data;
    the local shard cache stays under its size limit; a missing object is named."""
    from shared.cache import open_cache
    from shared.remote_cache import RemoteCacheMirror, publish_cache
    from shared.verify import verify_cache

    local = write_synthetic_cache(tmp_path / "local", n=12, fmt=fmt, shards=3)
    url = s3.url()
    publish_cache(local, url)
    cfg = StorageConfig(cache_dir=str(tmp_path / "shard-cache"), cache_max_gb=1.0)
    remote = open_cache(url, storage=cfg)
    assert _samples(remote) == _samples(open_cache(local))
    # manifest, empty caption, small_files.tar (3 sidecars and 3 index files), then the data: one GET per object (a
    # .tar shard is one object; a zarr shard is a folder, one object per zarr chunk: whole chunks, never a GET per
    # sample field)
    data_objects = sum(1 for rel in RemoteStore(url).find("shards") if "/" in rel or rel.endswith(".tar"))
    assert data_objects == (3 if fmt == "webdataset" else data_objects) and data_objects >= 3
    assert remote._source.store.gets == 3 + data_objects
    # without the bundle (or with one written for another manifest) the small files come one by one
    from shared.remote_cache import SMALL_FILES_NAME

    bundle = RemoteStore(url).read_bytes(SMALL_FILES_NAME)
    for stale in (None, bundle.replace(bundle[512:576], b"0" * 64)):  # member 1 holds the manifest's sha256
        if stale is None:
            RemoteStore(url).remove(SMALL_FILES_NAME)
        else:
            RemoteStore(url).write_bytes(SMALL_FILES_NAME, stale)
        fresh = open_cache(url, storage=StorageConfig(cache_dir=str(tmp_path / f"c-{stale is None}")))
        assert _samples(fresh) == _samples(open_cache(local))
        assert fresh._source.store.gets == 3 + 3 + 3 + data_objects  # the absent bundle costs its GET too
    assert verify_cache(url, progress=False).ok
    from shared.cli import main as cache_cli

    assert cache_cli(["inspect", url]) == 0 and cache_cli(["verify", url, "--no-progress"]) == 0
    assert remote.summary()["root"] == url

    # LRU: a limit below two shards keeps at most the one just read plus those used within min_idle_s
    mirror = RemoteCacheMirror(url, cfg)
    mirror.prepare()
    one = max(b for _, b, _ in mirror.local_shards())
    mirror.cfg = StorageConfig(cache_dir=cfg.cache_dir, cache_max_gb=1.5 * one / 1024**3)
    mirror.min_idle_s = 0.0
    mirror.evict()
    assert len(mirror.local_shards()) == 1

    store = RemoteStore(url)
    victim = f"shards/part-00001{'.tar' if fmt == 'webdataset' else '.zarr'}"
    store.remove(victim)
    fresh = open_cache(url, storage=StorageConfig(cache_dir=str(tmp_path / "other-cache")))
    with pytest.raises(MissingObjectError, match=f"{url}/{victim}"):
        for i in range(len(fresh)):
            fresh[i]
    with pytest.raises(MissingObjectError, match=f"{s3.url('nothing-here')}/manifest.json"):
        open_cache(s3.url("nothing-here"), storage=cfg)


def test_transient_errors_are_retried_then_named(s3, tmp_path):
    """Server down: each operation is retried with backoff, then stops with an error naming the object."""
    store = RemoteStore(s3.url(), StorageConfig(retries=3, backoff_s=0.1, connect_timeout_s=1))
    store.write_bytes("a/x.bin", b"123")
    store.download_file("a/x.bin", tmp_path / "before.bin")  # both clients (s3fs, botocore) have live connections
    s3.kill()
    try:
        t0 = time.time()
        with pytest.raises(StorageError, match=r"read s3://.*/a/x.bin failed after 3 attempts"):
            store.read_bytes("a/x.bin")
        assert 0.3 <= time.time() - t0 < 20  # backoff 0.1 + 0.2 s, then the error
        # downloads (shard data: botocore's client, not s3fs) likewise, and leave no partial file behind
        with pytest.raises(StorageError, match=r"download s3://.*/a/x.bin failed after 3 attempts"):
            store.download_file("a/x.bin", tmp_path / "x.bin")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["before.bin"]
    finally:
        s3.start()
    assert store.read_bytes("a/x.bin") == b"123"
    store.download_file("a/x.bin", tmp_path / "x.bin")
    assert (tmp_path / "x.bin").read_bytes() == b"123"


def test_download_cut_mid_body_is_retried_then_named(s3, tmp_path):
    """A connection that drops mid-body (a proxy forwards part of the response, then closes): the short body is
    detected (it is read from the socket directly, past urllib3, so the length check is ours), retried, and named
    once the attempts run out; no partial file is left. A single cut is retried into the right bytes."""
    from s3_server import CuttingProxy

    url = s3.url()
    payload = os.urandom(3 << 20)
    RemoteStore(url).write_bytes("a/x.bin", payload)
    proxy = CuttingProxy(s3.endpoint, limit=1 << 20, cuts=10)
    try:
        store = RemoteStore(url, StorageConfig(endpoint_url=proxy.endpoint, retries=3, backoff_s=0.05))
        with pytest.raises(StorageError, match=r"download s3://.*/a/x.bin failed after 3 attempts: IncompleteRead"):
            store.download_file("a/x.bin", tmp_path / "x.bin")
        assert list(tmp_path.iterdir()) == []
        proxy.cuts = 1
        store.download_file("a/x.bin", tmp_path / "x.bin")
        assert (tmp_path / "x.bin").read_bytes() == payload and proxy.cuts == 0
    finally:
        proxy.close()


def test_stream_reads_a_shard_while_it_downloads(s3, tmp_path, monkeypatch):
    """A cold stream decodes a shard's first samples while the rest of it is still on the way (a proxy holds the
    body after 30 kB of each 51 kB shard), and yields the local cache's samples bit for bit, one GET per shard;
    a missing shard object stops the stream with an error naming it. Downloads read 8 KiB at a time here (real
    shards are tens of MiB, read 512 KiB at a time) so that a 51 kB shard arrives in several reads."""
    import threading

    from s3_server import CuttingProxy

    from shared import storage
    from shared.cache import open_cache
    from shared.remote_cache import publish_cache

    monkeypatch.setattr(storage, "_READ_CHUNK", 8 << 10)

    local = write_synthetic_cache(tmp_path / "local", n=12, fmt="webdataset", shards=3)
    assert all(p.stat().st_size > 40_000 for p in (local / "shards").glob("*.tar"))  # the hold cuts into each
    url = s3.url()
    publish_cache(local, url)
    hold = threading.Event()
    proxy = CuttingProxy(s3.endpoint, limit=30_000, hold=hold)  # metadata responses are smaller
    try:
        cfg = StorageConfig(endpoint_url=proxy.endpoint, cache_dir=str(tmp_path / "sc"), prefetch_shards=1)
        remote = open_cache(url, storage=cfg)
        it, got = iter(remote.stream()), []
        reader = threading.Thread(target=lambda: got.append(next(it)), daemon=True)
        reader.start()
        reader.join(30)
        assert got, "the stream waited for the whole shard"
        assert not (remote.root / "shards" / "part-00000.tar").exists()  # still downloading
        hold.set()
        got += list(it)
    finally:
        hold.set()
        proxy.close()

    def rows(samples):
        return [
            {k: (v.tobytes(), v.dtype.str, v.shape) if isinstance(v, np.ndarray) else v for k, v in s.items()}
            for s in samples
        ]

    assert rows(got) == rows(open_cache(local).stream()) and len(got) == 12
    assert remote._source.store.gets == 3 + 3
    RemoteStore(url).remove("shards/part-00001.tar")
    fresh = open_cache(url, storage=StorageConfig(cache_dir=str(tmp_path / "other")))
    with pytest.raises(MissingObjectError, match=f"{url}/shards/part-00001.tar"):
        list(fresh.stream())


@pytest.mark.exact
@pytest.mark.slow
def test_stage2_losses_from_s3_equal_local_disk(s3, tmp_path):
    """Training from data.cache=s3://... (2 DataLoader workers sharing one local shard cache) gives the same
    losses, bit for bit, as from the same cache on local disk."""
    from shared.config import load_config
    from shared.remote_cache import publish_cache
    from stage2_train.config import TrainConfig
    from stage2_train.trainer import Trainer

    local = write_synthetic_cache(tmp_path / "local", n=12, fmt="webdataset", shards=3)
    url = s3.url()
    publish_cache(local, url)
    torch.set_num_threads(1)
    losses = {}
    for name, cache in (("local", local), ("s3", url)):
        extra = {"steps": 4, "data.num_workers": 2, "storage.cache_dir": str(tmp_path / "shard-cache")}
        cfg = load_config(TrainConfig, "configs/train/demo.yaml", tiny_overrides(cache, tmp_path / name, **extra))
        Trainer(cfg).train()
        losses[name] = [m["loss"] for m in read_metrics(tmp_path / name)]
    assert len(losses["s3"]) == 4 and losses["s3"] == losses["local"]


# what every process of a Ray job here imports: the `ray start` CLI, the dashboard and its agent (all their modules),
# the runtime-env agent and log monitor, the state API, the stage-1 job and the encoder classes
_WARM_IMPORTS = """
import ray.scripts.scripts, ray.dashboard.dashboard, ray.dashboard.agent, ray._private.log_monitor
import ray._private.runtime_env.agent.main, ray.util.state
import ray.dashboard.utils as u
u.get_all_modules(u.DashboardAgentModule); u.get_all_modules(u.DashboardHeadModule)
import stage1_encode.job, stage1_encode.encoder_actor, stage1_encode.dispatch, pipeline.encoders
from diffusers import AutoencoderKL
from transformers import AutoTokenizer, BertModel, BertTokenizer, T5EncoderModel
"""


@pytest.fixture(scope="module")
def ray_env() -> dict:
    """ENV for the Ray processes these tests start, with what they import compiled beforehand.

    A raylet registers with the GCS only once its dashboard agent is up, and `ray start` waits for that a fixed 30 s
    (ray/_private/node.py in Ray 2.60: `raylet_start_wait_time_s = 30`, a literal, no setting or variable). Compiling
    the agent's modules from source costs 4.1 s of CPU against 1.65 s from bytecode, and three such starts on two
    loaded cores overran the wait. tests/conftest.py keeps a bytecode cache for every process of the session (even
    where PYTHONDONTWRITEBYTECODE is set), so one warm-up import here, before any node starts, compiles them once."""
    subprocess.run([sys.executable, "-c", _WARM_IMPORTS], cwd=REPO, env=ENV, check=True, timeout=600)
    return dict(ENV)


def _cli(args: list[str], s3, env: dict, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "stage1_encode", "--config", str(DEMO_CFG), *args],
        cwd=REPO,
        env=dict(env, **s3.env),
        **kw,
    )


@pytest.mark.exact
@pytest.mark.slow
def test_stage1_to_s3_survives_a_server_crash(s3, reference, corpus, suite, ray_env, tmp_path):  # noqa: F811
    """Stage 1 writes to s3://; the server is SIGKILLed after the first shard is visible: the job fails naming
    the object, nothing half-visible remains (no manifest, every visible shard complete), and the rerun after a
    restart gives a cache bit-identical to the uninterrupted local run: 0 lost, 0 duplicated."""
    from shared.remote_cache import download_cache, remote_completed

    url = s3.url()
    args = overrides(
        corpus,
        suite,
        url,
        **{"storage.retries": 2, "storage.backoff_s": 0.2, "storage.staging_dir": str(tmp_path / "staging")},
    )
    store = RemoteStore(url)
    log = tmp_path / "driver.log"
    with open(log, "w") as f:
        proc = _cli(args, s3, ray_env, stdout=f, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while not remote_completed(store, "webdataset"):
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.time() < deadline, "no shard became visible"
        time.sleep(0.2)
    s3.kill()
    try:
        rc = proc.wait(120)
        out = log.read_text()
        assert rc != 0 and f"{url}/" in out, out[-3000:]
    finally:
        s3.start()
    first = remote_completed(store, "webdataset")
    assert 1 <= len(first) < 4 and not store.exists("manifest.json")

    r = subprocess.run(
        [sys.executable, "-m", "stage1_encode", "--config", str(DEMO_CFG), *args],
        cwd=REPO,
        env=dict(ray_env, **s3.env),
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    summary = json.loads(r.stdout)
    assert summary["status"] == "complete" and summary["root"] == url
    assert summary["shards_this_run"] == 4 - len(first)
    got = download_cache(url, tmp_path / "downloaded")
    assert_same_cache(reference, got)
    # no credentials anywhere in what was stored
    for p in got.rglob("*"):
        if p.is_file() and p.suffix in (".yaml", ".json", ".log", ".jsonl"):
            text = p.read_text(errors="replace")
            assert s3.env["AWS_SECRET_ACCESS_KEY"] not in text and s3.env["AWS_ACCESS_KEY_ID"] not in text, p


def _row_tuple(r: dict) -> tuple:
    return (r["key"], r["row"], r["image"], r["caption"], r["md5"], r["error_reason"])


def test_readers_on_s3_give_the_local_rows(s3, tmp_path, monkeypatch):
    """Arrow, Parquet, JSONL and CSV inputs on s3:// plan the same partitions (names, row ranges) and read the same
    rows (keys, bytes, captions, md5s) as the same files on local disk; the planner counts Arrow rows without
    downloading the images; list image URLs are contained in the list's prefix or input.allowed_roots."""
    from stage1_encode.demo_corpus import write_demo_corpus, write_demo_image_list
    from stage1_encode.readers import InputConfig, S3Path, plan_partitions, read_partition

    local = write_demo_corpus(tmp_path / "corpus", n=30, seed=1, rows_per_file=16)
    loose = write_demo_image_list(tmp_path / "loose", n=6)
    url = s3.url()
    store = RemoteStore(url)
    store.upload(local["arrow_dir"], "arrow")
    store.upload(local["parquet_dir"], "parquet")
    store.upload(loose["root"], "loose")

    def read_all(cfg):
        parts = plan_partitions(cfg, 7)
        return parts, [_row_tuple(r) for p in parts for r in read_partition(p, cfg)]

    for fmt, local_paths, remote_paths in (
        ("arrow", [str(local["arrow_dir"])], [f"{url}/arrow"]),  # a prefix: every *.arrow below it
        ("parquet", [str(local["parquet_dir"] / "*.parquet")], [f"{url}/parquet/*.parquet"]),
        ("jsonl", [str(loose["jsonl"])], [f"{url}/loose/list.jsonl"]),
        ("csv", [str(loose["csv"])], [f"{url}/loose/list.csv"]),
    ):
        lp, lrows = read_all(InputConfig(format=fmt, paths=local_paths))
        rp, rrows = read_all(InputConfig(format=fmt, paths=remote_paths))
        assert [(p.name, p.start, p.stop) for p in rp] == [(p.name, p.start, p.stop) for p in lp], fmt
        assert rrows == lrows and len(rrows) == (30 if fmt in ("arrow", "parquet") else 6), fmt
        assert all(p.source.startswith(url + "/") for p in rp)

    # counting rows reads the batches' metadata and the caption column only, not the images
    from stage1_encode import readers

    opened = []
    real_open = S3Path.open

    def observed_open(self, *a, **kw):  # observes the real file objects' read-ahead caches; changes nothing
        opened.append(real_open(self, *a, **kw))
        return opened[-1]

    monkeypatch.setattr(S3Path, "open", observed_open)
    import pyarrow as pa

    table = pa.table({"image": [bytes([i]) * 20_000 for i in range(64)], "text_zh": [str(i) for i in range(64)]})
    with pa.OSFile(str(tmp_path / "big.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=16):
            writer.write_batch(batch)
    store.upload(tmp_path / "big.arrow", "big.arrow")
    big = S3Path(f"{url}/big.arrow")
    assert sum(readers._arrow_batch_rows(big, InputConfig(format="arrow", paths=[str(big)]))) == 64
    size = (tmp_path / "big.arrow").stat().st_size
    assert sum(fh.cache.total_requested_bytes for fh in opened) < size / 2, (size, [fh.cache for fh in opened])
    monkeypatch.undo()

    # a list on s3:// naming image URLs: inside its prefix, outside it (refused unless allowed), and missing
    inside, outside = f"{url}/loose/images/00000.png", f"{url}/elsewhere/x.png"
    store.write_bytes("elsewhere/x.png", loose["images"].joinpath("00000.png").read_bytes())
    lines = [
        {"img_path": inside, "text_zh": "a"},
        {"img_path": outside, "text_zh": "b"},
        {"img_path": "images/../../elsewhere/x.png", "text_zh": "c"},
        {"img_path": "images/nope.png", "text_zh": "d"},
    ]
    store.write_bytes("loose/urls.jsonl", "".join(json.dumps(r) + "\n" for r in lines).encode())
    cfg = InputConfig(format="jsonl", paths=[f"{url}/loose/urls.jsonl"])
    rows = [r for p in plan_partitions(cfg, 10) for r in read_partition(p, cfg)]
    assert [r["error_reason"] for r in rows] == [None, "outside_roots", "outside_roots", "read_error"]
    assert rows[0]["image"] == loose["images"].joinpath("00000.png").read_bytes()
    assert f"{url}/loose/images/nope.png" in rows[3]["error"]
    cfg = InputConfig(format="jsonl", paths=[f"{url}/loose/urls.jsonl"], allowed_roots=[f"{url}/elsewhere/"])
    rows = [r for p in plan_partitions(cfg, 10) for r in read_partition(p, cfg)]
    assert [r["error_reason"] for r in rows] == [None, None, None, "read_error"]
    # a local list may name objects only under an allowed s3:// prefix
    local_list = tmp_path / "urls.jsonl"
    local_list.write_text(json.dumps({"img_path": inside, "text_zh": "a"}) + "\n")
    for roots, reason in (([], "outside_roots"), ([f"{url}/loose"], None)):
        cfg = InputConfig(format="jsonl", paths=[str(local_list)], allowed_roots=roots)
        assert [r["error_reason"] for p in plan_partitions(cfg, 10) for r in read_partition(p, cfg)] == [reason]

    with pytest.raises(ValueError, match=f"{url}/nothing.*matches no object"):
        plan_partitions(InputConfig(format="arrow", paths=[f"{url}/nothing"]), 7)
    with pytest.raises(ValueError, match="format 'folder' reads local files only"):
        plan_partitions(InputConfig(format="folder", paths=[f"{url}/loose/images"]), 7)


def _ray_node(args: list[str], home: Path, temp_dir: Path, env: dict) -> subprocess.Popen:
    """`ray start --block` in its own folder (cwd, HOME, TMPDIR, staging and shard-cache folders; its own short
    --temp-dir: Ray's socket paths must stay under 108 bytes) and its own process group, so that teardown kills
    exactly its processes."""
    home.mkdir(parents=True, exist_ok=True)
    node_env = dict(
        env,
        HOME=str(home),
        HYDIT_STAGING=str(home / "staging"),
        HYDIT_SHARD_CACHE=str(home / "cache"),
        TMPDIR=str(home),
    )
    ray_bin = str(Path(sys.executable).parent / "ray")
    log = open(home / "ray.log", "w")
    return subprocess.Popen(
        [
            ray_bin,
            "start",
            "--block",
            "--node-ip-address",
            "127.0.0.1",
            "--temp-dir",
            str(temp_dir),
            "--disable-usage-stats",
            *args,
        ],
        cwd=home,
        env=node_env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _stop_node(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=5)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass


def _wait_nodes(dashboard: str, n: int, procs: list[subprocess.Popen], logs: Path, timeout_s: float = 180):
    """The n alive nodes, or None when the last process started has exited (its start failed)."""
    from ray.util.state import list_nodes

    deadline = time.time() + timeout_s
    while True:
        try:
            alive = [x for x in list_nodes(address=dashboard) if x.state == "ALIVE"]
            if len(alive) == n:
                return alive
        except Exception:  # the dashboard is not up yet
            pass
        if procs[-1].poll() is not None:
            return None
        for p in procs[:-1]:
            assert p.poll() is None, [f.read_text()[-2000:] for f in logs.glob("*/ray.log")]
        assert time.time() < deadline, f"{n} Ray nodes did not come up in {timeout_s}s"
        time.sleep(1)


@pytest.mark.exact
@pytest.mark.slow
def test_two_nodes_no_shared_path_write_one_s3_cache(s3, reference, corpus, suite, ray_env, tmp_path):  # noqa: F811
    """A head with no CPUs and two worker nodes, each started in its own folder (cwd, HOME, TMPDIR, Ray temp dir,
    staging and shard-cache folders), the driver in a third: the corpus on s3://, the cache on s3://. Encoder
    actors and preprocessing tasks run on both worker nodes (Ray's state API says where), and the cache is
    bit-identical to the single-node run from local disk to local disk (reference). Exact by construction: the
    batches are cut from the data alone and every actor runs one torch thread (test_job_submit_two_actors...).

    Only code and the encoder weights are at one path for every process, as on any cluster (installed on each
    machine); whichever process writes the shards (the driver, or tasks on the nodes) has only its own folders."""
    from ray.util.state import list_actors, list_tasks
    from test_stage1_job import RAY_PORT_FLAGS, _free_port, cache_content

    from shared.remote_cache import download_cache

    url, corpus_url = s3.url(), s3.url()  # the output prefix must be empty
    RemoteStore(corpus_url).upload(corpus["arrow_dir"], "arrow")
    env = dict(ray_env, **s3.env)
    names = RAY_PORT_FLAGS
    ports: dict[str, int] = {}
    while len(set(ports.values())) < len(names) * 3:
        ports = {f"{n}@{i}": _free_port() for n in names for i in range(3)}
    own = lambda i, skip=(): [a for n in names if n not in skip for a in (f"--{n}", str(ports[f"{n}@{i}"]))]  # noqa: E731
    head = f"127.0.0.1:{ports['port@0']}"
    dashboard = f"http://127.0.0.1:{ports['dashboard-port@0']}"
    temp_dirs = [Path(tempfile.mkdtemp(prefix=f"hyray{i}-")) for i in range(3)]
    args = {
        0: [
            "--head",
            "--num-cpus",
            "0",
            "--include-dashboard=true",
            "--dashboard-host",
            "127.0.0.1",
            "--object-store-memory",
            str(100 * 1024**2),
            *own(0),
        ]
    }
    # 3 logical CPUs each: one encoder actor (1.75 CPU) per node, by resources, and room beside it for the 1-CPU
    # tasks Ray Data runs between the operators (with 1 CPU per node and 0.75 per actor they wait forever)
    for i in (1, 2):
        args[i] = [
            "--address",
            head,
            "--num-cpus",
            "3",
            "--object-store-memory",
            str(200 * 1024**2),
            *own(i, skip=("port", "dashboard-port", "ray-client-server-port")),
        ]
    nodes: list[subprocess.Popen] = []
    try:
        # one at a time (a worker that starts before the head's GCS is up gives up); a node whose start hits Ray's
        # fixed 30 s registration timeout on a loaded machine is started again, twice at most
        for i in range(3):
            for _attempt in range(3):
                proc = _ray_node(args[i], tmp_path / f"node{i}", temp_dirs[i], env)
                alive = _wait_nodes(dashboard, 1 + i, nodes + [proc], tmp_path)
                if alive is not None:
                    nodes.append(proc)
                    break
                _stop_node(proc)
            assert alive is not None, [f.read_text()[-2000:] for f in tmp_path.glob("*/ray.log")]
        workers = {n.node_id for n in alive if n.resources_total.get("CPU", 0) > 0}
        assert len(workers) == 2

        driver = tmp_path / "driver"
        driver.mkdir()
        args = overrides(
            corpus,
            suite,
            url,
            **{
                "input.paths": f"[{corpus_url}/arrow]",
                "ray.address": head,
                "ray.num_encoder_actors": 2,
                "ray.num_cpus_per_actor": 1.75,
            },
        )
        r = subprocess.run(
            [sys.executable, "-m", "stage1_encode", "--config", str(DEMO_CFG), *args],
            cwd=driver,
            env=dict(env, HOME=str(driver), HYDIT_STAGING=str(driver / "staging"), TMPDIR=str(driver)),
            capture_output=True,
            text=True,
            timeout=500,
        )
        assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
        assert json.loads(r.stdout)["status"] == "complete"

        actors = [
            a
            for a in list_actors(address=dashboard, detail=True, limit=1000)
            if "MapWorker" in a.class_name or "Encoder" in a.class_name
        ]
        # both worker nodes host map actors (the encoders: 1.75 of their 3 CPUs each); actors that need no CPU (e.g.
        # a shard writer) may run on the head as well
        assert workers <= {a.node_id for a in actors}, [(a.class_name, a.node_id) for a in actors]
        tasks = [t for t in list_tasks(address=dashboard, detail=True, limit=10000) if "preprocess" in t.name]
        assert tasks and {t.node_id for t in tasks} <= workers, [(t.name, t.node_id) for t in tasks]
    finally:
        for n in reversed(nodes):
            _stop_node(n)
        for d in temp_dirs:
            shutil.rmtree(d, ignore_errors=True)

    got = cache_content(download_cache(url, tmp_path / "downloaded"))
    want = cache_content(reference)
    # rejects name their source: the s3:// object here, the local file there; everything else is equal
    for c in (got, want):
        c["rejects"] = [
            {k: v for k, v in json.loads(line).items() if k != "source"} for line in c["rejects"].splitlines()
        ]
    assert got["shards"] == want["shards"] and got == want
