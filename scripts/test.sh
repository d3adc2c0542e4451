#!/usr/bin/env bash
# The test command of the README (and of CI): set up .venv if needed, lint, run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy  # the TensorRT path against tensorrt-stubs (pyproject.toml [tool.mypy])
.venv/bin/python scripts/audit.py
exec .venv/bin/python -m pytest -q "$@"
