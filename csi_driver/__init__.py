"""hostkit CSI driver: node-local volumes carved from image-file and disk pools."""

__version__ = "0.1.0"
DRIVER_NAME = "local.csi.hostkit.io"
