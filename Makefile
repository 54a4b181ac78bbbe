# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch (the test oracle). On this project's machines pip finds it on local disk.
TORCH_SPEC ?= torch==2.13.0
PYTEST_WORKERS ?= 2

.PHONY: install demo lint browser test bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m ivtlr_jax.demo --overwrite

lint: install
	$(PY) -m ruff check .
	$(VENV)/bin/lint-imports

# the page's test (tests/test_serve.py) drives Debian's chromium through chromedriver (selenium): installed where missing
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  SUDO=$$(test "$$(id -u)" = 0 || echo sudo); \
	  $$SUDO apt-get update -q && $$SUDO apt-get install -y -q --no-install-recommends chromium chromium-driver; }

# a worker that crashes (or a test stuck past pyproject's faulthandler_timeout) ends the run with a failure:
# pytest-xdist 3.8 can wait forever when it replaces a crashed worker under --dist loadgroup (its issue #1378)
test: lint browser
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadgroup --max-worker-restart=0 -q --durations=15 tests

bench: install
	$(PY) bench/forward.py

clean:
	rm -rf $(VENV) outputs
