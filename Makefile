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

# The report test loads the page in Debian's chromium; installed here when possible, skipped otherwise.
browser:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 \
		|| echo "note: could not install chromium; the browser check of the report will be skipped"

test: $(VENV)/.installed browser
	$(PY) -m pytest -q

# Behaviour on the shipped models (each method's best recipe on striped, v1; v2's recipe under each defence): 12 checks, 26 min measured on 2 cores shared with a benchmark.
check-slow: $(VENV)/.installed
	$(PY) -m pytest -q -m slow

.PHONY: install demo test check-slow browser
