# `make demo` and `make test` set everything up (virtual environment from the pinned versions in
# constraints.txt) and run. PYTHON must be a Python 3.11.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= runs/demo

.PHONY: setup demo test clean

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test,tracking]'
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/medgen data synth --config examples/phantom.yaml --out $(OUT)/cohort
	$(BIN)/medgen data check --config examples/phantom.yaml $(OUT)/cohort/*/
	rm -rf $(OUT)/run
	$(BIN)/medgen simulate --config examples/phantom.yaml --set data.root=$(OUT)/cohort --out $(OUT)/run

test: setup
	$(BIN)/python -m pytest -n 2

clean:
	rm -rf $(VENV) runs .pytest_cache
