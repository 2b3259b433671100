"""The kubelet stand-in itself behaves like the kubelet where the tests rely on it."""

from __future__ import annotations

import os
import socket
import stat

import grpc
import pytest

from demo.kubelet import KubeletStandIn, go_quote, is_extended_resource_name
from device_plugin import api
from plugin_runtime.inotify import IN_CREATE, DirectoryWatch


def test_restart_wipes_sockets_only_and_serves_kubelet_sock_again(kubelet_dir):
    kubelet = KubeletStandIn(kubelet_dir)
    kubelet.start()
    try:
        with open(os.path.join(kubelet_dir, "kubelet_internal_checkpoint"), "w") as f:
            f.write("{}")
        with open(os.path.join(kubelet_dir, "DEPRECATION"), "w") as f:
            f.write("")
        os.mkdir(os.path.join(kubelet_dir, "subdir"))
        plugin = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        plugin.bind(os.path.join(kubelet_dir, "vendor-plugin.sock"))
        plugin.close()
        kubelet.restart()
        assert sorted(os.listdir(kubelet_dir)) == [
            "DEPRECATION", "kubelet.sock", "kubelet_internal_checkpoint", "subdir"
        ]
        assert stat.S_ISSOCK(os.stat(kubelet.socket).st_mode)
    finally:
        kubelet.stop()


def test_recreate_socket_serves_a_new_kubelet_sock_and_touches_nothing_else(kubelet_dir):
    kubelet = KubeletStandIn(kubelet_dir)
    kubelet.start()
    try:
        plugin = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        plugin.bind(os.path.join(kubelet_dir, "vendor-plugin.sock"))
        plugin.close()
        events = DirectoryWatch(kubelet_dir, IN_CREATE)
        try:
            kubelet.recreate_socket()
            created = [e.name for e in events.read(5.0)]
        finally:
            events.close()
        assert "kubelet.sock" in created
        assert sorted(os.listdir(kubelet_dir)) == ["kubelet.sock", "vendor-plugin.sock"]
        request = api.RegisterRequest(version="v0", endpoint="x.sock", resource_name="a/b")
        with grpc.insecure_channel(f"unix://{kubelet.socket}") as channel, \
                pytest.raises(grpc.RpcError) as info:
            api.RegistrationStub(channel).Register(request, timeout=5)
        assert "not supported by kubelet" in str(info.value.details())
    finally:
        kubelet.stop()


def test_extended_resource_name_rules():
    assert is_extended_resource_name("hostkit.io/fuse")
    assert is_extended_resource_name("example.com/gpu-A_1.x")
    for bad in (
        "fuse",  # no domain
        "kubernetes.io/fuse",
        "foo.kubernetes.io/fuse",
        "requests.hostkit.io/fuse",
        "hostkit.io/",
        "hostkit.io/-fuse",
        "Hostkit.IO/fuse",  # the prefix is a lower-case DNS subdomain
        "hostkit.io/" + "x" * 64,
    ):
        assert not is_extended_resource_name(bad), bad
    assert go_quote('a"b') == '"a\\"b"'
