#!/usr/bin/env bash
# The static gates CI runs before the tests (see .ci/run): ruff's lint rules and mypy, both
# configured in pyproject.toml ([tool.ruff], [tool.mypy]: strict on kcr_trio/core and
# kcr_trio/api, default but clean on the rest of kcr_trio and on sidecar).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m ruff check .
python3 -m mypy
