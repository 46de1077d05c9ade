# The two commands of the README. Both set up what they need first (idempotent).
.PHONY: setup serve test unit

setup:
	scripts/setup.sh

serve:
	scripts/serve.sh

test: setup
	.venv/bin/python -m pytest tests

unit: setup
	.venv/bin/python -m pytest tests/unit
