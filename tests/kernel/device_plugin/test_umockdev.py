"""Hardware this machine lacks, through umockdev device trees (fixtures/*.umockdev).

Each test runs the real domain (discovery thread, pyudev, sysfs reads, node
stat/open, allocation) in a child process under ``umockdev-run``, which swaps
/sys and /dev for the recorded tree, and checks what the domain would serve:

* a USB serial adapter: the tty node is selected by its USB parent's idVendor,
  idProduct and serial; another adapter and a plain serial port are not; the
  same adapter on another port and tty number keeps its ID;
* GPUs: each PCI GPU's DRM card and render nodes are ONE unit (group_by pci),
  with the PCI device's NUMA node, a vendor filter that does not trip over
  root ports of another vendor, and a health attribute read through the
  node's ``device`` link.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

from plugin_runtime import commands

ROOT = Path(__file__).resolve().parents[3]
FIXTURES = Path(__file__).parent / "fixtures"
EXAMPLES = ROOT / "examples" / "device-plugin"


def run_probe(fixture: Path, config: Path) -> dict[str, Any]:
    if shutil.which("umockdev-run") is None:
        pytest.fail("umockdev-run is not installed (apt-get install umockdev)")
    result = commands.run(
        ["env", f"PYTHONPATH={ROOT}", "umockdev-run", "-d", str(fixture), "--",
         sys.executable, "-m", "tests.kernel.device_plugin.umockdev_probe", str(config)],
        timeout=60,
    )
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def test_usb_serial_tty_selected_by_parent_attributes():
    out = run_probe(FIXTURES / "ftdi-serial.umockdev", EXAMPLES / "usb-serial.yaml")
    (unit,) = out["resources"]["hostkit.io/ftdi-serial"]
    assert unit["nodes"] == ["/dev/ttyUSB0"]  # not the Prolific ttyUSB1, not ttyS0
    assert unit["healthy"]
    assert unit["numa"] == [0]  # from the PCI host controller
    assert unit["id"].startswith("ttyUSB-") and len(unit["id"]) <= 63
    assert unit["grants"] == [["/dev/ttyUSB0", "/dev/ttyUSB0", "rw"]]
    assert unit["envs"] == {"SERIAL_PORTS": "/dev/ttyUSB0", "SERIAL_DEVICE_IDS": unit["id"]}
    assert [r["id"] for r in out["discover"]] == [unit["id"]]


def test_usb_serial_keeps_its_id_on_another_port(tmp_path):
    first = run_probe(FIXTURES / "ftdi-serial.umockdev", EXAMPLES / "usb-serial.yaml")
    moved = (FIXTURES / "ftdi-serial.umockdev").read_text()
    # Same adapter, port 1-4 instead of 1-2, enumerated as ttyUSB3.
    moved = (moved.replace("1-2", "1-4").replace("ttyUSB0", "ttyUSB3")
             .replace("dev=188:0", "dev=188:3").replace("MINOR=0\nE: SUBSYSTEM=tty",
                                                        "MINOR=3\nE: SUBSYSTEM=tty"))
    assert "1-2" not in moved
    fixture = tmp_path / "moved.umockdev"
    fixture.write_text(moved)
    second = run_probe(fixture, EXAMPLES / "usb-serial.yaml")
    (a,) = first["resources"]["hostkit.io/ftdi-serial"]
    (b,) = second["resources"]["hostkit.io/ftdi-serial"]
    assert b["nodes"] == ["/dev/ttyUSB3"]
    assert a["id"] == b["id"]


def test_gpu_card_and_render_are_one_unit():
    out = run_probe(FIXTURES / "gpus.umockdev", EXAMPLES / "gpus.yaml")
    nvidia = {tuple(u["nodes"]): u for u in out["resources"]["hostkit.io/gpu"]}
    assert set(nvidia) == {("/dev/dri/card0", "/dev/dri/renderD128"),
                           ("/dev/dri/card1", "/dev/dri/renderD129")}
    good = nvidia[("/dev/dri/card0", "/dev/dri/renderD128")]
    assert good["healthy"] and good["numa"] == [0]
    assert good["grants"] == [["/dev/dri/card0", "/dev/dri/card0", "rw"],
                              ["/dev/dri/renderD128", "/dev/dri/renderD128", "rw"]]
    disabled = nvidia[("/dev/dri/card1", "/dev/dri/renderD129")]
    assert not disabled["healthy"] and disabled["numa"] == [1]
    assert "device/enabled is '0'" in disabled["reason"]
    # The Intel resource takes only the Intel GPU, not the NVIDIA GPUs behind Intel
    # root ports; the Intel GPU has no NUMA node (-1).
    (intel,) = out["resources"]["hostkit.io/gpu-amd-intel"]
    assert intel["nodes"] == ["/dev/dri/card2", "/dev/dri/renderD130"]
    assert intel["numa"] == [] and intel["healthy"]
    assert intel["envs"] == {"GPU_DEVICE_IDS": intel["id"]}
