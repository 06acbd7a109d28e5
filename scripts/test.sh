#!/usr/bin/env bash
# Install into a virtual environment (see scripts/setup_env.sh for the knobs) and run the whole test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"` or `bash scripts/test.sh tests/test_readers.py`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"

export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"
export RAY_USAGE_STATS_ENABLED="${RAY_USAGE_STATS_ENABLED:-0}"
t0=$SECONDS
set +e
"$VPY" -m pytest -q "$@"
rc=$?
set -e
echo "[test] pytest exit code $rc after $((SECONDS - t0)) s"
if [ "$rc" -eq 5 ]; then
    echo "[test] FAILED: pytest collected no tests" >&2
    exit 1
fi
exit "$rc"
