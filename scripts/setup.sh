#!/usr/bin/env bash
# Installs what hostkit needs on a Debian/Ubuntu machine: the system tools the
# driver runs and the tests use, and a Python virtual environment in .venv with
# the package (editable) and its dev tools.  Idempotent: a second run is quick.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(e2fsprogs xfsprogs btrfs-progs util-linux kmod fio umockdev gir1.2-umockdev-1.0 python3-gi
    # the end-to-end tier (tests/e2e): etcd, runc and CNI plugins for the real cluster,
    # busybox-static for its images, iptables for the kubelet, xz for the shared binaries
    etcd-server runc containernetworking-plugins busybox-static iptables xz-utils
    # and, for its DaemonSet scenarios, the project's image built without a Docker
    # daemon: buildah runs the Dockerfile, debootstrap makes the stand-in base image
    buildah debootstrap)

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    missing=()
    for p in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        echo "setup: installing ${missing[*]}" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
else
    echo "setup: not root or no apt-get; skipping system packages (${APT_PACKAGES[*]})" >&2
fi

PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "setup: hostkit needs Python 3.11 or newer; $PYTHON is $("$PYTHON" -V 2>&1)" >&2
    echo "setup: set PYTHON=/path/to/python3.11 and run again" >&2
    exit 1
fi
if ! "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "setup: installing python3-venv" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
    else
        echo "setup: $PYTHON cannot create virtual environments (install python3-venv)" >&2
        exit 1
    fi
fi
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.hostkit-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/python -m pip install -q --upgrade pip >/dev/null
    .venv/bin/python -m pip install -q -e '.[dev]'
    touch "$stamp"
fi
