#!/bin/bash
# The whole GPU training table in one command, on a fresh machine with NVIDIA GPUs:
#
#   bash benchmarks/gpu.sh
#
# 1. installs segtrain in a virtual environment (VENV, default .venv-gpu): `pip install -e .`
#    plus TensorFlow's CUDA wheels (`tensorflow[and-cuda]`), from the package registry only;
# 2. fabricates and prepares a VOC-like dataset (as benchmarks/bench_input.py does) for the
#    "input pipeline on" rows;
# 3. runs benchmarks/bench_train.py over U-Net (depth 4, 64 filters) asked at 572x572 and
#    DeepLab v3 (ResNet-50, output stride 16) at 513x513, batch 8, float32 / mixed_float16 /
#    mixed_bfloat16, XLA off / on, 1 GPU / all GPUs, input pipeline off (one batch in memory) /
#    on. Sizes a model cannot take are rounded to the nearest one it takes and noted under the
#    table: the U-Net needs multiples of 16, so 572 runs at 576; DeepLab takes any size.
#
# It writes the markdown table (for benchmarks/RESULTS.md) to OUT (default
# benchmarks/gpu-results.md) and the rows to benchmarks/gpu-results.json. On an H200-class
# GPU expect the order of a minute per row (the XLA rows compile first), 48 rows with 2+ GPUs.
#
# Settings (environment): VENV, INSTALL=0 (use VENV as it is), STEPS (20), ROUNDS (5),
# BATCH (8), MODELS ("unet:572,deeplabv3:513"), PRECISIONS, XLA ("off,on"), INPUTS
# ("memory,pipeline"; add pipeline_on_device for the pipeline with pipeline.colour_on_device,
# colour jitter and normalisation in the GPU step), VOC_IMAGES (200), WORKDIR (the fabricated
# dataset, reused), OUT.
#
# DRY_RUN=1 runs the same path on a CPU at toy sizes (no GPU check; the 2-replica rows split the
# CPU into 2 logical devices), to check the script end to end:
#
#   DRY_RUN=1 VENV=.venv INSTALL=0 bash benchmarks/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."

DRY_RUN="${DRY_RUN:-0}"
VENV="${VENV:-.venv-gpu}"
INSTALL="${INSTALL:-1}"
if [ "${DRY_RUN}" = 1 ]; then
    # Toy sizes; the U-Net's 60 is rounded to 64 as 572 is to 576 on the GPU.
    MODELS="${MODELS:-unet:60,deeplabv3:33}"
    BATCH="${BATCH:-2}" STEPS="${STEPS:-1}" ROUNDS="${ROUNDS:-1}" VOC_IMAGES="${VOC_IMAGES:-8}"
    UNET_FILTERS="${UNET_FILTERS:-4}"
    OUT="${OUT:-benchmarks/gpu-dry-run.md}"
    JSON="${JSON:-benchmarks/gpu-dry-run.json}"
fi
MODELS="${MODELS:-unet:572,deeplabv3:513}"
BATCH="${BATCH:-8}"
STEPS="${STEPS:-20}"
ROUNDS="${ROUNDS:-5}"
PRECISIONS="${PRECISIONS:-float32,mixed_float16,mixed_bfloat16}"
XLA="${XLA:-off,on}"
INPUTS="${INPUTS:-memory,pipeline}"
VOC_IMAGES="${VOC_IMAGES:-200}"
UNET_FILTERS="${UNET_FILTERS:-64}"
WORKDIR="${WORKDIR:-${TMPDIR:-/tmp}/segtrain-gpu-bench}"
OUT="${OUT:-benchmarks/gpu-results.md}"
JSON="${JSON:-benchmarks/gpu-results.json}"

die() { echo "benchmarks/gpu.sh: $*" >&2; exit 1; }

# Fail fast, before installing anything, where there is no NVIDIA GPU.
if [ "${DRY_RUN}" != 1 ]; then
    command -v nvidia-smi >/dev/null 2>&1 || die "no nvidia-smi here: this benchmark needs NVIDIA GPUs (and their driver). For CPU figures run benchmarks/bench_train.py; DRY_RUN=1 checks this script on a CPU."
    nvidia-smi -L >/dev/null 2>&1 || die "nvidia-smi finds no GPU (or no driver): $(nvidia-smi -L 2>&1 | head -1)"
fi

if [ "${INSTALL}" = 1 ]; then
    [ -x "${VENV}/bin/python" ] || python3 -m venv "${VENV}" || die "could not create the virtual environment ${VENV} (python3 -m venv)."
    "${VENV}/bin/python" -m pip install --quiet --upgrade pip
    if [ "${DRY_RUN}" = 1 ]; then
        "${VENV}/bin/python" -m pip install --quiet -e .
    else
        "${VENV}/bin/python" -m pip install --quiet -e . "tensorflow[and-cuda]>=2.21"
    fi
fi
PYTHON="${VENV}/bin/python"
[ -x "${PYTHON}" ] || die "no ${PYTHON}: set VENV to a virtual environment with segtrain, or INSTALL=1."

if [ "${DRY_RUN}" = 1 ]; then
    GPUS=0
    REPLICAS="${REPLICAS:-1,2}"
else
    GPUS=$("${PYTHON}" -c "import tensorflow as tf; print(len(tf.config.list_physical_devices('GPU')))" 2>/dev/null) \
        || die "TensorFlow does not start in ${VENV}: $("${PYTHON}" -c 'import tensorflow' 2>&1 | tail -1)"
    [ "${GPUS}" -gt 0 ] || die "TensorFlow in ${VENV} sees no GPU although nvidia-smi does: check that tensorflow[and-cuda] installed and the CUDA driver is recent enough."
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    REPLICAS="${REPLICAS:-$([ "${GPUS}" -gt 1 ] && echo "1,${GPUS}" || echo 1)}"
fi

mkdir -p "${WORKDIR}"
echo "gpu.sh: models ${MODELS}, batch ${BATCH}, ${PRECISIONS}, XLA ${XLA}, replicas ${REPLICAS}, inputs ${INPUTS}" >&2
status=0
"${PYTHON}" benchmarks/bench_train.py \
    --gin_file=gin/base/train.gin --gin_file=gin/datasets/shapes.gin \
    --gin_param="models.unet.depth = 4" --gin_param="models.unet.base_filters = ${UNET_FILTERS}" \
    --models="${MODELS}" --batch="${BATCH}" --steps="${STEPS}" --rounds="${ROUNDS}" \
    --precisions="${PRECISIONS}" --xla="${XLA}" --replicas="${REPLICAS}" --input="${INPUTS}" \
    --workdir="${WORKDIR}" --voc_images="${VOC_IMAGES}" --json="${JSON}" | tee "${OUT}" || status=$?
{
    echo
    echo "- Command: \`bash benchmarks/gpu.sh\` (MODELS=${MODELS} BATCH=${BATCH} STEPS=${STEPS} ROUNDS=${ROUNDS} DRY_RUN=${DRY_RUN})"
    echo "- Date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "- Machine: $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | sort | uniq -c | sed 's/^ *//' | paste -sd ';' || true) $(nproc) CPU cores; $("${PYTHON}" -c 'import platform, tensorflow as tf, keras; print(f"Python {platform.python_version()}, tensorflow {tf.__version__}, keras {keras.__version__}")' 2>/dev/null)"
} | tee -a "${OUT}"
echo "gpu.sh: wrote ${OUT} and ${JSON}" >&2
exit "${status}"
