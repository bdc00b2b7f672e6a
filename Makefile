# Sightline: every set-up step is a target; `make demo` and `make test` do all of them on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
STAMP := $(VENV)/.installed
GEN := build/gen/sightline/v1
PROTOS := $(wildcard protos/sightline/v1/*.proto)
PYTEST_ARGS ?=
# The contract tools (npm, never global): buf and the AsyncAPI parser, in build/tools/contract (tools/contract/).
CONTRACT_TOOLS := build/tools/contract
CONTRACT_STAMP := $(CONTRACT_TOOLS)/.installed
BUF := $(CONTRACT_TOOLS)/node_modules/.bin/buf
# buf breaking compares protos/ with the last release's: the image protos/baseline.binpb (checked in, so no git
# history is needed), built from the commit protos/BASELINE names; at each release bump that ref and run
# `make proto-baseline`.
HASH := \#
PROTO_BASELINE := $(shell grep -v '^$(HASH)' protos/BASELINE)
BASELINE_DIR := build/contract/baseline-$(PROTO_BASELINE)

.PHONY: setup install protos models samples tools demo lint lint-protos proto-baseline test test-fast bench clean

## setup: virtualenv, dependencies, generated code, face models, sample photos, helm, hadolint, buf, AsyncAPI parser
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

tools: build/tools/helm build/tools/hadolint $(CONTRACT_STAMP)
build/tools/helm build/tools/hadolint &: tools/install-helm.sh
	PYTHON=$(PY) bash tools/install-helm.sh build/tools

# npm ci installs exactly the lock file's versions; --ignore-scripts: buf needs no install script, and none of the
# other packages' scripts (one is a usage reporter) may run.
$(CONTRACT_STAMP): tools/contract/package.json tools/contract/package-lock.json tools/contract/validate-asyncapi.mjs
	@command -v npm >/dev/null || { echo "npm (Node.js 18 or newer) is needed for buf and the AsyncAPI parser" >&2; exit 1; }
	mkdir -p $(CONTRACT_TOOLS)
	cp $^ $(CONTRACT_TOOLS)/
	cd $(CONTRACT_TOOLS) && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
	touch $@

$(BASELINE_DIR)/protos/buf.yaml: protos/BASELINE
	rm -rf $(BASELINE_DIR) && mkdir -p $(BASELINE_DIR)
	git archive --format=tar -o $(BASELINE_DIR)/protos.tar $(PROTO_BASELINE) protos  # needs the commit in the history
	tar -x -f $(BASELINE_DIR)/protos.tar -C $(BASELINE_DIR) && rm $(BASELINE_DIR)/protos.tar

## demo: the main job on the embedded default (local broker, SQLite)
demo: setup
	$(BIN)/sightline demo

## lint: ruff (lint rules and formatting) on services/, tests/ and examples/, mypy --strict on services/common and
## services/sdk, buf on protos/
lint: install protos lint-protos
	$(BIN)/ruff check services tests examples
	$(BIN)/ruff format --check services tests examples
	$(BIN)/mypy

## lint-protos: buf lint, and buf breaking against the last release's protos (protos/baseline.binpb)
lint-protos: $(CONTRACT_STAMP)
	$(BUF) lint protos
	$(BUF) breaking protos --against protos/baseline.binpb

## proto-baseline: rebuild protos/baseline.binpb from the commit protos/BASELINE names (at a release)
proto-baseline: $(CONTRACT_STAMP) $(BASELINE_DIR)/protos/buf.yaml
	$(BUF) build $(BASELINE_DIR)/protos -o protos/baseline.binpb

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
