# The two commands a new machine needs (see README): `make demo` and `make test`.
# Each creates or updates .venv (and, as root, installs the Debian packages the
# fault-injection tiers need) before it runs.
PY := .venv/bin/python
export PYTHONHASHSEED := 0

.PHONY: env demo test unit fault bench clean

env:
	@./scripts/setup-env

demo: env
	$(PY) examples/demo.py

test: env
	$(PY) -m pytest -q
	$(PY) -m fault_injection run --profile ci

unit: env
	$(PY) -m pytest -q

fault: env
	$(PY) -m fault_injection run --profile ci

# `make bench ARGS=--quick` for a fast check; ARGS goes to `python -m benchmarks` (see --help).
bench: env
	$(PY) -m benchmarks $(ARGS)

clean:
	rm -rf .venv .demo .bench .pytest_cache .hypothesis
