# Sightline: every set-up step is a target; `make demo` and `make test` do all of them on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
STAMP := $(VENV)/.installed
GEN := build/gen/sightline/v1
PROTOS := $(wildcard protos/sightline/v1/*.proto)
PYTEST_ARGS ?=

.PHONY: setup install protos models samples tools demo lint test test-fast bench clean

## setup: virtualenv, dependencies, generated code, face models, sample photos, helm
setup: install protos models samples tools

install: $(STAMP)
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	mkdir -p $(GEN) && touch $(GEN)/__init__.py
	$(PY) -m pip install --quiet -e '.[convert,test]'
	# rapidocr (MRZ OCR) declares the GUI build of OpenCV, which would overwrite the headless one we use: its real
	# dependencies are listed in pyproject.toml, the package itself goes in without them.
	$(PY) -m pip install --quiet --no-deps rapidocr-onnxruntime==1.4.4
	touch $(STAMP)

protos: $(GEN)/events_pb2.py
$(GEN)/events_pb2.py: $(PROTOS) $(STAMP)
	mkdir -p $(GEN) && touch $(GEN)/__init__.py
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=build/gen --pyi_out=build/gen --grpc_python_out=build/gen $(PROTOS)

models: install protos
	$(PY) -m sightline.common.models.convert.fetch

samples: install
	$(PY) -m sightline.tooling.samples

tools: build/tools/helm build/tools/hadolint
build/tools/helm build/tools/hadolint &: tools/install-helm.sh
	PYTHON=$(PY) bash tools/install-helm.sh build/tools

## demo: the main job on the embedded default (local broker, SQLite)
demo: setup
	$(BIN)/sightline demo

## lint: ruff (lint rules and formatting) on services/ and tests/, mypy --strict on services/common
lint: install protos
	$(BIN)/ruff check services tests
	$(BIN)/ruff format --check services tests
	$(BIN)/mypy

## test: lint, then every test, including the slow and PostgreSQL ones (skipped, with a message, if no server is
## reachable)
test: setup lint
	$(BIN)/pytest $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/pytest -m "not slow and not e2e" $(PYTEST_ARGS)

## bench: raw in-process loop vs the five services over the broker
bench: setup
	$(BIN)/sightline bench pipeline --json

clean:
	rm -rf build $(VENV) .pytest_cache
