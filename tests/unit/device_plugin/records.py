"""Hand-built device records shaped like what discovery captures from real trees."""

from __future__ import annotations

from device_plugin.matching import Ancestor, DeviceInfo

USB_PORT = "/sys/devices/pci0000:00/0000:00:14.0/usb1/1-2"


def usb_device(port: str = USB_PORT, serial: str = "A10K5XYZ", vendor: str = "0403",
               product: str = "6001") -> Ancestor:
    attrs = {"idVendor": vendor, "idProduct": product}
    if serial:
        attrs["serial"] = serial
    return Ancestor(port, "usb", "usb_device", port.rsplit("/", 1)[1], attrs)


def ftdi_tty(kernel: str = "ttyUSB0", port: str = USB_PORT, serial: str = "A10K5XYZ",
             properties: dict[str, str] | None = None, vendor: str = "0403",
             links: tuple[str, ...] = ()) -> DeviceInfo:
    usb = usb_device(port, serial, vendor)
    iface = Ancestor(f"{port}/{usb.kernel}:1.0", "usb", "usb_interface", f"{usb.kernel}:1.0",
                     {"bInterfaceNumber": "00"})
    serial_dev = Ancestor(f"{iface.sys_path}/{kernel}", "usb-serial", None, kernel)
    pci = Ancestor("/sys/devices/pci0000:00/0000:00:14.0", "pci", None, "0000:00:14.0",
                   {"vendor": "0x8086"})
    return DeviceInfo(
        sys_path=f"{serial_dev.sys_path}/tty/{kernel}",
        subsystem="tty",
        devtype=None,
        kernel=kernel,
        devnode=f"/dev/{kernel}",
        properties=properties or {},
        ancestors=(serial_dev, iface, usb, pci),
        devlinks=links,
    )


def drm_node(kernel: str, pci_slot: str = "0000:01:00.0", vendor: str = "0x10de",
             numa: int | None = 0) -> DeviceInfo:
    pci = Ancestor(f"/sys/devices/pci0000:00/{pci_slot}", "pci", None, pci_slot,
                   {"vendor": vendor})
    return DeviceInfo(
        sys_path=f"{pci.sys_path}/drm/{kernel}",
        subsystem="drm",
        devtype="drm_minor",
        kernel=kernel,
        devnode=f"/dev/dri/{kernel}",
        ancestors=(pci, Ancestor("/sys/devices/pci0000:00", None, None, "pci0000:00")),
        numa_node=numa,
    )


def misc(kernel: str, devnode: str | None = None) -> DeviceInfo:
    return DeviceInfo(f"/sys/devices/virtual/misc/{kernel}", "misc", None, kernel,
                      devnode or f"/dev/{kernel}")
