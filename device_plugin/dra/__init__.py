"""Dynamic Resource Allocation: the kubelet side of serving our devices as a DRA driver.

The domain stays the device plugin's (configuration, matching, discovery,
health, CDI); this package adds what only DRA needs, in two halves:

* domain (no grpc, no generated stubs): ``devices`` (pool and device names,
  finding a current unit by them), ``claims`` (a ResourceClaim as the driver
  needs it, read from the API server), ``checkpoint`` (prepared claims on disk),
  ``prepare`` (NodePrepareResources / NodeUnprepareResources), ``health`` (the
  device health list the kubelet streams);
* wire (the kubelet's DRA gRPC APIs): ``api`` (the only importer of ``_proto``),
  ``servicer`` (DRAPlugin v1 and v1beta1, DRAResourceHealth, the plugin-watcher
  Registration service) and ``lifecycle`` (sockets, registration, re-registration).

It never imports the device plugin's wire layer (``device_plugin.api``,
``servicer``, ``lifecycle``), nor does that import this package; the Kubernetes
API client is imported lazily, so a process without DRA resources never loads it
(``tests/unit/test_layering.py``).
"""
