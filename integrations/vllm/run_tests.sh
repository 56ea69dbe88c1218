#!/usr/bin/env bash
# Build the vLLM environment if needed, then run the plugin's tests (tests/vllm, on CPU, a few minutes).
#   integrations/vllm/run_tests.sh [pytest args]        (VENV=path to use another environment)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd); root=$(cd "$here/../.." && pwd)
venv=${VENV:-$root/.venv-vllm}
[ -f "$venv/.tokenreduce-vllm-ready" ] || "$here/setup_env.sh" "$venv"
cd "$root"
export HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
exec "$venv/bin/python" -m pytest -q -p no:cacheprovider tests/vllm "$@"
