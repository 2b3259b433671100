"""First-run demo: plays the kubelet's part against both real daemons."""
