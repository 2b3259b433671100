#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the whole test suite: unit, gRPC, deploy and,
# as root, the kernel tests; then the end-to-end tier (tests/e2e: a real single-node
# Kubernetes, root and ../shared/kubernetes/bin or HOSTKIT_K8S_BIN needed).
#   scripts/test.sh            all tiers, end-to-end last
#   scripts/test.sh --e2e      the end-to-end tier alone
#   scripts/test.sh --no-e2e   everything but the end-to-end tier
# Extra arguments go to pytest (to both runs); naming tests or directories
# (scripts/test.sh tests/unit) runs just those, in one run.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

mode=all
args=()
for a in "$@"; do
    case "$a" in
        --e2e) mode=e2e ;;
        --no-e2e) mode=quick ;;
        *) args+=("$a")
           # a test path chosen by the caller: run what was named, nothing else
           if [ -e "${a%%::*}" ]; then mode=named; fi ;;
    esac
done
if [ "$mode" = named ]; then
    exec .venv/bin/python -m pytest "${args[@]}"
fi

# The end-to-end tier runs even when an earlier tier failed (its result is worth
# having); the script fails if any tier did.
status=0
if [ "$mode" != e2e ]; then
    .venv/bin/python -m pytest ${args[@]+"${args[@]}"} || status=$?
fi
if [ "$mode" != quick ]; then
    started=$(date +%s)
    e2e=0
    .venv/bin/python -m pytest tests/e2e ${args[@]+"${args[@]}"} || e2e=$?
    echo "end-to-end tier: wall time $(( $(date +%s) - started )) s (exit status $e2e)"
    [ "$status" != 0 ] || status=$e2e
fi
exit "$status"
