# The two set-up commands of the README: `make run` and `make test`.
VENV    ?= .venv
PY      := $(VENV)/bin/python
CONFIG  ?= config.json
# On Linux with an NVIDIA GPU: `make run EXTRAS=test,cuda` installs MLX's CUDA backend.
EXTRAS  ?= test
PYTHON  ?= python3

.PHONY: install run test lint demo clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed

run: install
	$(PY) main.py --config $(CONFIG)

lint: install
	$(VENV)/bin/ruff check mlx_router tests helper_tools benchmarks main.py
	$(VENV)/bin/mypy

test: lint
	$(PY) -m pytest -p no:cacheprovider

demo: install
	$(PY) helper_tools/tiny_models.py --model-dir models

clean:
	rm -rf $(VENV) logs .pytest_cache .mypy_cache .ruff_cache
