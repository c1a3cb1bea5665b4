# Two entry points: `make book` and `make test`. Each creates .venv when missing and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BOOK_FLAGS ?= -W --keep-going

.PHONY: book test test-browser lint clean

# A relative RESNET_LESSONS_DATA names a path from where make runs, but the chapters run in book/: pass it on
# absolute. Named sources (cifar10, synthetic) are no paths here and pass unchanged.
ifneq ($(wildcard $(RESNET_LESSONS_DATA)),)
export RESNET_LESSONS_DATA := $(abspath $(RESNET_LESSONS_DATA))
endif

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed-%: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[$*]'
	touch $@

# Executes every chapter (profile from RESNET_LESSONS_PROFILE, else gpu/cpu by hardware) and renders HTML.
# RESNET_LESSONS_QUIET=1: a rendered page shows results, not half-drawn progress bars.
book: $(VENV)/.installed-book
	RESNET_LESSONS_QUIET=1 $(VENV)/bin/jupyter-book build . $(BOOK_FLAGS)
	@echo "The book: _build/html/index.html"

# Unit tests, then every chapter under nbval in the smoke profile (conftest.py sets it).
test: $(VENV)/.installed-test
	$(PY) -m pytest

# Only the headless-browser test of the built book (the published edition's workflow runs it after `make book`).
test-browser: $(VENV)/.installed-test
	$(PY) -m pytest tests/test_browser.py

# ruff (style, imports, likely bugs) over the code and mypy (types) over the library; both configured in pyproject.toml.
lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check src tests bench conftest.py
	$(VENV)/bin/mypy

clean:
	rm -rf _build
