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

.PHONY: setup demo test test-fast up protos check-protos bench clean openapi demo-screenshot check-rules monitoring-picture

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

demo: setup
	$(BIN)/inferline demo $(if $(wildcard $(SHARED_DATA)),--images $(SHARED_DATA))

# Line coverage of common/ and services/ is reported, and below [tool.coverage.report]
# fail_under in pyproject.toml the run fails.
test: setup
	$(BIN)/python -m pytest --cov --cov-report=term

test-fast: setup
	$(BIN)/python -m pytest -m "not slow"

up: setup
	$(BIN)/inferline up

protos: setup
	$(BIN)/python protos/generate.py

bench: setup
	$(BIN)/python bench/e2e_detect.py $(if $(wildcard $(SHARED_DATA)),--images $(SHARED_DATA))

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
