"""The one boundary between gRPC and domain code.

``RpcBoundary.unary`` and ``RpcBoundary.stream`` wrap servicer methods.  They
time and log every call with the request redacted, count it by final code, and
translate exceptions: a ``DomainError`` becomes its own status code and message,
anything else becomes INTERNAL with a message that names the method (never
UNKNOWN, never a Python traceback on the wire).  Servicers never call
``context.abort`` themselves.

Unary handlers stay blocking functions; the aio server runs them on its thread
pool.  ``inline`` is for the few that only compute from memory (no file, device
or subprocess I/O; locks held for microseconds), such as the device plugin's
Allocate: they run on the serving loop itself, which saves the two thread
handoffs of the pool (about 0.15 ms of a 0.5 ms round trip here).

A streaming handler is written as a blocking generator too, but it gets
a ``StreamCall`` instead of the gRPC context, and ``stream`` turns it into the
async generator the server runs: each item is produced on a stream worker
thread, and when the client goes away the task's cancellation fires the
``StreamCall`` callbacks at once (the generator wakes and ends) and the generator
is closed on its worker thread.  A plain sync generator under ``grpc.aio`` would
learn of the cancellation only after its next item, which for a ListAndWatch
with no device change means never.

Redaction walks the request and blanks every field whose descriptor carries a
``csi_secret`` (or any ``*_secret``) option, so the CSI driver's secrets never
reach a log line without this module importing the CSI stubs.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Generator
from concurrent import futures
from typing import Any, TypeVar

import grpc
from google.protobuf import text_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from plugin_runtime.errors import DomainError
from plugin_runtime.metrics import RPC_SECONDS, RPC_TOTAL

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

_CLIENT_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}

REDACTED = "***stripped***"


def status_code(name: str) -> grpc.StatusCode:
    """Map a domain error's code name to the gRPC enum (INTERNAL for an unknown name)."""
    return getattr(grpc.StatusCode, name, grpc.StatusCode.INTERNAL)


def _is_secret(field: Any) -> bool:
    options = field.GetOptions().ListFields()
    return any(ext.name.endswith("_secret") and value for ext, value in options)


_secret_cache: dict[str, tuple[Any, ...]] = {}


def _secret_fields(message: Message) -> tuple[Any, ...]:
    desc = message.DESCRIPTOR
    cached = _secret_cache.get(desc.full_name)
    if cached is None:
        cached = tuple(f for f in desc.fields if _is_secret(f))
        _secret_cache[desc.full_name] = cached
    return cached


def redacted_copy(message: Message) -> Message:
    """A copy of ``message`` with every secret field (at any depth) replaced."""
    copy = type(message)()
    copy.CopyFrom(message)
    _redact_in_place(copy)
    return copy


def _redact_in_place(message: Message) -> None:
    secret = set(_secret_fields(message))
    for field, value in message.ListFields():
        if field in secret:
            if field.message_type is not None and field.message_type.GetOptions().map_entry:
                for key in list(value):
                    value[key] = REDACTED
            elif field.type == FieldDescriptor.TYPE_STRING:
                if field.is_repeated:
                    value[:] = [REDACTED] * len(value)
                else:
                    setattr(message, field.name, REDACTED)
            else:
                message.ClearField(field.name)
            continue
        if field.type != FieldDescriptor.TYPE_MESSAGE:
            continue
        entry = field.message_type
        if entry is not None and entry.GetOptions().map_entry:
            map_value = entry.fields_by_name["value"]
            if map_value.type == FieldDescriptor.TYPE_MESSAGE:
                for item in value.values():
                    _redact_in_place(item)
        elif field.is_repeated:
            for item in value:
                _redact_in_place(item)
        else:
            _redact_in_place(value)


def describe(message: Message, limit: int = 2000) -> str:
    """One-line, redacted text form of a request for logs."""
    text = text_format.MessageToString(redacted_copy(message), as_one_line=True)
    return text if len(text) <= limit else text[:limit] + "...(truncated)"


