import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Local Ray clusters in tests: no token file in ~/.ray, no usage stats, no dashboard on a public address.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def _keep_bytecode() -> None:
    """A bytecode cache for this session and every process it starts (torchrun ranks and launchers, CLI runs, Ray
    workers inherit os.environ). With PYTHONDONTWRITEBYTECODE set, as on the project's machines, and the venv
    installed with --no-compile (scripts/setup_env.sh), each of those processes compiled torch, sympy, transformers
    and the rest from source on every import. Measured in CPU seconds: `import torch` 4.5 -> 2.1, torch._dynamo
    (which torch.optim and DDP import) 7.0 -> 2.0, peft 4.7 -> 2.6; a 2-rank torchrun test run (cache + 4 steps)
    43 -> 19. The .pyc files go to one folder outside the source trees (PYTHONPYCACHEPREFIX if set, else
    <venv>/.pycache), so none appears next to a source file, which is what PYTHONDONTWRITEBYTECODE is set for.
    HYDIT_PYCACHE=0 leaves the setting alone."""
    if os.environ.get("HYDIT_PYCACHE", "1") == "0" or not sys.dont_write_bytecode:
        return
    if not os.environ.get("PYTHONPYCACHEPREFIX") and sys.prefix == sys.base_prefix:
        return  # not in a virtual environment: nowhere of this project's own to put the cache
    prefix = Path(os.environ.get("PYTHONPYCACHEPREFIX") or Path(sys.prefix) / ".pycache")
    try:
        prefix.mkdir(parents=True, exist_ok=True)
    except OSError:
        return  # a read-only environment: nothing to cache into
    if not os.access(prefix, os.W_OK):
        return
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ["PYTHONPYCACHEPREFIX"] = str(prefix)
    sys.dont_write_bytecode = False  # this process too: torch and the rest are imported after conftest
    sys.pycache_prefix = str(prefix)


_keep_bytecode()


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A real SeaweedFS S3 server on loopback (tests/s3_server.py), started on first use, stopped by its pid.
    Sets the standard AWS variables (test credentials, endpoint) for this process while it runs."""
    from s3_server import SeaweedS3

    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    # the default shard cache and staging folders too, so that no test writes to ~/.cache
    env = dict(
        server.env,
        HYDIT_SHARD_CACHE=str(tmp_path_factory.mktemp("shard-cache")),
        HYDIT_STAGING=str(tmp_path_factory.mktemp("staging")),
    )
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield server
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
