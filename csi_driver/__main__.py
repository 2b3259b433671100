"""``python -m csi_driver`` runs the CLI."""

from csi_driver.cli import main

raise SystemExit(main())
