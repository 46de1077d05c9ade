# The two commands of the README. Both set up what they need first (idempotent); `make test`
# also installs Debian's prometheus (the metrics tests scrape the real server with it).
.PHONY: setup serve test unit bench bench-smoke

setup:
	scripts/setup.sh

serve:
	scripts/serve.sh

test: setup
	scripts/install-prometheus.sh
	.venv/bin/python -m pytest tests

unit: setup
	.venv/bin/python -m pytest tests/unit

# The benchmark suite against vanilla vLLM, the recency baseline and kvpress (its own venv, made on
# first use). Results: results/bench-<time>/{results.json,summary.md,*.png} (results.json's
# structure: benchmarks/schema.py). BENCH_ARGS passes options, e.g.
# BENCH_ARGS="--only capacity,throughput".
bench: setup
	.venv/bin/python -m benchmarks.suite $(BENCH_ARGS)

bench-smoke: setup
	.venv/bin/python -m benchmarks.suite --smoke $(BENCH_ARGS)
