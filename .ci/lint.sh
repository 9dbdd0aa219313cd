#!/usr/bin/env bash
# Lint, format and type checks; .ci/run runs this before the tests, so a regression fails CI.
#   bash .ci/lint.sh            check (needs .venv from .ci/setup.sh)
#   bash .ci/lint.sh --fix      apply ruff's fixes and formatting first
# mypy runs against a checked-in baseline (.ci/mypy-baseline.txt) that may only shrink: see
# .ci/mypy_baseline.py.
set -euo pipefail
cd "$(dirname "$0")/.."
paths=(cachedata tests benchmarks examples .ci)
if [ "${1:-}" = "--fix" ]; then
  .venv/bin/ruff check --fix "${paths[@]}"
  .venv/bin/ruff format "${paths[@]}"
fi
.venv/bin/ruff check "${paths[@]}"
.venv/bin/ruff format --check "${paths[@]}"
.venv/bin/python .ci/mypy_baseline.py
