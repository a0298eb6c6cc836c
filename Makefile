# inferline: `make demo` runs the pipeline on the sample images, `make test` runs the tests.
# Both set up .venv first (idempotent; reinstalls only when pyproject.toml changes).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SHARED_MODELS := $(abspath ../shared/models)
SHARED_DATA := $(abspath ../shared/data)

STANDINS := $(abspath .cache/standins)

# Weights come from $INFERLINE_MODEL_DIR, defaulting to ../shared/models where it exists, plus
# .cache/standins where `make test` writes the CLIP stand-in (too large for shared/).
ifeq ($(origin INFERLINE_MODEL_DIR), undefined)
  ifneq ($(wildcard $(SHARED_MODELS)),)
    export INFERLINE_MODEL_DIR := $(SHARED_MODELS)$(if $(wildcard $(STANDINS)),:$(STANDINS))
  endif
endif

# The stand-in weights of ../shared/models (MANIFEST.md) are not the official releases, so their
# model configs refuse them; the demo, the tests, `make up` and `make compose-up` serve them by
# pinning their sha256 here, visibly (docs/reliability-security.md). Set INFERLINE_TRUSTED_WEIGHTS
# yourself (empty: trust only what the configs trust) to override.
STANDIN_WEIGHTS := sha256:33f4216002cafa403a4588a328e025d1542f2acda1e632c2f7ba8a9a95359b3b,$\
  sha256:25bbfbb18cb954526df555aa35b4d6ce4209a380bd090556c0dc16371214a040,$\
  sha256:6b9f40a9136c2376e8634d65ef7d207c1837d9d0701676ab21ad4ef57149dcbf,$\
  sha256:c13dab08bc102089ef3fd0650b6c4d8f2b2751b1407584d3163d08431223d089
ifeq ($(origin INFERLINE_TRUSTED_WEIGHTS), undefined)
  export INFERLINE_TRUSTED_WEIGHTS := $(STANDIN_WEIGHTS)
endif

.PHONY: setup lint demo test test-fast up protos check-protos bench bench-overload bench-memory clean openapi demo-screenshot check-rules monitoring-picture

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

demo: setup
	$(BIN)/inferline demo $(if $(wildcard $(SHARED_DATA)),--images $(SHARED_DATA))

# ruff's checks and mypy, as configured in pyproject.toml ([tool.ruff], [tool.mypy]); `make test`
# runs it first, so CI fails on a lint or type error. mypy reads common/ and services/ under their
# installed names (inferline.common, inferline.services) through the links in .cache/typecheck.
lint: setup
	@mkdir -p .cache/typecheck/inferline
	@ln -sfn ../../../common .cache/typecheck/inferline/common
	@ln -sfn ../../../services .cache/typecheck/inferline/services
	$(BIN)/ruff check .
	$(BIN)/mypy

# Line coverage of common/ and services/ is reported, and below [tool.coverage.report]
# fail_under in pyproject.toml the run fails.
test: setup lint
	$(BIN)/python -m pytest --cov --cov-report=term

test-fast: setup
	$(BIN)/python -m pytest -m "not slow"

up: setup
	$(BIN)/inferline up

protos: setup
	$(BIN)/python protos/generate.py

bench: setup
	$(BIN)/python bench/compare.py $(if $(wildcard $(SHARED_DATA)),--images $(SHARED_DATA))

# Reliability figures (docs/reliability.md): goodput at 4x and 10x saturation (~5 min), and idle
# memory after five overload episodes (~4 min). Both start their own stack on free ports.
bench-overload: setup
	$(BIN)/python bench/overload.py
bench-memory: setup
	$(BIN)/python bench/memory_episodes.py --episodes 5 --clients 200 --seconds 6

# Prometheus rules and config: promtool's checks and the rules' unit tests (docs/monitoring.md).
check-rules:
	deploy/tools/install-prometheus.sh >/dev/null
	promtool check rules deploy/prometheus/rules/inferline.rules.yaml
	cd deploy/prometheus/rules && promtool test rules inferline.rules.test.yaml
	promtool check config deploy/prometheus/prometheus.yml

