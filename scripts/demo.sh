#!/usr/bin/env bash
# Install into a virtual environment (see scripts/setup_env.sh for the knobs) and run the whole job end to end on the
# built-in demo: generated corpus, tiny random-init encoders, stage 1 on a local Ray, a short stage-2 run.
# Outputs go to demo_out/ (or the folder given with --out); extra arguments go to scripts/demo.py (see --help).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"

export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"
export RAY_USAGE_STATS_ENABLED="${RAY_USAGE_STATS_ENABLED:-0}"
exec "$VPY" scripts/demo.py "$@"
