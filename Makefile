# The README's two commands: `make demo` (the main job) and `make test` (the test suite).
# Both set up everything they need first (scripts/bootstrap.sh is idempotent).
VENV ?= $(CURDIR)/.venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: demo test bootstrap-demo bootstrap-test

bootstrap-demo:
	bash scripts/bootstrap.sh demo

bootstrap-test:
	bash scripts/bootstrap.sh test

demo: bootstrap-demo
	$(PY) examples/demo.py

# pytest exits 5 when it collected no tests: that is a failure here, never a silent pass.
test: bootstrap-test
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests" >&2; exit 1; fi; exit $$rc
