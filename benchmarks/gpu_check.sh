#!/usr/bin/env bash
# tinyrefine's CUDA path on a real GPU, in one go (under 8 minutes on one GPU), then a summary:
#   env         the GPU, driver, CUDA, CuPy and torch (and that CuPy is real, not the CPU emulator)
#   cuda-tests  tests/test_cuda.py and friends: every kernel against NumPy, strided inputs, NaN, determinism
#   ops         benchmarks/ops.py --device cuda: the kernels beside torch CUDA
#   train-step  benchmarks/train_step.py --device cuda: a RefineNet-ResNet-50 step beside its torch twin
#   demo        python -m tinyrefine demo --device cuda, shortened to $GPU_CHECK_DEMO_ITERS iterations
#
# It runs tinyrefine from this checkout through PYTHONPATH and installs nothing: the machine needs
# numpy, CuPy (cupy-cuda12x or cupy-cuda13x), torch with CUDA, pytest, pillow, matplotlib and tqdm.
#
#   bash benchmarks/gpu_check.sh                 # logs and summary.txt in $GPU_CHECK_LOGS (or $OUT, or a temp dir)
#   PYTHONPATH=../shared/tools/fakecupy GPU_CHECK_EMULATED=1 bash benchmarks/gpu_check.sh
#                                                # a dry run on the CPU emulator, at toy sizes (checks the script)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" MPLBACKEND=Agg PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
LOGS=${GPU_CHECK_LOGS:-${OUT:-$(mktemp -d)}}
mkdir -p "$LOGS"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
EMULATED=${GPU_CHECK_EMULATED:-0}
export GPU_CHECK_EMULATED=$EMULATED
SUMMARY=()
FAILED=0

# stage NAME SECONDS COMMAND...: run with a time limit (the limits add up to 7.5 minutes), log to $LOGS/NAME.log
stage() {
    local name=$1 limit=$(($2 * LIMIT_SCALE))
    shift 2
    echo
    echo "== $name (limit $limit s): $*"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$LOGS/$name.log"
    local rc=${PIPESTATUS[0]} status=ok
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then status="TIMED OUT"; FAILED=1
    elif [ "$rc" != 0 ]; then status="FAILED (exit $rc)"; FAILED=1; fi
    SUMMARY+=("$(printf '%-11s %-17s %4d s' "$name" "$status" $((SECONDS - start)))")
    return "$rc"
}

LIMIT_SCALE=${GPU_CHECK_LIMIT_SCALE:-1}
if [ "$EMULATED" = 1 ]; then   # toy sizes: the emulator runs every GPU thread one after another
    LIMIT_SCALE=${GPU_CHECK_LIMIT_SCALE:-5}
    OPS_ARGS=(--only bilinear --repeat 1)
    STEP_ARGS=(--sizes 32 --steps 1)
    DEMO_ARGS=(--iters 2 --data shapes:32 --crop 32 --eval-size 32)
else
    OPS_ARGS=(--repeat 10)
    STEP_ARGS=(--sizes 256 320 --steps 5)
    DEMO_ARGS=(--iters "${GPU_CHECK_DEMO_ITERS:-500}")
fi

stage env 30 "$PY" - <<'EOF'
import os, platform, shutil, subprocess
import numpy as np
import tinyrefine
from tinyrefine import backend
if shutil.which("nvidia-smi"):   # its header names the highest CUDA the driver supports: pick the CuPy wheel by it
    print(subprocess.run(["nvidia-smi"], capture_output=True, text=True).stdout.split("|===")[0].strip())
print("python", platform.python_version(), "| numpy", np.__version__, "| tinyrefine", tinyrefine.__version__,
      "from", os.path.dirname(tinyrefine.__file__))
cp = backend._cupy
if cp is None:
    raise SystemExit("CuPy does not import: pip install 'tinyrefine[cuda12]' or '[cuda13]' (see README)")
emulated = getattr(cp, "_EMULATED", False)
print("cupy", cp.__version__, "(the CPU EMULATOR)" if emulated else "")
if emulated and os.environ.get("GPU_CHECK_EMULATED") != "1":
    raise SystemExit("cupy is the CPU emulator (fakecupy on PYTHONPATH): this is no GPU check; "
                     "set GPU_CHECK_EMULATED=1 for a dry run")
if not tinyrefine.cuda_available():
    raise SystemExit("CuPy sees no GPU")
props = cp.cuda.runtime.getDeviceProperties(0)
print("GPU", props["name"].decode(), "| compute capability", cp.cuda.Device(0).compute_capability,
      "| %.0f GiB" % (props["totalGlobalMem"] / 2 ** 30), "| CUDA runtime", cp.cuda.runtime.runtimeGetVersion(),
      "| driver", cp.cuda.runtime.driverGetVersion())
try:
    import torch
    print("torch", torch.__version__, "| CUDA", torch.version.cuda, "| torch sees the GPU:", torch.cuda.is_available())
except ImportError:
    print("torch not installed: the benchmarks print tinyrefine alone")
EOF
ENV_RC=$?

if [ "$ENV_RC" = 0 ]; then
    stage cuda-tests 120 "$PY" -m pytest -q -rs -p no:cacheprovider -o addopts= \
        tests/test_cuda.py tests/test_kernel_rules.py tests/test_cuda_transfers.py
    stage ops 60 "$PY" benchmarks/ops.py --device cuda "${OPS_ARGS[@]}"
    stage train-step 120 "$PY" benchmarks/train_step.py --device cuda "${STEP_ARGS[@]}"
    stage demo 120 "$PY" -m tinyrefine demo --device cuda "${DEMO_ARGS[@]}" --out "$WORK/demo" --quiet
fi

{
    echo
    echo "== summary ($( [ "$EMULATED" = 1 ] && echo "EMULATED dry run, not a GPU" || echo "GPU" ); logs in $LOGS)"
    printf '%s\n' "${SUMMARY[@]}"
    grep -h -m1 -E "^GPU |^cupy |^torch " "$LOGS/env.log" 2>/dev/null | sed 's/^/  /'
    [ -f "$LOGS/cuda-tests.log" ] && echo "cuda-tests: $(grep -E '(passed|failed|error)' "$LOGS/cuda-tests.log" | tail -1)"
    [ -f "$LOGS/ops.log" ] && { echo "ops (median ms, forward+backward, float32):"; grep -E "^(case|[a-z]+[0-9x ])" "$LOGS/ops.log" | sed 's/^/  /'; }
    [ -f "$LOGS/train-step.log" ] && { echo "train-step:"; grep -E "^ *(size|[0-9]+px|losses)" "$LOGS/train-step.log" | sed 's/^/  /'; }
    [ -f "$LOGS/demo.log" ] && { echo "demo:"; grep -E "^(trained|val mIoU)" "$LOGS/demo.log" | sed 's/^/  /'; }
    [ "$FAILED" = 0 ] && [ "$ENV_RC" = 0 ] && echo "ALL STAGES OK" || echo "SOME STAGES FAILED"
} | tee "$LOGS/summary.txt"
[ "$FAILED" = 0 ] && [ "$ENV_RC" = 0 ]
