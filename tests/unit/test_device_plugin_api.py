"""device_plugin.api: the constants agree with the schema and with the domain's model."""

from __future__ import annotations

from device_plugin import api, model
from device_plugin._proto.deviceplugin import api_pb2


def test_constants_match_the_kubelet_and_the_model():
    assert api.VERSION == "v1beta1"
    assert api.KUBELET_SOCKET == "kubelet.sock"
    assert api.DEFAULT_KUBELET_DIR == "/var/lib/kubelet/device-plugins"
    assert (api.HEALTHY, api.UNHEALTHY) == (model.HEALTHY, model.UNHEALTHY) == (
        "Healthy", "Unhealthy"
    )
    assert api.MAX_MESSAGE_BYTES == 4 * 1024 * 1024


def test_service_names_are_the_ones_on_the_wire():
    services = api_pb2.DESCRIPTOR.services_by_name
    assert services["DevicePlugin"].full_name == api.DEVICE_PLUGIN_SERVICE
    assert services["Registration"].full_name == api.REGISTRATION_SERVICE
    methods = {m.name for m in services["DevicePlugin"].methods}
    assert methods == {
        "GetDevicePluginOptions", "ListAndWatch", "GetPreferredAllocation", "Allocate",
        "PreStartContainer",
    }


def test_pod_resources_are_there_on_demand():
    messages, stubs = api.pod_resources_api()
    assert hasattr(messages, "ListPodResourcesRequest")
    assert hasattr(stubs, "PodResourcesListerStub")
