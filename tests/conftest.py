import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Local Ray clusters in tests: no token file in ~/.ray, no usage stats, no dashboard on a public address.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


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
