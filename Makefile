# Every target creates and reuses its own virtual environment: a fresh clone needs only `make <target>`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TRITON_VENV := .venv-triton
RAY_VENV := .venv-ray
KSERVE_VENV := .venv-kserve
DOCS_VENV := .venv-docs
# the stub generator (grpcio-tools) apart from .venv: its protoc sets the stubs' protobuf and grpcio floors
PROTOGEN_VENV := .venv-protogen
MODELS ?= models
# what `make serve` (and serve-envoy, serve-ray, bench, soak) need: exported when missing; the int8
# twins are served beside their float models and measured by make bench. Defined before any rule
# names it: make expands a rule's prerequisites as it reads the rule.
DEFAULT_MODELS := $(MODELS)/encoder/1/model.onnx $(MODELS)/speaker_id/1/model.onnx \
	$(MODELS)/encoder_int8/1/model.onnx $(MODELS)/speaker_id_int8/1/model.onnx
PROTO_OUT := server/proto
SERVE_ARGS ?=
HTTP_PORT ?= 8000

.DEFAULT_GOAL := help
.PHONY: help venv validate-deploy proto proto-check export serve serve-envoy serve-ray ray-venv test test-fast test-ray bench soak train lint clean triton-venv kserve-venv docs docs-venv protogen-venv

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(VENV)/.installed: requirements.txt requirements-dev.txt requirements-kserve-schema.txt requirements-models.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -m pip install -q --no-deps --require-hashes -r requirements-models.txt
	$(PY) -m pip download -q --no-deps --only-binary=:all: --require-hashes -r requirements-kserve-schema.txt -d .cache/kserve
	touch $@

venv: $(VENV)/.installed ## create the virtual environment (.venv) with the pinned dependencies

$(TRITON_VENV)/.installed: requirements-triton.txt
	test -x $(TRITON_VENV)/bin/python || $(PYTHON) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/python -m pip install -q -r requirements-triton.txt
	touch $@

triton-venv: $(TRITON_VENV)/.installed ## separate venv with tritonclient (it needs protobuf < 7)

$(RAY_VENV)/.installed: requirements-ray.txt requirements-server.txt
	test -x $(RAY_VENV)/bin/python || $(PYTHON) -m venv $(RAY_VENV)
	$(RAY_VENV)/bin/python -m pip install -q -r requirements-ray.txt
	touch $@

$(KSERVE_VENV)/.installed: requirements-kserve.txt
	test -x $(KSERVE_VENV)/bin/python || $(PYTHON) -m venv $(KSERVE_VENV)
	$(KSERVE_VENV)/bin/python -m pip install -q -r requirements-kserve.txt
	touch $@

kserve-venv: $(KSERVE_VENV)/.installed ## separate venv with KServe's Python SDK (~450 MB; its clients are tested against the server)

ray-venv: $(RAY_VENV)/.installed ## separate venv with ray[serve] (~500 MB; optional extra)

$(DOCS_VENV)/.installed: requirements-docs.txt
	test -x $(DOCS_VENV)/bin/python || $(PYTHON) -m venv $(DOCS_VENV)
	$(DOCS_VENV)/bin/python -m pip install -q -r requirements-docs.txt
	touch $@

docs-venv: $(DOCS_VENV)/.installed ## separate venv with mkdocs-material (pinned in requirements-docs.txt)

docs: $(DOCS_VENV)/.installed ## build the docs site into site/ (mkdocs --strict: a broken link or page fails)
	NO_MKDOCS_2_WARNING=1 $(DOCS_VENV)/bin/python -m mkdocs build --strict --site-dir site
	@echo "docs: site/index.html"

serve-ray: $(RAY_VENV)/.installed $(DEFAULT_MODELS) ## the data plane on Ray Serve: 2 local nodes, 2 replicas, gRPC proxy on :9000
	PYTHONPATH=. $(RAY_VENV)/bin/python -m scale.ray_serve --models $(MODELS)

validate-deploy: $(VENV)/.installed ## validate deploy/ manifests offline (Kubernetes schemas; KServe schema from its SDK)
	$(PY) -m deploy.validate

