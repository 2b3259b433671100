"""``hostkit-demo`` / ``python -m demo``: the first-run demo.

Plays the kubelet's part against both real daemons on this machine, printing
each step.  The device-plugin part needs no root; the CSI part needs root
(mount(2), loop devices).  Exit status: 0 when every step ran and passed, 1
when a step failed, 2 when steps could not run on this machine (and says which
and why).  Everything is created under one temporary directory that is
removed at the end, once nothing is mounted or attached from it.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import sys
import tempfile

from demo import csi_flow, device_flow
from demo.steps import StepFailed, Steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hostkit-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--device-config", help="device plugin config (default: embedded)")
    parser.add_argument("--keep", action="store_true", help="keep the work dir for inspection")
    parser.add_argument(
        "--only", choices=["device-plugin", "csi"], help="run one part of the demo"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    steps = Steps()
    workdir = tempfile.mkdtemp(prefix="hostkit-demo-", dir="/tmp")
    print(f"hostkit demo; work dir {workdir}")
    try:
        if args.only in (None, "device-plugin"):
            with contextlib.suppress(StepFailed):
                device_flow.run(steps, workdir, args.device_config)
        if args.only in (None, "csi"):
            if os.geteuid() != 0:
                steps.skipped(
                    "CSI driver part",
                    "needs root: it attaches loop devices and mounts filesystems; "
                    "run it with sudo",
                )
            else:
                with contextlib.suppress(StepFailed):
                    csi_flow.run(steps, workdir)
    finally:
        left = csi_flow.leftovers(workdir)
        if left or args.keep:
            print(f"\nwork dir kept: {workdir}" + (f" (still in use: {left})" if left else ""))
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    passed = [o for o in steps.outcomes if o.ok]
    print(f"\n{len(passed)} steps passed, {len(steps.failed)} failed, {len(steps.not_run)} not run")
    for outcome in steps.failed + steps.not_run:
        first_line = outcome.error.splitlines()[0] if outcome.error else ""
        print(f"  - {outcome.title}: {first_line}")
    if steps.failed:
        return 1
    return 2 if steps.not_run else 0


if __name__ == "__main__":
    sys.exit(main())
