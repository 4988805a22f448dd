#!/usr/bin/env bash
# Install tunnel-lab with its test and lint extras into .venv, then run lint, types and the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[test,lint]'
.venv/bin/ruff check .
.venv/bin/mypy
exec .venv/bin/pytest -p no:cacheprovider "$@"
