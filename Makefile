# podnet: `make demo` and `make test` do all their own set-up.
VENV := .venv
PY := $(VENV)/bin/python
PYTEST := $(PY) -m pytest

.PHONY: setup test test-unit demo bench bench-ipam bench-scale lint clean

setup:
	@bash scripts/setup.sh

test: setup
	$(PYTEST) -q -p no:cacheprovider tests

test-unit: setup
	$(PYTEST) -q -p no:cacheprovider tests/unit

demo: setup
	$(PY) -m podnet.demo

bench: bench-ipam bench-scale

bench-ipam: setup
	$(PY) bench/bench_ipam.py

bench-scale: setup
	$(PY) bench/bench_scale.py

lint: setup
	$(VENV)/bin/ruff check src tests bench

clean:
	rm -rf $(VENV) build src/*.egg-info
