#!/usr/bin/env bash
# GPU check, in one run of under 8 minutes on a CUDA machine, from the repository root:
#   (a) the parity tests (tests/test_parity.py) with the model on the GPU in float32 (TF32 off), against the
#       fixtures' own tolerances;
#   (b) bench/engine_bench.py in bf16 on the GPU, every ratio against the GPU's bf16 matrix rate and read
#       bandwidth measured in the same run.
#
#   bash bench/gpu_check.sh
#
# The repository must be the current directory. The project is installed (`pip install -e .[test]`) only when
# `import dsvl2` fails. The parity fixtures are read from DSVL2_PARITY_DIR, else ../shared/parity, else
# shared/parity or .parity inside the repository (a machine that receives only the repository needs them copied
# in: about 24 MB). The benchmark writes its random deepseek-vl2-tiny checkpoint (~7 GB) to bench/out/ on first use.
#
# Settings (environment):
#   GPU_CHECK_OUT         where the logs and the benchmark's JSON go (default bench/out)
#   GPU_CHECK_DEVICE      cuda (default), or cpu to run the same steps on a machine without a GPU
#   GPU_CHECK_BENCH_ARGS  extra arguments for engine_bench.py (e.g. a smaller job for a CPU dry run)
#   PYTHON                the interpreter (default python3)
set -uo pipefail

PY=${PYTHON:-python3}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
RESULTS=${GPU_CHECK_OUT:-bench/out}
export PYTHONUNBUFFERED=1
if [[ $DEVICE == cuda* ]]; then
    # The CPU kernels never take a GPU tensor: building them (a minute of the device's time) would buy nothing.
    export DSVL2_KERNELS=${DSVL2_KERNELS:-0}
fi
start=$SECONDS

if [[ ! -f pyproject.toml || ! -f bench/engine_bench.py || ! -f tests/test_parity.py ]]; then
    echo "gpu_check: run me from the dsvl2 repository root (no pyproject.toml / bench / tests here: $PWD)" >&2
    exit 2
fi
mkdir -p "$RESULTS"

echo "== machine"
if command -v nvidia-smi >/dev/null; then
    nvidia-smi
elif [[ $DEVICE == cuda* ]]; then
    echo "gpu_check: nvidia-smi not found and GPU_CHECK_DEVICE=$DEVICE" >&2
    exit 2
else
    echo "(no nvidia-smi: running on $DEVICE)"
fi
"$PY" - <<'EOF' || exit 2
import platform, torch, PIL
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"cuDNN {torch.backends.cudnn.version()}, Pillow {PIL.__version__}, cuda available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device 0: {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, "
          f"capability {p.major}.{p.minor}, bf16: {torch.cuda.is_bf16_supported()}")
EOF
if [[ $DEVICE == cuda* ]] && ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "gpu_check: torch sees no CUDA device" >&2
    exit 2
fi

echo "== install"
if "$PY" -c "import dsvl2" 2>/dev/null; then
    echo "dsvl2 already importable"
else
    # First the project alone, with the interpreter's own setuptools (an offline machine cannot fetch a build
    # environment: pip retries that for ~25 s); with its dependencies only where something the check imports is
    # missing.
    { "$PY" -m pip install -q --no-deps --no-build-isolation -e . && "$PY" -c "import dsvl2.model.engine, pytest"; } \
        || "$PY" -m pip install -q --retries 0 --timeout 10 -e ".[test]" \
        || echo "gpu_check: pip could not install the project; importing it from a package tree of links instead"
fi
if ! "$PY" -c "import dsvl2.model.engine" 2>/dev/null; then
    # pyproject's package-dir mapping as links: dsvl2/ holds dsvl2_cli's files, model/ and pipelines/.
    shim=$(mktemp -d)/dsvl2
    mkdir -p "$shim"
    ln -s "$PWD"/dsvl2_cli/*.py "$shim"/
    ln -s "$PWD/model" "$shim/model"
    ln -s "$PWD/pipelines" "$shim/pipelines"
    export PYTHONPATH="$(dirname "$shim")${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" -c "import dsvl2.model.engine, pytest; print('dsvl2 from', dsvl2.__file__)" || exit 2

if [[ -z ${DSVL2_PARITY_DIR:-} ]]; then
    for candidate in ../shared/parity shared/parity .parity; do
        if [[ -d $candidate/checkpoints ]]; then
            DSVL2_PARITY_DIR=$(cd "$candidate" && pwd)
            break
        fi
    done
fi
if [[ ! -d ${DSVL2_PARITY_DIR:-}/checkpoints ]]; then
    echo "gpu_check: no parity fixtures (set DSVL2_PARITY_DIR, or copy them to ../shared/parity or .parity)" >&2
    exit 2
fi
export DSVL2_PARITY_DIR
echo "parity fixtures: $DSVL2_PARITY_DIR"

echo "== (a) parity tests, model on $DEVICE in float32 ($((SECONDS - start)) s so far)"
DSVL2_TEST_DEVICE=$DEVICE timeout 150 "$PY" -m pytest -q -p no:cacheprovider tests/test_parity.py 2>&1 \
    | tee "$RESULTS/gpu_check_parity.log"
parity=${PIPESTATUS[0]}

echo "== (b) engine benchmark, bf16 on $DEVICE ($((SECONDS - start)) s so far)"
# shellcheck disable=SC2086  # GPU_CHECK_BENCH_ARGS is a list of arguments
timeout 300 "$PY" bench/engine_bench.py --device "$DEVICE" --dtype bfloat16 \
    --json "$RESULTS/engine_$DEVICE.json" ${GPU_CHECK_BENCH_ARGS:-} 2>&1 | tee "$RESULTS/gpu_check_bench.log"
bench=${PIPESTATUS[0]}

echo "== done in $((SECONDS - start)) s: parity tests exit $parity, benchmark exit $bench (124: timed out)"
echo "   logs and $RESULTS/engine_$DEVICE.json in $RESULTS"
[[ $parity == 0 && $bench == 0 ]]
