#!/bin/bash
# The training benchmark on one GPU: U-Net and a DeepLab-like model at 512x512,
# float32 vs mixed_float16 vs mixed_bfloat16, XLA off and on; one table on stdout.
#
#   bash benchmarks/gpu.sh                 # after `pip install -e .` on a machine with a GPU
#   MODELS="unet" SIZE=256 bash benchmarks/gpu.sh
#
# Models not in the registry of this checkout are left out with a note. Rows go to
# benchmarks/gpu-results.json as well.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
SIZE="${SIZE:-512}"
BATCH="${BATCH:-8}"
STEPS="${STEPS:-20}"
ROUNDS="${ROUNDS:-5}"
WANTED="${MODELS:-unet deeplabv3}"

if ! "${PYTHON}" -c "import tensorflow as tf, sys; sys.exit(0 if tf.config.list_physical_devices('GPU') else 1)" 2>/dev/null; then
    echo "benchmarks/gpu.sh: TensorFlow sees no GPU here; run benchmarks/bench_train.py for CPU figures." >&2
    exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

available=$("${PYTHON}" -m segtrain.cli list 2>/dev/null | sed -n '/^models:/,/^$/p' | awk 'NR>1 && /^  [a-z]/ {sub(/\(.*/, "", $1); print $1}')
models=()
for m in ${WANTED}; do
    if grep -qx "${m}" <<<"${available}"; then models+=("${m}"); else echo "gpu.sh: model '${m}' is not registered here; skipped." >&2; fi
done
if [ "${#models[@]}" -eq 0 ]; then
    echo "gpu.sh: none of the models '${WANTED}' is registered." >&2
    exit 1
fi
model_list=$(IFS=,; echo "${models[*]}")

# The full-size U-Net of the paper (depth 4, 64 filters) unless the gin parameters say otherwise.
"${PYTHON}" benchmarks/bench_train.py \
    --gin_file=gin/base/train.gin --gin_file=gin/datasets/shapes.gin \
    --gin_param="models.unet.depth = 4" --gin_param="models.unet.base_filters = 64" \
    --models="${model_list}" --size="${SIZE}" --batch="${BATCH}" --steps="${STEPS}" --rounds="${ROUNDS}" \
    --precisions=float32,mixed_float16,mixed_bfloat16 --xla=off,on --replicas=1 \
    --json=benchmarks/gpu-results.json
