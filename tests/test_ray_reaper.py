"""The embedded Ray's reaper (stage1_encode/ray_reaper.py) with real processes and a real SIGKILL, no Ray: a driver
killed with orphaned descendants (as the raylet's agents and workers are when the driver dies) takes exactly the
processes that carry its run's token with it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

DRIVER = r"""
import os, subprocess, sys, time
from stage1_encode.ray_reaper import ENV_VAR, POLL_S, RayReaper

reaper = RayReaper.start()
os.environ[ENV_VAR] = reaper.token
sleep = [sys.executable, "-c", "import time; time.sleep(600)"]
# a child that starts a grandchild and exits: the grandchild is an orphan at once, like an agent whose raylet died
quiet = "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL"  # an inherited pipe would keep run() waiting
spawner = subprocess.run([sys.executable, "-c", "import subprocess, sys; "
                          f"print(subprocess.Popen({sleep!r}, start_new_session=True, {quiet}).pid)"],
                         capture_output=True, text=True, check=True)
orphan = int(spawner.stdout)
# a direct child in its own session (a killpg of the driver's group misses it)
child = subprocess.Popen(sleep, start_new_session=True, stdout=subprocess.DEVNULL)
# like the raylet: dies with the driver (PR_SET_PDEATHSIG), and its child (like an agent, which rewrites its title
# over its environment) shows no token, so only the reaper's notes of the run's process tree find it
agent_code = "import time; time.sleep(600)"
raylet_code = (
    "import ctypes, os, signal, subprocess, sys, time; ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0); "
    f"env = {{k: v for k, v in os.environ.items() if k != {ENV_VAR!r}}}; "
    f"a = subprocess.Popen([sys.executable, '-c', {agent_code!r}], env=env, stdout=subprocess.DEVNULL); "
    "print(a.pid, flush=True); time.sleep(600)"
)
raylet = subprocess.Popen([sys.executable, "-c", raylet_code], stdout=subprocess.PIPE, text=True)
agent = int(raylet.stdout.readline())
del os.environ[ENV_VAR]
other = subprocess.Popen(sleep, start_new_session=True, stdout=subprocess.DEVNULL)  # no token: must survive
time.sleep(3 * POLL_S)  # the reaper has noted the tree
print(orphan, child.pid, raylet.pid, agent, other.pid, reaper.proc.pid, flush=True)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")  # a zombie nobody reaps (PID 1 of a container may not) is dead


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the reaper reads /proc")
def test_killed_driver_takes_its_tokened_processes_down(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    other = None
    try:
        orphan, child, raylet, agent, other, reaper = (int(x) for x in driver.stdout.readline().split())
        ours = (orphan, child, raylet, agent)
        assert all(_alive(p) for p in (*ours, other, reaper))
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        deadline = time.time() + 30
        while any(_alive(p) for p in (*ours, reaper)) and time.time() < deadline:
            time.sleep(0.1)
        assert [p for p in ours if _alive(p)] == [], "processes of the killed driver's run outlived it"
        assert not _alive(reaper)
        assert _alive(other)
    finally:
        if driver.poll() is None:
            driver.kill()
        if other is not None and _alive(other):
            os.kill(other, signal.SIGKILL)


def test_embedded_start_retries_only_rays_startup_timeout(monkeypatch):
    """Ray waits a fixed 30 s for a new node to register; on a busy machine an embedded start can miss it. init_ray
    starts again after exactly that failure (closing the failed attempt's reaper first), at most
    EMBEDDED_START_ATTEMPTS times, and raises any other failure at once. The fault is injected by replacing ray.init
    (a real timeout cannot be provoked on demand); the reapers are real processes."""
    from stage1_encode import ray_init
    from stage1_encode.config import EncodeConfig

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    timeout = Exception("The current node timed out during startup. This could happen because ...")
    calls: list[dict] = []

    def failing(times: int, error: BaseException):
        def init(**kwargs):
            calls.append(kwargs)
            if len(calls) <= times:
                raise error

        return init

    monkeypatch.setattr(ray_init.ray, "init", failing(1, timeout))
    started, reaper = ray_init.init_ray(EncodeConfig(), None)
    assert started and len(calls) == 2 and calls[1]["address"] == "local"
    if reaper is not None:
        reaper.close()

    calls.clear()
    monkeypatch.setattr(ray_init.ray, "init", failing(99, timeout))
    with pytest.raises(Exception, match="timed out during startup"):
        ray_init.init_ray(EncodeConfig(), None)
    assert len(calls) == ray_init.EMBEDDED_START_ATTEMPTS

    calls.clear()
    monkeypatch.setattr(ray_init.ray, "init", failing(99, ValueError("object_store_memory too large")))
    with pytest.raises(ValueError, match="object_store_memory"):
        ray_init.init_ray(EncodeConfig(), None)
    assert len(calls) == 1
