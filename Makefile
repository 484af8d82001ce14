# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv at the repo root.
PY ?= python3
# Where to get CPU PyTorch. Empty: the configured pip index (a local wheel folder here); on public PyPI, Linux
# x86-64 wheels of torch are CUDA builds, so pass TORCH_INDEX=https://download.pytorch.org/whl/cpu there.
TORCH_INDEX ?=
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test venv clean

venv: $(STAMP)

$(STAMP): setup.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU PyTorch first: a plain `torch` requirement would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q test

demo: $(STAMP)
	$(BIN)/pdlm-ros demo

clean:
	rm -rf $(VENV) out
