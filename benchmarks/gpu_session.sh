#!/usr/bin/env bash
# One device call that checks and measures everything a GPU can tell us (device-tool sessions:
# `run` this with timeout_s ~540 and read $OUT). QUICK=1 runs the same steps tiny, on CPU, to test
# the script itself. Needs torch, transformers>=5.17, torchvision, scikit-image, tqdm (no PyAV).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
PY=${PY:-python3}
if [ "${QUICK:-0}" = 1 ]; then
  ARCHS=(tiny-qwen2_5_vl tiny-llava_onevision); EXTRA=(--quick --device cpu)
else
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
  ARCHS=(llava-video-7b qwen2.5-vl-7b); EXTRA=(--frames 64 --retentions 0.1,0.2,0.3,0.5 --repeats 3)
fi
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
$PY -m pytest -q -p no:cacheprovider tests/gpu tests/test_semantics.py 2>&1 | tee "$OUT/tests.log" | tail -3
for arch in "${ARCHS[@]}"; do
  size=448; [[ $arch == llava* ]] && size=384
  timeout 240 $PY benchmarks/speed.py --arch "$arch" --size "$size" "${EXTRA[@]}" --out "$OUT/$arch" \
    2>&1 | grep -v "it/s" | tail -14
done
# compiled kernels (csrc/): built for this GPU on first use (tests/gpu above compiled them already),
# each measured against its torch reference at 64 frames x 169 x 3584, batch 1 and 8; then the
# end-to-end reduction overhead with the CUDA kernels on (compare with the framefusion 0.3 row above)
if [ "${QUICK:-0}" = 1 ]; then
  $PY benchmarks/kernels.py --quick --device cpu --repeats 2 --out "$OUT/kernels" 2>&1 | tail -22
else
  timeout 180 $PY benchmarks/kernels.py --device cuda --out "$OUT/kernels" 2>&1 | tail -22
  TOKENREDUCE_KERNELS=cuda timeout 200 $PY benchmarks/speed.py --arch qwen2.5-vl-7b --size 448 --frames 64 \
    --methods framefusion --retentions 0.3 --repeats 3 --out "$OUT/qwen2.5-vl-7b-kernels" 2>&1 | grep -v "it/s" | tail -6
fi
