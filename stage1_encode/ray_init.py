"""Ray start-up for the job: attach to a cluster or start an embedded one (with its reaper); resource checks."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import ray

from stage1_encode.config import EncodeConfig
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
    if os.environ.get(KILL_ENV):  # test plumbing (stage1_encode/shard_writer.py) reaches the workers
        env[KILL_ENV] = os.environ[KILL_ENV]
    address = address or cfg.ray.address
    if os.environ.get("RAY_ADDRESS") and not address:
        ray.init()  # under `ray job submit`: the job's runtime env (working_dir) already carries the code
        return True, None
    # Workers do not inherit this process's sys.path: give them the repository (same machine or shared FS).
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    if address:
        ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=True)
        return True, None
    for attempt in range(1, EMBEDDED_START_ATTEMPTS + 1):
        reaper = RayReaper.start()
        previous = os.environ.get(REAPER_ENV_VAR)
        if reaper is not None:  # inherited by every process Ray starts now, and by the workers the raylet starts later
            os.environ[REAPER_ENV_VAR] = reaper.token
        try:
            ray.init(
                address="local",
                num_cpus=cfg.ray.num_cpus or os.cpu_count(),
                object_store_memory=int(cfg.ray.object_store_memory_gb * 1024**3),
                include_dashboard=False,
                runtime_env={"env_vars": env},
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
        finally:
            if previous is None:
                os.environ.pop(REAPER_ENV_VAR, None)
            else:
                os.environ[REAPER_ENV_VAR] = previous
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
    need_cpu = r.num_cpus_per_actor * r.num_encoder_actors + max(r.preprocess_num_cpus, r.writer_num_cpus)
    have_cpu = ray.cluster_resources().get("CPU", 0)
    if need_cpu > have_cpu:
        raise ValueError(
            f"the encoder actors (ray.num_cpus_per_actor={r.num_cpus_per_actor} x {r.num_encoder_actors}) plus one "
            f"preprocessing task or writer (ray.preprocess_num_cpus={r.preprocess_num_cpus}, ray.writer_num_cpus="
            f"{r.writer_num_cpus}) need {need_cpu} CPUs but the cluster has {have_cpu}; the job would hang. "
            "Lower them or give Ray more CPUs (ray.num_cpus)."
        )
