# The two commands of the README:  `make run`  and  `make test`.
# Both build everything they need from scratch (virtualenv, torch first, the project, the stubs).
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
RUN_ARGS ?=

.PHONY: setup system-deps run test lint protos protos-check gpu-check clean

setup: system-deps $(VENV)/.installed

# Debian tools the stack and the tests drive, installed when missing: redis-server (the control
# plane's state) and docker-compose 1.29 (validates docker-compose.yml; no Docker engine needed).
# Each is both the command and its Debian package.
SYSTEM_TOOLS := redis-server docker-compose
system-deps:
	@missing=""; for tool in $(SYSTEM_TOOLS); do command -v $$tool >/dev/null || missing="$$missing $$tool"; done; \
	if [ -n "$$missing" ]; then apt-get update -q && apt-get install -y -q $$missing; fi

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[server,test]'
	touch $@

# Generated gRPC code comes from this one entry point.
protos: setup
	$(PY) -m loraserve.codegen

protos-check: setup
	$(PY) -m loraserve.codegen --check

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

run: setup
	$(PY) -m entrypoints.run $(RUN_ARGS)

test: setup lint protos-check
	$(PY) -m pytest -q -n auto --maxprocesses 4 --dist loadfile

# The prepared accelerator check (bench/gpu_check.py): needs a CUDA GPU, not `make setup`, so it
# also runs on a bare GPU machine with the system python3.
GPU_CHECK_ARGS ?=
gpu-check:
	$(if $(wildcard $(PY)),$(PY),python3) -m bench.gpu_check $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) .run
