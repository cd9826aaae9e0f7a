# The two README commands: `make demo` (set up + run the default job), `make test` (set up + lint + tests).
.PHONY: setup demo test lint format

setup:
	bash scripts/setup.sh dev

demo: setup
	.venv/bin/python -m llmtrain

lint:
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

format:
	.venv/bin/ruff format .
	.venv/bin/ruff check --fix .

test: setup lint
	.venv/bin/python -m pytest -q
