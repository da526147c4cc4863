# The two commands of the README. Each sets up .venv by itself (ops/setup.sh, idempotent).
.PHONY: up test setup

up:
	@ops/setup.sh
	.venv/bin/alignloop up

test:
	@ops/setup.sh test
	.venv/bin/python -m pytest
