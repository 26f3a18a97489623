#!/usr/bin/env bash
# Build the documentation site with every warning an error. The tutorials are
# notebooks executed during the build, so a broken cell fails this script.
set -euo pipefail
cd "$(dirname "$0")/.."

rm -rf docs/_build docs/api/generated
uv run --group docs sphinx-build -W --keep-going -b html docs docs/_build/html
