"""The shared serving model: grpc.aio transport on one loop, blocking handlers off it.

Real servers on unix sockets.  What must hold whatever the daemon: a handler that
blocks never stalls another socket of the process (unary handlers run on their
server's pool); ``RpcBoundary.inline`` and ``.stream`` map errors like ``.unary``;
a cancelled stream's body is woken at once and its cleanup runs; every server
shares the one serving loop, the reason idle cost no longer grows with sockets; and
a graceful stop lets an in-flight call finish but never waits past its grace for
a handler that does not return.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_health.v1.health_pb2 import HealthCheckRequest as Request
from grpc_health.v1.health_pb2 import HealthCheckResponse as Reply

from plugin_runtime import errors
from plugin_runtime.rpc import RpcBoundary, StreamCall
from plugin_runtime.server import ServingLoop, UnixSocketServer

SERVICE = "hostkit.test.Model"
SERVING = health_pb2.HealthCheckResponse.SERVING
_BOUNDARY = RpcBoundary(SERVICE)


class ModelServicer:
    def __init__(self) -> None:
        self.release = threading.Event()
        self.blocked = threading.Event()
        self.stream_waiting = threading.Event()
        self.stream_woken = threading.Event()
        self.stream_cleaned_up = threading.Event()
        self.loop_thread_seen: list[str] = []

    @_BOUNDARY.unary
    def Block(self, request: Request, context: grpc.ServicerContext) -> Reply:
        self.blocked.set()
        self.release.wait(20)
        return Reply(status=SERVING)

    @_BOUNDARY.unary
    def Slow(self, request: Request, context: grpc.ServicerContext) -> Reply:
        self.blocked.set()
        time.sleep(0.5)
        return Reply(status=SERVING)

    @_BOUNDARY.unary
    def Quick(self, request: Request, context: grpc.ServicerContext) -> Reply:
        return Reply(status=SERVING)

    @_BOUNDARY.inline
    def Inline(self, request: Request, context: grpc.ServicerContext) -> Reply:
        self.loop_thread_seen.append(threading.current_thread().name)
        if request.service == "missing":
            raise errors.NotFound("no such thing 'missing'")
        if request.service == "bug":
            raise ValueError("a bug")
        return Reply(status=SERVING)

    @_BOUNDARY.stream
    def Watch(self, request: Request, call: StreamCall) -> Iterator[Reply]:
        stop = threading.Event()

        def cancelled() -> None:
            stop.set()

        call.add_callback(cancelled)
        try:
            yield Reply(status=SERVING)
            if request.service == "refuse":
                raise errors.ResourceExhausted("snapshot too large for 'refuse'")
            self.stream_waiting.set()
            if stop.wait(60):
                self.stream_woken.set()
        finally:
            self.stream_cleaned_up.set()


def _register(servicer: ModelServicer, server: grpc.aio.Server) -> None:
    def unary(fn: Callable[..., Any]) -> grpc.RpcMethodHandler[Any, Any]:
        return grpc.unary_unary_rpc_method_handler(
            fn, request_deserializer=Request.FromString, response_serializer=Reply.SerializeToString
        )

    handlers = {
        "Block": unary(servicer.Block),
        "Slow": unary(servicer.Slow),
        "Quick": unary(servicer.Quick),
        "Inline": unary(servicer.Inline),
        "Watch": grpc.unary_stream_rpc_method_handler(
            servicer.Watch,
            request_deserializer=Request.FromString,
            response_serializer=Reply.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


@pytest.fixture
def served() -> Iterator[tuple[list[str], list[ModelServicer]]]:
    directory = tempfile.mkdtemp(prefix="sm", dir="/tmp")
    servicers = [ModelServicer() for _ in range(3)]
    servers = []
    try:
        for index, servicer in enumerate(servicers):
            server = UnixSocketServer(
                os.path.join(directory, f"{index}.sock"),
                lambda s, servicer=servicer: _register(servicer, s),  # type: ignore[misc]
                max_workers=2,
            )
            server.start()
            servers.append(server)
        yield [s.socket_path for s in servers], servicers
    finally:
        for servicer in servicers:
            servicer.release.set()
        for server in servers:
            server.stop(grace=1)
        shutil.rmtree(directory, ignore_errors=True)


def _call(channel: grpc.Channel, method: str) -> grpc.UnaryUnaryMultiCallable[Any, Any]:
    return channel.unary_unary(
        f"/{SERVICE}/{method}",
        request_serializer=Request.SerializeToString,
        response_deserializer=Reply.FromString,
    )


def test_a_blocking_handler_stalls_no_other_socket_and_no_other_call(served):
    paths, servicers = served
    with grpc.insecure_channel(f"unix://{paths[0]}") as first, \
            grpc.insecure_channel(f"unix://{paths[1]}") as second:
        pending = _call(first, "Block").future(Request(), timeout=30)
        assert servicers[0].blocked.wait(10)
        # While that handler blocks: another socket, and the same one, still answer.
        assert _call(second, "Quick")(Request(), timeout=5).status == SERVING
        assert _call(first, "Quick")(Request(), timeout=5).status == SERVING
        assert _call(second, "Inline")(Request(), timeout=5).status == SERVING
        servicers[0].release.set()
        assert pending.result(timeout=10).status == SERVING


def test_every_server_shares_the_one_serving_loop(served):
    paths, servicers = served
    for path in paths:
        with grpc.insecure_channel(f"unix://{path}") as channel:
            _call(channel, "Inline")(Request(), timeout=5)
    # Inline handlers ran on the serving loop's thread, the same one for every socket.
    seen = {name for s in servicers for name in s.loop_thread_seen}
    assert seen == {"grpc-loop"}
    assert [t.name for t in threading.enumerate()].count("grpc-loop") == 1


def test_inline_handlers_map_errors_like_unary_ones(served):
    paths, _ = served
    with grpc.insecure_channel(f"unix://{paths[0]}") as channel:
        with pytest.raises(grpc.RpcError) as info:
            _call(channel, "Inline")(Request(service="missing"), timeout=5)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert info.value.details() == "no such thing 'missing'"
        with pytest.raises(grpc.RpcError) as info:
            _call(channel, "Inline")(Request(service="bug"), timeout=5)
        assert info.value.code() == grpc.StatusCode.INTERNAL
        details = info.value.details() or ""
        assert "Inline" in details and "a bug" in details


def _watch(channel: grpc.Channel, service: str) -> Any:
    return channel.unary_stream(
        f"/{SERVICE}/Watch",
        request_serializer=Request.SerializeToString,
        response_deserializer=Reply.FromString,
    )(Request(service=service), timeout=30)


def test_a_stream_body_error_ends_the_stream_with_its_code(served):
    paths, servicers = served
    with grpc.insecure_channel(f"unix://{paths[0]}") as channel:
        stream = _watch(channel, "refuse")
        assert next(stream).status == SERVING
        with pytest.raises(grpc.RpcError) as info:
            next(stream)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert info.value.details() == "snapshot too large for 'refuse'"
    assert servicers[0].stream_cleaned_up.wait(10)


def test_a_cancelled_stream_ends_its_body_at_once(served):
    paths, servicers = served
    with grpc.insecure_channel(f"unix://{paths[2]}") as channel:
        stream = _watch(channel, "")
        assert next(stream).status == SERVING
        stream.cancel()
    # The body's cleanup runs long before its 60 s wait could run out: it is either
    # woken by the StreamCall callback inside that wait, or closed at its yield when
    # the cancellation came before it got there.
    assert servicers[2].stream_cleaned_up.wait(10)


def test_a_stream_cancelled_while_its_body_waits_wakes_that_wait(served):
    paths, servicers = served
    with grpc.insecure_channel(f"unix://{paths[1]}") as channel:
        stream = _watch(channel, "")
        assert next(stream).status == SERVING
        assert servicers[1].stream_waiting.wait(10)
        stream.cancel()
    assert servicers[1].stream_woken.wait(10)
    assert servicers[1].stream_cleaned_up.wait(10)


def test_many_open_streams_each_get_their_first_item(served):
    # Far more streams than the device plugin ever opens at once: every one must
    # be served, none may wait for another to end.
    paths, servicers = served
    with grpc.insecure_channel(f"unix://{paths[0]}") as channel:
        streams = [_watch(channel, "") for _ in range(80)]
        try:
            for stream in streams:
                assert next(stream).status == SERVING
        finally:
            for stream in streams:
                stream.cancel()
    assert servicers[0].stream_cleaned_up.wait(10)


def test_stream_call_runs_each_callback_once_and_late_ones_at_once():
    call = StreamCall()
    fired: list[str] = []
    call.add_callback(lambda: fired.append("early"))
    call.end()
    call.end()
    assert fired == ["early"] and call.ended
    call.add_callback(lambda: fired.append("late"))
    assert fired == ["early", "late"]


def test_the_serving_loop_refuses_to_wait_on_itself():
    shared = ServingLoop.shared()

    async def nested() -> None:
        async def nothing() -> None:
            return None

        shared.run(nothing(), timeout=1)

    with pytest.raises(RuntimeError, match="from the serving loop"):
        shared.run(nested(), timeout=5)


@pytest.fixture
def lone_server() -> Iterator[tuple[UnixSocketServer, ModelServicer]]:
    directory = tempfile.mkdtemp(prefix="sm", dir="/tmp")
    servicer = ModelServicer()
    server = UnixSocketServer(
        os.path.join(directory, "lone.sock"), lambda s: _register(servicer, s), max_workers=2
    )
    server.start()
    try:
        yield server, servicer
    finally:
        servicer.release.set()
        server.stop(grace=1)
        shutil.rmtree(directory, ignore_errors=True)


def test_stop_lets_an_in_flight_call_finish_within_its_grace(lone_server):
    server, servicer = lone_server
    with grpc.insecure_channel(f"unix://{server.socket_path}") as channel:
        pending = _call(channel, "Slow").future(Request(), timeout=30)
        assert servicer.blocked.wait(10)
        server.stop(grace=1)  # the handler needs about 0.5 s more
        assert pending.result(timeout=10).status == SERVING
    assert not os.path.exists(server.socket_path)


def test_stop_returns_after_its_grace_even_if_a_handler_never_does(lone_server):
    server, servicer = lone_server
    with grpc.insecure_channel(f"unix://{server.socket_path}") as channel:
        pending = _call(channel, "Block").future(Request(), timeout=30)
        assert servicer.blocked.wait(10)
        outcome: list[BaseException | None] = []

        def stop() -> None:
            try:
                server.stop(grace=1)
                outcome.append(None)
            except BaseException as exc:  # reported below, not lost in the thread
                outcome.append(exc)

        stopper = threading.Thread(target=stop, name="stopper")
        stopper.start()
        # A generous bound, not a speed goal: the handler blocks for 20 s unless
        # released, so a stop that waited for it would still be running here.
        stopper.join(1 + 3)
        alive = stopper.is_alive()
        servicer.release.set()
        stopper.join(30)
        assert not alive, "stop(grace=1) waited for a handler that never returned"
        assert outcome == [None]
        with pytest.raises(grpc.RpcError):
            pending.result(timeout=10)  # cancelled by the stop, not answered
    assert not os.path.exists(server.socket_path)
