"""Demo part 1: the device plugin against the kubelet stand-in.

Starts the real device plugin on its embedded default configuration with a
private device-plugins directory, lets it register with ``demo.kubelet`` (the
same strict stand-in the device-plugin tests use), shows every resource and
device it advertised, allocates one healthy unit, prints the grant, then stops
the plugin and checks that its sockets are gone.
"""

from __future__ import annotations

import os

from demo.kubelet import KubeletStandIn
from demo.processes import Daemon, start_daemon
from demo.steps import Steps


def run(steps: Steps, workdir: str, config: str | None = None) -> None:
    steps.section("Device plugin (the demo plays the kubelet)")
    directory = os.path.join(workdir, "device-plugins")
    kubelet = KubeletStandIn(directory)
    daemon: Daemon | None = None
    try:
        with steps.step("kubelet stand-in listens on kubelet.sock"):
            kubelet.start()
            steps.detail(kubelet.socket)
        with steps.step("device plugin starts, serves and registers"):
            args = ["--kubelet-dir", directory, "--log-level", "info"]
            if config:
                args += ["--config", config]
            daemon = start_daemon("device-plugin", "device_plugin", args, workdir)
            endpoints = kubelet.wait_until_settled(timeout=20)
            if not endpoints:
                if not daemon.alive():
                    raise RuntimeError("device plugin exited:\n" + daemon.log_tail())
                raise RuntimeError(
                    "no resource registered within 20 s (no matching device on this machine?)\n"
                    + daemon.log_tail()
                )
        with steps.step("ListAndWatch: what was found on this machine"):
            for endpoint in sorted(endpoints, key=lambda e: e.resource):
                snapshot = endpoint.snapshots[-1]
                devices, healthy = snapshot.devices, snapshot.healthy()
                steps.detail(
                    f"{endpoint.resource}: {len(devices)} IDs ({len(healthy)} healthy), "
                    f"socket {endpoint.socket}"
                )
                for device_id, (health, nodes) in list(devices.items())[:3]:
                    numa = ",".join(str(n) for n in nodes) or "-"
                    steps.detail(f"  {device_id}  {health}  numa={numa}")
                if len(devices) > 3:
                    steps.detail(f"  ... and {len(devices) - 3} more")
        with steps.step("Allocate one unit"):
            endpoint = next(
                e
                for e in sorted(endpoints, key=lambda e: e.resource)
                if e.snapshots[-1].healthy()
            )
            snapshot = endpoint.snapshots[-1]
            unit = next(i for i in snapshot.devices if i in snapshot.healthy())
            grant = kubelet.allocate(endpoint.resource, [unit])
            steps.detail(f"{endpoint.resource} {unit}:")
            for spec in grant.devices:
                steps.detail(
                    f"  device {spec.host_path} -> {spec.container_path} ({spec.permissions})"
                )
            for mount in grant.mounts:
                steps.detail(f"  mount {mount.host_path} -> {mount.container_path}")
            for key, value in sorted(grant.envs.items()):
                steps.detail(f"  env {key}={value}")
            for cdi in grant.cdi_devices:
                steps.detail(f"  cdi {cdi.name}")
            if not grant.devices and not grant.cdi_devices:
                raise RuntimeError("the grant has no device node")
        with steps.step("device plugin stops on SIGTERM and removes its sockets"):
            stopped_cleanly = daemon.stop()
            daemon = None
            left = [n for n in os.listdir(directory) if n != "kubelet.sock"]
            if not stopped_cleanly:
                raise RuntimeError("the device plugin did not exit cleanly on SIGTERM")
            if left:
                raise RuntimeError(f"sockets left behind: {left}")
    finally:
        if daemon is not None:
            daemon.stop()
        kubelet.stop()
