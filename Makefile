# Benchmarks run one after another (never in parallel) and print one comparison table;
# bench/README.md explains each one. `bench-quick` is a seconds-to-minutes smoke run.
PY := .venv/bin/python

.PHONY: bench bench-quick bench-peers test

bench:
	$(PY) bench/run_all.py

bench-quick:
	$(PY) bench/run_all.py --quick

# Also the peer benchmarks of ../shared/bench-peers (or BENCH_PEERS_DIR); needs the `bench` extra.
bench-peers:
	$(PY) bench/run_all.py --peers

test:
	.venv/bin/pytest
