# The two commands of the README. Both set up what they need first (idempotent); `make test`
# also installs Debian's prometheus (the metrics tests scrape the real server with it).
.PHONY: setup serve test unit

setup:
	scripts/setup.sh

serve:
	scripts/serve.sh

test: setup
	scripts/install-prometheus.sh
	.venv/bin/python -m pytest tests

unit: setup
	.venv/bin/python -m pytest tests/unit
