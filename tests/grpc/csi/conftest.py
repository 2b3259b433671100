"""Fixtures of the CSI suites: the real driver as a subprocess and a kubelet-shaped tree.

The implementation lives in ``driver_harness`` so that tests/kernel/csi can
use the same fixtures.
"""

from tests.grpc.csi.driver_harness import csi, driver, kubelet, unique

__all__ = ["csi", "driver", "kubelet", "unique"]
