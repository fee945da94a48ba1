# podnet: `make demo` and `make test` do all their own set-up.
VENV := .venv
PY := $(VENV)/bin/python
PYTEST := $(PY) -m pytest

.PHONY: setup test test-unit demo bench bench-ipam bench-scale bench-cni bench-throughput bench-services bench-policy bench-dns lint clean

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
bench: bench-ipam bench-scale bench-cni bench-throughput bench-services bench-policy bench-dns

bench-ipam: setup
	$(PY) bench/bench_ipam.py $(BENCH_ARGS)

bench-scale: setup
	$(PY) bench/bench_scale.py $(BENCH_ARGS)

bench-cni: setup
	$(PY) bench/bench_cni.py $(BENCH_ARGS)

bench-throughput: setup
	$(PY) bench/bench_throughput.py $(BENCH_ARGS)

bench-services: setup
	$(PY) bench/bench_services.py $(BENCH_ARGS)

bench-policy: setup
	$(PY) bench/bench_policy.py $(BENCH_ARGS)

bench-dns: setup
	$(PY) bench/bench_dns.py $(BENCH_ARGS)

lint: setup
	$(VENV)/bin/ruff check src tests bench

clean:
	rm -rf $(VENV) build src/*.egg-info
