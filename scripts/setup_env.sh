# Sourced by scripts/demo.sh and scripts/test.sh: make a virtual environment and install the project into it.
#
# torch goes in FIRST and on its own, so that `pip install -e .` finds it satisfied and never pulls the multi-GB CUDA
# build from PyPI onto a CPU machine. Knobs (environment variables):
#   VENV             where the virtual environment lives (default: .venv in the repository)
#   PYTHON           the interpreter that creates it (default: python3; 3.10+)
#   TORCH_SPEC       the torch requirement (default: torch==2.13.0, a local CPU wheel on the project's machines)
#   PIP_TORCH_INDEX  index for torch only, e.g. https://download.pytorch.org/whl/cpu on other CPU machines,
#                    or https://download.pytorch.org/whl/cu128 for a CUDA build (default: pip's configured index)
#   EXTRAS           extras of this package to install (default: test; on GPU machines: test,gpu for flash-attn)
#   SKIP_INSTALL=1   use the environment as it is (it must already have the project installed)
#   FORCE_INSTALL=1  run pip even when this environment was installed from the same pyproject.toml and settings
# The install is editable, so code changes need no re-install; a stamp in the environment skips pip on re-runs until
# pyproject.toml or the settings above change.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
VENV="${VENV:-$REPO_ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
PIP_TORCH_INDEX="${PIP_TORCH_INDEX:-}"
EXTRAS="${EXTRAS:-test}"

if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating virtual environment $VENV with $($PYTHON --version 2>&1)"
    "$PYTHON" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
export PATH="$VENV/bin:$PATH"
# The environment is installed --no-compile (below), so Python compiles what it imports on first use and keeps the
# .pyc. Where PYTHONDONTWRITEBYTECODE is set (as on the project's machines) nothing is ever kept, and every process
# (Ray workers, torchrun ranks, CLI runs) compiles torch & co. from source again: ~2x the CPU of a process start. Keep
# the bytecode in one folder inside the environment instead, none next to the sources (tests/conftest.py does the same
# for a bare pytest run). HYDIT_PYCACHE=0 leaves the setting alone.
if [ -n "${PYTHONDONTWRITEBYTECODE:-}" ] && [ "${HYDIT_PYCACHE:-1}" != "0" ]; then
    export PYTHONPYCACHEPREFIX="${PYTHONPYCACHEPREFIX:-$VENV/.pycache}"
    unset PYTHONDONTWRITEBYTECODE
fi

STAMP_FILE="$VENV/.hydit-install-stamp"
STAMP="$(cat pyproject.toml; echo "$TORCH_SPEC|$PIP_TORCH_INDEX|$EXTRAS")"
if [ "${SKIP_INSTALL:-0}" != "1" ] && [ "${FORCE_INSTALL:-0}" != "1" ] && [ -f "$STAMP_FILE" ] \
        && [ "$(cat "$STAMP_FILE")" == "$STAMP" ]; then
    echo "[setup] $VENV is up to date with pyproject.toml (FORCE_INSTALL=1 re-installs)"
    SKIP_INSTALL=1
fi

if [ "${SKIP_INSTALL:-0}" != "1" ]; then
    rm -f "$STAMP_FILE"
    t0=$SECONDS
    # --no-compile: byte-compiling all of torch/ray/transformers at install time costs minutes on 2 cores; Python
    # compiles the modules actually imported on first use instead.
    PIP=("$VPY" -m pip install --progress-bar off --disable-pip-version-check --no-compile)
    if [ "${VERBOSE:-0}" != "1" ]; then PIP+=(-q); fi
    torch_args=("$TORCH_SPEC")
    if [ -n "$PIP_TORCH_INDEX" ]; then torch_args+=(--index-url "$PIP_TORCH_INDEX"); fi
    echo "[setup] installing $TORCH_SPEC${PIP_TORCH_INDEX:+ from $PIP_TORCH_INDEX}"
    "${PIP[@]}" "${torch_args[@]}"
    t1=$SECONDS
    echo "[setup] installing this project with extras [$EXTRAS] (editable)"
    "${PIP[@]}" -e ".[$EXTRAS]"
    echo "[setup] done in $((SECONDS - t0)) s (torch $((t1 - t0)) s, project $((SECONDS - t1)) s):" \
        "$("$VPY" -c 'import torch; print("torch", torch.__version__, "cuda" if torch.cuda.is_available() else "cpu")')"
    printf '%s' "$STAMP" > "$STAMP_FILE"
fi
