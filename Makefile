# The two commands of the README. Both set up what they need first (idempotent); `make test`
# also installs Debian's prometheus (the metrics tests scrape the real server with it).
.PHONY: setup serve test test-parallel unit test-image bench bench-smoke check-vllm-sources \
	vllm-0.33-cpu test-vllm-0.33

setup:
	scripts/setup.sh

serve:
	scripts/serve.sh

test: setup
	scripts/install-prometheus.sh
	.venv/bin/python -m pytest --durations=15 tests

# Only the parallelism tests (TP=2, PP=2 and DP=2, threads bound to cores 0 and 1; also part of
# `make test`).
test-parallel: setup
	scripts/install-prometheus.sh
	.venv/bin/python -m pytest tests/integration/test_parallelism.py

unit: setup
	.venv/bin/python -m pytest tests/unit

# Build docker/Dockerfile.cpu with podman and serve from the image (opt-in: ~10 min, 5 GB;
# scripts/build-image.sh says which environment variables it reads).
test-image: setup
	VLLM_SNAPKV_IMAGE_TEST=1 .venv/bin/python -m pytest -s tests/container

# The benchmark suite against vanilla vLLM, the recency baseline and kvpress (its own venv, made on
# first use). Results: results/bench-<time>/{results.json,summary.md,*.png} (results.json's
# structure: benchmarks/schema.py). BENCH_ARGS passes options, e.g.
# BENCH_ARGS="--only capacity,throughput".
bench: setup
	.venv/bin/python -m benchmarks.suite $(BENCH_ARGS)

bench-smoke: setup
	.venv/bin/python -m benchmarks.suite --smoke $(BENCH_ARGS)

# Check every vLLM internal the plugin touches (vllm_snapkv/integration/seam.py) against the installed
# vLLM and against a release's wheel sources, downloaded with `pip download --no-deps` and never
# installed (VLLM_RELEASE=0.33.0 by default).
VLLM_RELEASE ?= 0.33.0
check-vllm-sources: setup
	.venv/bin/python -m vllm_snapkv.integration.seam
	.venv/bin/python -m vllm_snapkv.integration.seam --release $(VLLM_RELEASE)

# vLLM 0.33.0 built for CPU from its PyPI sdist into ~/.cache/vllm-snapkv (opt-in: ~55 min of
# compiling on 2 cores the first time, then the cached wheel; what it changes to build here is
# in docs/install.md), and the test suite run against it (TESTS="..." picks files).
vllm-0.33-cpu:
	VLLM_CPU_ONLY_C=$${VLLM_CPU_ONLY_C:-1} scripts/build-vllm-0.33-cpu.sh

test-vllm-0.33: setup vllm-0.33-cpu
	scripts/install-prometheus.sh
	scripts/test-vllm-0.33.sh $(TESTS)
