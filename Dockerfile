# hostkit image: both daemons (console scripts `device-plugin` and
# `csi-driver`) and the system tools the CSI driver runs.
#
# Build stage: checks that the committed gRPC stubs match protos/ (a stale stub
# fails the build) and builds the hostkit wheel plus wheels of its
# dependencies.  Runtime stage: installs those wheels and nothing else from the
# build, so grpcio-tools and pip's caches stay out of the image.
#
# The image runs as root: the CSI driver attaches loop devices and calls
# mount(2), the device plugin opens device nodes of the host; both DaemonSets
# run privileged (see daemonsets/).  A non-root user would not help there.

FROM python:3.11-slim-bookworm AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

# The generator pinned to the version that stamped the committed stubs
# (pyproject.toml, dev extra).
RUN pip install --no-cache-dir grpcio-tools==1.85.1

WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY protos/ protos/
COPY plugin_runtime/ plugin_runtime/
COPY device_plugin/ device_plugin/
COPY csi_driver/ csi_driver/
COPY demo/ demo/

RUN python protos/generate.py --check \
    && pip wheel --no-cache-dir --wheel-dir /wheels .


FROM python:3.11-slim-bookworm

LABEL org.opencontainers.image.title="hostkit" \
      org.opencontainers.image.description="Kubernetes device plugin and node-local CSI driver" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# util-linux/mount: losetup, blkid, wipefs, fsfreeze, mount, umount;
# e2fsprogs/xfsprogs/btrfs-progs: mkfs, grow, check for each fsType;
# libudev1: the library pyudev loads.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        util-linux \
        mount \
        e2fsprogs \
        xfsprogs \
        btrfs-progs \
        libudev1 \
    && rm -rf /var/lib/apt/lists/*

COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links /wheels hostkit==0.1.0 \
    && rm -rf /wheels \
    && device-plugin --help >/dev/null \
    && csi-driver --help >/dev/null

# The DaemonSets set the command; alone, the image prints the device plugin's
# usage.
CMD ["device-plugin", "--help"]
