# Set-up and entry points. Every target installs what it needs into .venv first.
PYTHON ?= python3
VENV ?= .venv
BRATS_DIR ?= ../shared/data/brats
BIN := $(VENV)/bin

.PHONY: install demo test

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

# A real search on the BraTS cases in $(BRATS_DIR): about 5 minutes on 2 CPU cores.
demo: install
	$(BIN)/aeplat search --dataset brats --data-dir $(BRATS_DIR) --modality flair \
		--trials 12 --epochs 15 --grace-period 3 --max-concurrent 2

test: install
	$(BIN)/python -m pytest