# Redraws docs/monitoring-dashboard.png from a load run against a real Prometheus (~2 min).
monitoring-picture: setup
	$(BIN)/python bench/monitoring_load.py

clean:
	rm -rf $(VENV) out .pytest_cache

# The gateway's OpenAPI document, committed; tests/gateway/test_openapi_document.py fails when stale.
openapi: setup
	$(BIN)/python -m inferline.services.gateway.openapi docs/openapi.json

# docs/demo.png (the README's picture of the demo page), from the gateway's browser test.
demo-screenshot: setup
	INFERLINE_WRITE_DOCS=1 $(BIN)/python -m pytest -q --no-cov tests/gateway/test_demo_page_browser.py

# ---- Deployment (docs/deployment.md) -------------------------------------------------------
# Images: buildah where present (no daemon needed), else docker. Compose: docker compose, else
# podman-compose. Helm: helm on PATH, else the one deploy/tools/install-helm.sh puts in .cache/tools.
.PHONY: images compose-up compose-down deploy-local deploy-k8s helm-lint
IMAGES ?= controller preprocess postprocess inference-onnx gateway
COMPOSE_FILE := deploy/compose.yaml
PROFILES ?=
COMPOSE = $(shell if docker compose version >/dev/null 2>&1; then echo "docker compose"; \
  elif command -v podman-compose >/dev/null; then echo podman-compose; \
  elif [ -x .cache/tools/venv/bin/podman-compose ]; then echo $(abspath .cache/tools/venv/bin/podman-compose); fi)
HELM = $(shell command -v helm || { [ -x .cache/tools/bin/helm ] && echo $(abspath .cache/tools/bin/helm); })
RELEASE ?= inferline
NAMESPACE ?= inferline
HELM_VALUES ?=
# podman/buildah settings these machines need (runc, ulimits root may set); yours may differ.
export CONTAINERS_CONF ?= $(abspath deploy/tools/containers.conf)

images:
	@command -v buildah >/dev/null || command -v docker >/dev/null || \
	  { echo "make images: needs buildah or docker (deploy/tools/install-containers.sh installs buildah/podman on Debian)" >&2; exit 2; }
	deploy/docker/build.sh $(IMAGES)

compose-up:
	@[ -n "$(COMPOSE)" ] || { echo "make compose-up: needs 'docker compose' or podman-compose (deploy/tools/install-containers.sh)" >&2; exit 2; }
	cd deploy && $(COMPOSE) -f compose.yaml $(foreach p,$(PROFILES),--profile $(p)) up -d

compose-down:
	@[ -n "$(COMPOSE)" ] || { echo "make compose-down: needs 'docker compose' or podman-compose" >&2; exit 2; }
	cd deploy && $(COMPOSE) -f compose.yaml $(foreach p,$(PROFILES),--profile $(p)) down

deploy-local: images compose-up
	@echo "inferline is starting: controller on localhost:$${INFERLINE_CONTROLLER_HOST_PORT:-50051} (make compose-down stops it)"

helm-lint:
	@[ -n "$(HELM)" ] || { echo "make helm-lint: needs helm (deploy/tools/install-helm.sh)" >&2; exit 2; }
	$(HELM) lint --strict helm/inferline
	@for f in helm/inferline/ci/*.yaml; do $(HELM) lint --strict helm/inferline -f $$f >/dev/null && echo "lint ok with $$f"; done

deploy-k8s:
	@[ -n "$(HELM)" ] || { echo "make deploy-k8s: needs helm (deploy/tools/install-helm.sh, or your package manager)" >&2; exit 2; }
	@command -v kubectl >/dev/null || [ -x .cache/tools/bin/kubectl ] || { echo "make deploy-k8s: needs kubectl" >&2; exit 2; }
	@KUBECTL=$$(command -v kubectl || echo .cache/tools/bin/kubectl); $$KUBECTL config current-context >/dev/null 2>&1 || \
	  { echo "make deploy-k8s: no current kube context (kubectl config use-context NAME)" >&2; exit 2; }
	$(HELM) upgrade --install $(RELEASE) helm/inferline --namespace $(NAMESPACE) --create-namespace --wait --timeout 10m $(foreach f,$(HELM_VALUES),-f $(f))
