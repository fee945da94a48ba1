# podnet: `make demo` and `make test` do all their own set-up.
VENV := .venv
PY := $(VENV)/bin/python
PYTEST := $(PY) -m pytest

.PHONY: setup test test-unit demo bench lint clean

setup:
	@bash scripts/setup.sh

test: setup
	$(PYTEST) -q -p no:cacheprovider tests

test-unit: setup
	$(PYTEST) -q -p no:cacheprovider tests/unit

demo: setup
	$(PY) -m podnet.demo

# Benchmarks print a table, write bench/results/<name>.json and compare against a
# baseline measured in the same run. BENCH_ARGS=--quick for a short run.
bench: bench-ipam bench-scale bench-cni bench-throughput bench-services bench-endpoints bench-policy bench-dns \
	bench-cluster bench-externaldns bench-eni bench-bgp bench-multinet bench-conntrack bench-programming \
	bench-sockets bench-kube bench-etcdlist

bench-%: setup
	$(PY) bench/bench_$*.py $(BENCH_ARGS)

lint: setup
	$(VENV)/bin/ruff check src tests bench

clean:
	rm -rf $(VENV) build src/*.egg-info