$(PROTOGEN_VENV)/.installed: requirements-protogen.txt
	test -x $(PROTOGEN_VENV)/bin/python || $(PYTHON) -m venv $(PROTOGEN_VENV)
	$(PROTOGEN_VENV)/bin/python -m pip install -q -r requirements-protogen.txt
	touch $@

protogen-venv: $(PROTOGEN_VENV)/.installed ## separate venv with the stub generator (grpcio-tools, pinned in requirements-protogen.txt)

# generate.py runs as a script (not -m server...): the generator venv has grpcio-tools, not the server's dependencies
proto: $(PROTOGEN_VENV)/.installed ## regenerate the gRPC stubs in server/proto from protos/*.proto
	$(PROTOGEN_VENV)/bin/python server/proto/generate.py $(PROTO_OUT)

proto-check: $(PROTOGEN_VENV)/.installed ## fail if the committed stubs differ from what protos/ generates
	$(PROTOGEN_VENV)/bin/python server/proto/generate.py $(PROTO_OUT) --check

export: $(VENV)/.installed ## export the default family with its int8 twins, and the static/dynamic/precision report, into models/
	$(PY) -m export --out $(MODELS)

$(DEFAULT_MODELS) &: | $(VENV)/.installed
	$(PY) -m export --out $(MODELS) --no-report

serve: $(VENV)/.installed $(DEFAULT_MODELS) ## serve gRPC on 127.0.0.1:8001 and HTTP/REST on :8000 (exports models if missing)
	$(PY) -m server --model-repository $(MODELS) --http-port $(HTTP_PORT) $(SERVE_ARGS)

serve-envoy: $(VENV)/.installed $(DEFAULT_MODELS) ## 2 server replicas behind Envoy (health checks, retries); prints the address
	$(PY) -m scale.envoy --replicas 2 --models $(MODELS)

train: $(VENV)/.installed ## retrain the speaker-ID classifier (Japanese Vowels, ~15 s) into export/checkpoints/
	$(PY) -m export.train

bench: $(VENV)/.installed $(DEFAULT_MODELS) ## benchmark: PyTorch, ORT, server (batching off/on, 2 workers), static, int8, shared memory; writes docs/bench.{json,png} (make docs: the performance page)
	$(PY) -m bench --models $(MODELS)

soak: $(VENV)/.installed $(DEFAULT_MODELS) ## 60 s saturation: every request accounted for, sampled results checked, RSS drift
	$(PY) -m bench.soak --models $(MODELS) --out docs/soak.json

test: $(VENV)/.installed $(TRITON_VENV)/.installed $(KSERVE_VENV)/.installed $(PROTOGEN_VENV)/.installed docs ## run the whole test suite (proto check, docs build, export, server, tritonclient); Ray: make test-ray
	$(PROTOGEN_VENV)/bin/python server/proto/generate.py $(PROTO_OUT) --check
	TRITON_PYTHON=$(abspath $(TRITON_VENV))/bin/python KSERVE_PYTHON=$(abspath $(KSERVE_VENV))/bin/python \
		$(PY) -m pytest -q --durations=10 --ignore=tests/test_ray.py

test-fast: $(VENV)/.installed $(TRITON_VENV)/.installed ## the tests not marked slow (under a minute): the edit loop; make test runs all
	TRITON_PYTHON=$(abspath $(TRITON_VENV))/bin/python $(PY) -m pytest -q -m "not slow" --durations=5 --ignore=tests/test_ray.py

test-ray: $(VENV)/.installed $(TRITON_VENV)/.installed $(RAY_VENV)/.installed ## the Ray Serve tests (builds .venv-ray, ~800 MB)
	TRITON_PYTHON=$(abspath $(TRITON_VENV))/bin/python RAY_PYTHON=$(abspath $(RAY_VENV))/bin/python $(PY) -m pytest -q tests/test_ray.py

lint: $(VENV)/.installed ## ruff check and format check
	$(PY) -m ruff check export server bench scale deploy tests docs/hooks
	$(PY) -m ruff format --check export server bench scale deploy tests docs/hooks

clean: ## remove generated models and caches (keeps the venvs)
	rm -rf $(MODELS)/*/ site .pytest_cache .ruff_cache .hypothesis
