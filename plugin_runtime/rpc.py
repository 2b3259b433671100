"""The one boundary between gRPC and domain code.

``RpcBoundary.unary`` and ``RpcBoundary.stream`` wrap servicer methods.  They
time and log every call with the request redacted, count it by final code, and
translate exceptions: a ``DomainError`` becomes its own status code and message,
anything else becomes INTERNAL with a message that names the method (never
UNKNOWN, never a Python traceback on the wire).  Servicers never call
``context.abort`` themselves.

Redaction walks the request and blanks every field whose descriptor carries a
``csi_secret`` (or any ``*_secret``) option, so the CSI driver's secrets never
reach a log line without this module importing the CSI stubs.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterator
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

    def unary(self, fn: F) -> F:
        method = fn.__name__

        @functools.wraps(fn)
        def wrapper(servicer: Any, request: Message, context: grpc.ServicerContext) -> Any:
            started = time.monotonic()
            try:
                response = fn(servicer, request, context)
            except Exception as exc:
                code, message = self._translate(method, exc)
                self._finish(method, request, started, code, message)
                context.abort(code, message)
            self._finish(method, request, started, grpc.StatusCode.OK, "")
            return response

        return wrapper  # type: ignore[return-value]

    def stream(self, fn: F) -> F:
        method = fn.__name__

        @functools.wraps(fn)
        def wrapper(
            servicer: Any, request: Message, context: grpc.ServicerContext
        ) -> Iterator[Any]:
            started = time.monotonic()
            log.debug("%s/%s stream opened", self.service, method)
            try:
                yield from fn(servicer, request, context)
            except GeneratorExit:
                self._finish(method, request, started, grpc.StatusCode.CANCELLED, "")
                raise
            except Exception as exc:
                code, message = self._translate(method, exc)
                self._finish(method, request, started, code, message)
                context.abort(code, message)
            else:
                code = grpc.StatusCode.CANCELLED if not context.is_active() else grpc.StatusCode.OK
                self._finish(method, request, started, code, "")

        return wrapper  # type: ignore[return-value]