class RpcBoundary:
    """Wraps the handlers of one gRPC service.

    ``quiet`` names methods logged at DEBUG even when they fail with a client
    code (Probe and health checks are called every few seconds).
    """

    def __init__(self, service: str, quiet: frozenset[str] = frozenset()) -> None:
        self.service = service
        self.quiet = quiet

    def _finish(
        self, method: str, request: Message, started: float, code: grpc.StatusCode, message: str
    ) -> None:
        elapsed = time.monotonic() - started
        RPC_TOTAL.labels(self.service, method, code.name).inc()
        RPC_SECONDS.labels(self.service, method).observe(elapsed)
        if code == grpc.StatusCode.OK or method in self.quiet:
            level = logging.DEBUG
        elif code in _CLIENT_CODES:
            level = logging.WARNING
        else:
            level = logging.ERROR
        if log.isEnabledFor(level):
            log.log(
                level,
                "%s/%s -> %s in %.1f ms%s [%s]",
                self.service,
                method,
                code.name,
                elapsed * 1000,
                f": {message}" if message else "",
                describe(request),
                extra={"rpc": method, "code": code.name},
            )

    def _translate(
        self, method: str, exc: BaseException
    ) -> tuple[grpc.StatusCode, str]:
        if isinstance(exc, DomainError):
            return status_code(exc.code), str(exc)
        log.exception("unexpected error in %s/%s", self.service, method)
        return grpc.StatusCode.INTERNAL, f"internal error in {method}: {type(exc).__name__}: {exc}"

    def _call(
        self, fn: Callable[..., Any], servicer: Any, request: Message, context: Any
    ) -> tuple[Any, tuple[grpc.StatusCode, str] | None]:
        """Run a unary handler: its response, or the status to abort with (logged, counted)."""
        method = fn.__name__
        started = time.monotonic()
        try:
            response = fn(servicer, request, context)
        except Exception as exc:
            code, message = self._translate(method, exc)
            self._finish(method, request, started, code, message)
            return None, (code, message)
        self._finish(method, request, started, grpc.StatusCode.OK, "")
        return response, None

    def unary(self, fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(servicer: Any, request: Message, context: grpc.ServicerContext) -> Any:
            response, failure = self._call(fn, servicer, request, context)
            if failure is not None:
                context.abort(*failure)
            return response

        return wrapper  # type: ignore[return-value]

    def inline(self, fn: F) -> F:
        """Like ``unary``, but run on the serving loop: only for handlers that never block."""

        @functools.wraps(fn)
        async def wrapper(
            servicer: Any, request: Message, context: grpc.aio.ServicerContext[Any, Any]
        ) -> Any:
            response, failure = self._call(fn, servicer, request, context)
            if failure is not None:
                await context.abort(*failure)
            return response

        return wrapper  # type: ignore[return-value]

    def stream(self, fn: F) -> F:
        """Wrap ``fn(servicer, request, call: StreamCall)``, a blocking generator."""
        method = fn.__name__

        @functools.wraps(fn)
        async def wrapper(
            servicer: Any, request: Message, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            started = time.monotonic()
            log.debug("%s/%s stream opened", self.service, method)
            call = StreamCall()
            body: Generator[Any, None, None] = fn(servicer, request, call)
            pending: futures.Future[Any] | None = None
            outcome: grpc.StatusCode | None = None
            try:
                while True:
                    pending = _stream_workers().submit(next, body, _END)
                    item = await asyncio.wrap_future(pending)
                    pending = None
                    if item is _END:
                        break
                    yield item
                outcome = grpc.StatusCode.OK
                self._finish(method, request, started, outcome, "")
            except Exception as exc:
                outcome, message = self._translate(method, exc)
                self._finish(method, request, started, outcome, message)
                await context.abort(outcome, message)
            finally:
                # Cancelled, or the server closed the stream: wake the body so its
                # worker is free at once, then close it (a no-op once it is done).
                call.end()
                _close_when_idle(body, pending)
                if outcome is None:
                    self._finish(method, request, started, grpc.StatusCode.CANCELLED, "")

        return wrapper  # type: ignore[return-value]


class StreamCall:
    """What a streaming handler's body gets in place of the gRPC context.

    ``add_callback`` registers a function called once, from the serving loop,
    when the client cancels or goes away (immediately if it already has): it
    must only wake the body (set an event, notify a condition), never block.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], None]] = []
        self._ended = False

    @property
    def ended(self) -> bool:
        return self._ended

    def add_callback(self, callback: Callable[[], None]) -> None:
        with self._lock:
            if not self._ended:
                self._callbacks.append(callback)
                return
        callback()

    def end(self) -> None:
        with self._lock:
            if self._ended:
                return
            self._ended = True
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            try:
                callback()
            except Exception:
                log.exception("stream cancellation callback failed")


_END = object()
_workers_lock = threading.Lock()
_workers: futures.ThreadPoolExecutor | None = None
# Each open stream holds one worker while it waits for its next item (the device
# plugin: one per resource, two during a re-registration).  A stream beyond the
# cap would wait for a free worker before its first item, so the cap only guards
# against runaway thread creation; the pool starts a thread only when none is idle.
MAX_STREAMS = 4096


def _stream_workers() -> futures.ThreadPoolExecutor:
    global _workers
    with _workers_lock:
        if _workers is None:
            _workers = futures.ThreadPoolExecutor(
                max_workers=MAX_STREAMS, thread_name_prefix="grpc-stream"
            )
        return _workers


def _close_when_idle(body: Generator[Any, None, None], pending: futures.Future[Any] | None) -> None:
    """Close a cancelled stream's generator on a worker once it is not running."""

    def close() -> None:
        try:
            body.close()
        except Exception:
            log.exception("closing a cancelled stream failed")

    def close_on_a_worker(_: object = None) -> None:
        try:
            _stream_workers().submit(close)
        except RuntimeError:  # the interpreter is exiting: no new worker threads
            close()

    if pending is None:
        close_on_a_worker()
    else:
        # Runs when the worker's next() returns (woken by the callbacks), or right
        # here if it already has; either way not while the generator runs.
        pending.add_done_callback(close_on_a_worker)
