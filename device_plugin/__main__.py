"""``python -m device_plugin``: the same as the ``device-plugin`` console script."""

import sys

from device_plugin.cli import main

sys.exit(main())
