"""``python -m tests.kernel.csi.loop_choice serve ...``: the CSI driver, steered to one loop device.

The kernel hands out loop devices machine-wide (LOOP_CTL_GET_FREE answers the
lowest unbound one), and other programs on a shared test machine attach and
detach devices at the same time.  A test that needs the driver to get one
particular device, one the test prepared (say, left read-only), cannot make it
the lowest free one without racing all of them, and a device prepared that way
could be handed to someone else instead.  This entry point replaces only the
choice of the number: while /dev/loopN (N from ``HOSTKIT_TEST_LOOP``) is
unbound, the driver's attach gets N; once N is bound it asks the kernel as
usual.  Everything after the choice is the driver's own code on the real kernel.
"""

from __future__ import annotations

import os

from csi_driver import cli, loop

ENV = "HOSTKIT_TEST_LOOP"


def install(number: int) -> None:
    """Make ``loop.attach`` try /dev/loop<number> first while it is unbound."""
    kernel_choice = loop._free_number

    def choose(control_fd: int) -> int:
        if not (loop.SYS_BLOCK / f"loop{number}" / "loop").is_dir():
            return number
        return kernel_choice(control_fd)

    loop._free_number = choose


if __name__ == "__main__":
    install(int(os.environ[ENV]))
    raise SystemExit(cli.main())
