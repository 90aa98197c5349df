# Two entry points: `make demo` (the main job on the embedded world) and `make test`.
# Both create .venv on first use. TORCH_SPEC installs the CPU wheel here; override it elsewhere.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
DEMO_OUT ?= demo-output

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/obliviate demo --out $(DEMO_OUT)

test: $(VENV)/.installed
	$(PY) -m pytest -q

.PHONY: install demo test
