"""Runtime pieces shared by the device plugin and the CSI driver.

Owns what both daemons do the same way: serving gRPC on a unix socket with a
graceful stop, mapping domain errors to gRPC status codes at one boundary,
per-RPC logging with secrets redacted, log formatting, the Prometheus endpoint
and the single subprocess runner.  Nothing here knows about devices or volumes.
"""
