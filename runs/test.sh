#!/usr/bin/env bash
# Install everything the tests need (uv, then the locked environment) and run the whole suite.
#   bash runs/test.sh [extra pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
source runs/setup.sh
python -m pytest "$@"
