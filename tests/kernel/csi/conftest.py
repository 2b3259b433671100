"""Fixtures of the kernel CSI suites (shared with tests/grpc/csi)."""

from tests.grpc.csi.driver_harness import csi, driver, kubelet, unique

__all__ = ["csi", "driver", "kubelet", "unique"]
