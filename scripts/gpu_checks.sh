#!/usr/bin/env bash
# The checks only a CUDA machine can run, in one go (about 10 minutes on one H100):
#   1. the GPU tests: flash-attn vs SDPA (skipped when flash-attn is not installed) and bf16 autocast vs fp32;
#   2. bench/model_step.py, DiT-g/2 at 1024x1024 in bf16: tokens/s and MFU with SDPA, then with flash-attn if present;
#   3. bench/model_step.py against diffusers at the CPU bench's sizes, on the GPU.
# Uses the interpreter in $VPY (default: .venv/bin/python, else python3); it does not install anything, so it also
# runs on a machine without network. Logs go to ${OUT:-gpu_checks}/.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VPY="${VPY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
"$VPY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" ||
    { echo "[gpu_checks] no CUDA device visible" >&2; exit 1; }
LOGS="${OUT:-gpu_checks}"
mkdir -p "$LOGS"
rc=0
step() {  # step NAME CMD...: run, keep the log, report the last line
    local name=$1; shift
    echo "[gpu_checks] $name: $*"
    "$@" >"$LOGS/$name.log" 2>&1
    local code=$?
    echo "[gpu_checks] $name exit $code | $(tail -n 1 "$LOGS/$name.log")"
    [ "$code" -eq 0 ] || rc=1
}
step tests "$VPY" -m pytest -q -rs tests/test_model.py -k "gpu"
step mfu_sdpa "$VPY" bench/model_step.py --device cuda --config DiT-g/2 --dtype bf16 --image-size 1024 --batch 1 \
    --text-dims full --no-baseline --repeats 10 --warmup 3
if "$VPY" -c "import flash_attn" 2>/dev/null; then
    step mfu_flash "$VPY" bench/model_step.py --device cuda --config DiT-g/2 --dtype bf16 --image-size 1024 \
        --batch 1 --text-dims full --no-baseline --attn-backend flash --repeats 10 --warmup 3
else
    echo "[gpu_checks] mfu_flash skipped: flash-attn is not installed (pip install '.[gpu]')"
fi
step vs_diffusers "$VPY" bench/model_step.py --device cuda --dtype bf16 --repeats 21
exit "$rc"
