# Every target installs what it needs and is safe to run again.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.framebus-installed

.PHONY: setup test lint demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/install-system-deps.sh
	bash scripts/install-system-deps.sh
	test -x $(PY) || /usr/bin/python3 -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check framebus tests
	$(VENV)/bin/ruff format --check framebus tests
	$(VENV)/bin/mypy

demo: setup
	$(VENV)/bin/framebus demo

bench: setup
	$(VENV)/bin/framebus bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
