# Set-up and entry points. Every target installs what it needs into .venv first.
PYTHON ?= python3
VENV ?= .venv
BRATS_DIR ?= ../shared/data/brats
BIN := $(VENV)/bin

.PHONY: install demo test services

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

# A real search on the BraTS cases in $(BRATS_DIR): 2 to 3 minutes on 2 CPU cores.
demo: install
	$(BIN)/aeplat search --dataset brats --data-dir $(BRATS_DIR) --modality flair \
		--trials 12 --epochs 15 --grace-period 3 --max-concurrent 2

test: install
	$(BIN)/python -m pytest --durations=25

# PostgreSQL binaries for the tests in tests/deploy, which start and stop their own cluster.
# Installs Debian's postgresql package when initdb is missing; needs root and apt-get.
services:
	@if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1; then \
		echo "PostgreSQL binaries found."; \
	else \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; \
	fi
