"""Ray start-up for the job: attach to a cluster or start an embedded one (with its reaper); resource checks."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import ray

from stage1_encode.config import EncodeConfig
from stage1_encode.encoder_actor import KILL_ENV as KILL_ENCODER_ENV
from stage1_encode.ray_reaper import ENV_VAR as REAPER_ENV_VAR
from stage1_encode.ray_reaper import RayReaper
from stage1_encode.shard_writer import KILL_ENV

REPO_ROOT = Path(__file__).resolve().parents[1]
logger = logging.getLogger("stage1_encode")

# Ray waits a fixed 30 s (not configurable, ray/_private/node.py) for a new node to register with its GCS. On a
# machine whose cores are busy (CI next to other jobs, a workstation mid-build) an embedded start can miss that once;
# a second start usually works. Only that failure is retried; anything else is raised at once.
EMBEDDED_START_ATTEMPTS = 3
_STARTUP_TIMEOUT = "timed out during startup"


def init_ray(cfg: EncodeConfig, address: str | None) -> tuple[bool, RayReaper | None]:
    """Attach to a cluster (--address, ray.address, RAY_ADDRESS) or start an embedded local one.

    Returns (started: this call started Ray, reaper): an embedded Ray gets a reaper (stage1_encode/ray_reaper.py)
    that takes its processes down when the driver ends, SIGKILL included; close it after ray.shutdown().
    """
    if ray.is_initialized():
        return False, None
    env = {"TOKENIZERS_PARALLELISM": "false"}
    for name in (KILL_ENV, KILL_ENCODER_ENV):  # test plumbing (shard_writer.py, encoder_actor.py) reaches the workers
        if os.environ.get(name):
            env[name] = os.environ[name]
    address = address or cfg.ray.address
    if os.environ.get("RAY_ADDRESS") and not address:
        ray.init()  # under `ray job submit`: the job's runtime env (working_dir) already carries the code
        return True, None
    # Workers do not inherit this process's sys.path: give them the repository (same machine or shared FS).
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    if address:
        ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=True)
        return True, None
    # An embedded Ray gets `env` through this process's environment, not a runtime_env: the raylet inherits it at
    # start and so does every worker it forks. With a runtime_env the workers Ray prestarts at init (plain
    # environment) cannot run this job's tasks, so each task and actor waited for a fresh worker process started
    # through the runtime-env agent (measured: 3 extra ~4.5 s CPU worker starts, first task ~29 s after init on the
    # loaded 2-core box, against the prestarted idle ones).
    for attempt in range(1, EMBEDDED_START_ATTEMPTS + 1):
        reaper = RayReaper.start()
        start_env = dict(env)
        if reaper is not None:  # inherited by every process Ray starts now, and by the workers the raylet starts later
            start_env[REAPER_ENV_VAR] = reaper.token
        previous = {k: os.environ.get(k) for k in start_env}
        os.environ.update(start_env)
        try:
            ray.init(
                address="local",
                num_cpus=cfg.ray.num_cpus or os.cpu_count(),
                object_store_memory=int(cfg.ray.object_store_memory_gb * 1024**3),
                include_dashboard=False,
                log_to_driver=True,
            )
            return True, reaper
        except BaseException as e:
            if reaper is not None:
                reaper.close()  # a start that failed half-way leaves processes too
            if attempt == EMBEDDED_START_ATTEMPTS or _STARTUP_TIMEOUT not in str(e):
                raise
            ray.shutdown()
            logger.warning(
                "the embedded Ray did not come up (%s); starting it again (%d/%d)",
                str(e).splitlines()[0],
                attempt + 1,
                EMBEDDED_START_ATTEMPTS,
            )
        finally:  # this process's own environment is the caller's again (the started processes keep theirs)
            for k, v in previous.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    raise AssertionError("unreachable: the last attempt returns or raises")


def _check_resources(cfg: EncodeConfig) -> None:
    need = cfg.ray.num_gpus_per_actor * cfg.ray.num_encoder_actors
    have = ray.cluster_resources().get("GPU", 0)
    if need > have:
        raise ValueError(
            f"ray.num_gpus_per_actor={cfg.ray.num_gpus_per_actor} x ray.num_encoder_actors="
            f"{cfg.ray.num_encoder_actors} needs {need} GPUs but the cluster has {have}; the job would hang. "
            "Use ray.num_gpus_per_actor=0 to encode on CPU, or fewer actors."
        )
    r = cfg.ray
    need_cpu = r.num_cpus_per_actor * r.num_encoder_actors + r.preprocess_num_cpus + r.writer_num_cpus
    have_cpu = ray.cluster_resources().get("CPU", 0)
    if need_cpu > have_cpu:
        raise ValueError(
            f"the encoder actors (ray.num_cpus_per_actor={r.num_cpus_per_actor} x {r.num_encoder_actors}) plus one "
            f"shard's writer and its preprocessing task (ray.writer_num_cpus={r.writer_num_cpus}, "
            f"ray.preprocess_num_cpus={r.preprocess_num_cpus}) need {need_cpu} CPUs but the cluster has {have_cpu}: "
            "no shard could be written beside the actors. Lower them or give Ray more CPUs (ray.num_cpus)."
        )
