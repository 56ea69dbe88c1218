#!/usr/bin/env bash
# One device call that checks and measures everything a GPU can tell us (device-tool sessions:
# `run` this with timeout_s ~540 and read $OUT). QUICK=1 runs the same steps tiny, on CPU, to test
# the script itself. STEPS picks steps (default: all, in this order; each has its own timeout so a
# slow step cannot starve the rest): tests speed vision kernels.
# Needs torch, transformers>=5.17, torchvision, scikit-image, tqdm, ninja (no PyAV: vision.py writes
# its clips with PyAV, so that step needs `pip install av`, ~30 MB, or is skipped with a message).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu}
STEPS=${STEPS:-tests speed vision kernels}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
PY=${PY:-python3}
has() { [[ " $STEPS " == *" $1 "* ]]; }
QWEN_METHODS=framefusion,fastv,aim,sms,pyramiddrop,evs,visionzip,shortv,static,static+framefusion,aim+shortv
LLAVA_METHODS=framefusion,fastv,aim,sms,visionzip,tome-vision
if [ "${QUICK:-0}" = 1 ]; then
  QWEN=tiny-qwen2_5_vl; LLAVA=tiny-llava_onevision; EXTRA=(--quick --device cpu); RET=0.3; RET_SWEEP=0.3
  VISION=(--frames 4 --size 112 --repeats 1 --device cpu)
else
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
  QWEN=qwen2.5-vl-7b; LLAVA=llava-video-7b; EXTRA=(--frames 64 --repeats 3); RET=0.3; RET_SWEEP=0.1,0.2,0.3,0.5
  VISION=(--arch qwen2.5-vl-7b --frames 64 --size 448 --repeats 3 --device cuda --dtype bf16)
fi
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
if has tests; then
  timeout 150 $PY -m pytest -q -p no:cacheprovider tests/gpu tests/test_semantics.py 2>&1 | tee "$OUT/tests.log" | tail -3
fi
if has speed; then  # every visual method at 30%, then the paper's retention sweep for the two main methods
  timeout 200 $PY benchmarks/speed.py --arch "$QWEN" --size 448 "${EXTRA[@]}" --methods "$QWEN_METHODS" \
    --retentions "$RET" --out "$OUT/$QWEN" 2>&1 | grep -v "it/s" | tail -16
  timeout 120 $PY benchmarks/speed.py --arch "$LLAVA" --size 384 "${EXTRA[@]}" --methods "$LLAVA_METHODS" \
    --retentions "$RET" --out "$OUT/$LLAVA" 2>&1 | grep -v "it/s" | tail -10
  timeout 120 $PY benchmarks/speed.py --arch "$QWEN" --size 448 "${EXTRA[@]}" --methods framefusion,aim \
    --retentions "$RET_SWEEP" --out "$OUT/$QWEN-sweep" 2>&1 | grep -v "it/s" | tail -12
fi
if has vision; then  # static camera / pan / cut clips: vision ms, prefill, TTFT, static fraction
  if $PY -c "import av" 2>/dev/null; then
    timeout 150 $PY benchmarks/vision.py "${VISION[@]}" --out "$OUT/vision" 2>&1 | grep -v "it/s" | tail -12
  else
    echo "vision step skipped: PyAV missing (pip install av)"
  fi
fi
# compiled kernels (csrc/): built for this GPU on first use (tests/gpu above compiled them already),
# each measured against its torch reference at 64 frames x 169 x 3584, batch 1 and 8; then the
# end-to-end reduction overhead with the CUDA kernels on (compare with the framefusion 0.3 row above)
if has kernels; then
  if [ "${QUICK:-0}" = 1 ]; then
    $PY benchmarks/bench_kernels.py --quick --device cpu --repeats 2 --out "$OUT/kernels" 2>&1 | tail -22
  else
    timeout 180 $PY benchmarks/bench_kernels.py --device cuda --out "$OUT/kernels" 2>&1 | tail -22
    TOKENREDUCE_KERNELS=cuda timeout 150 $PY benchmarks/speed.py --arch qwen2.5-vl-7b --size 448 --frames 64 \
      --methods framefusion --retentions 0.3 --repeats 3 --out "$OUT/qwen2.5-vl-7b-kernels" 2>&1 \
      | grep -v "it/s" | tail -6
  fi
fi
