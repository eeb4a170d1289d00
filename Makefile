# The two commands of README.md:
#   make serve   install, train on the synthetic default, serve on http://$(HOST):$(PORT)
#   make test    install (with test tools) and run the whole suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 3000
# make serve: a short tuning budget, so a fresh clone serves within 3 minutes, install included.
TRAIN_ARGS ?= --tune-budget 10
PYTEST_ARGS ?=

.PHONY: install install-dev train serve test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Three sets, each on top of the one before: serving (requirements.txt, all the image
# carries), training (requirements-train.txt), tests (requirements-dev.txt).
$(VENV)/.deps-train: requirements.txt requirements-train.txt | $(BIN)/python
	$(BIN)/pip install --disable-pip-version-check -q -r requirements-train.txt
	touch $@

$(VENV)/.deps-dev: requirements-dev.txt $(VENV)/.deps-train
	$(BIN)/pip install --disable-pip-version-check -q -r requirements-dev.txt
	touch $@

install: $(VENV)/.deps-train

install-dev: $(VENV)/.deps-dev

train: install
	$(BIN)/python -m training $(TRAIN_ARGS)

serve: train
	@echo ""
	@echo "Serving on http://$(HOST):$(PORT)  (Ctrl+C stops it). Try, from another shell:"
	@echo "  curl -s -X POST http://$(HOST):$(PORT)/recommend -H 'Content-Type: application/json' -d '{\"user_id\": \"u1\", \"k\": 5}'"
	@echo "  $(BIN)/python examples/client_sync.py http://$(HOST):$(PORT) u1"
	@echo "  $(BIN)/python examples/client_async.py http://$(HOST):$(PORT) u1 u2 u3"
	@echo ""
	$(BIN)/bentoml serve service:ApiService --host $(HOST) --port $(PORT)

test: $(VENV)/.deps-dev
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .schemathesis
