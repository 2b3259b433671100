#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the first-run demo: the device plugin and
# the CSI driver on their embedded defaults, with the demo playing the kubelet.
# Run as root for the CSI part (loop devices, mounts).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m demo "$@"
