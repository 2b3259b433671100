#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the whole test suite: unit, gRPC and, as
# root, the kernel tests.  Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
