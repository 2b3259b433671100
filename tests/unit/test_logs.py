"""Log records as the daemons print them: text lines and JSON lines.

Formatters are exercised on real ``LogRecord``s (built by a real logger, so
``extra`` and ``exc_info`` travel exactly as in the daemons) and through
``configure_logging``, which is what the CLIs call.
"""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator

import pytest

from plugin_runtime import logs


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _record(level: int, msg: str, *args: object, exc: bool = False, **extra: object
            ) -> logging.LogRecord:
    logger = logging.getLogger("hostkit.test.logs")
    capture = _Capture()
    logger.addHandler(capture)
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    try:
        if exc:
            try:
                raise ValueError("disk on fire")
            except ValueError:
                logger.log(level, msg, *args, exc_info=True, extra=extra)
        else:
            logger.log(level, msg, *args, extra=extra)
    finally:
        logger.removeHandler(capture)
        logger.propagate = True
        logger.setLevel(logging.NOTSET)
    (record,) = capture.records
    return record


def test_json_line_has_the_standard_fields():
    record = _record(logging.WARNING, "pool %s is %d%% full", "fast", 93)
    payload = json.loads(logs.JsonFormatter().format(record))
    assert set(payload) == {"ts", "level", "logger", "msg"}
    assert payload["level"] == "warning"
    assert payload["logger"] == "hostkit.test.logs"
    assert payload["msg"] == "pool fast is 93% full"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", payload["ts"])


def test_json_line_carries_every_extra_as_its_own_field():
    record = _record(
        logging.ERROR, "rpc failed", resource="hostkit.io/fuse", rpc="Allocate",
        code="NOT_FOUND", ids=["a", "b"], took=object(),
    )
    payload = json.loads(logs.JsonFormatter().format(record))
    assert payload["resource"] == "hostkit.io/fuse"
    assert payload["rpc"] == "Allocate"
    assert payload["code"] == "NOT_FOUND"
    assert payload["ids"] == ["a", "b"]
    assert payload["took"].startswith("<object object")  # unserialisable: str()
    assert "exc" not in payload


def test_json_line_keeps_the_traceback_in_one_field():
    record = _record(logging.ERROR, "probe crashed", exc=True, resource="hostkit.io/tty")
    line = logs.JsonFormatter().format(record)
    assert "\n" not in line  # one record, one line, whatever the traceback
    payload = json.loads(line)
    assert payload["msg"] == "probe crashed"
    assert payload["resource"] == "hostkit.io/tty"
    assert payload["exc"].startswith("Traceback (most recent call last):")
    assert payload["exc"].endswith("ValueError: disk on fire")


def test_json_extras_never_overwrite_the_standard_fields():
    record = logging.makeLogRecord({
        "name": "hostkit.test.logs", "levelno": logging.INFO, "levelname": "INFO",
        "msg": "real message", "level": "fake", "ts": "never", "logger": "x",
    })
    payload = json.loads(logs.JsonFormatter().format(record))
    assert payload["level"] == "info" and payload["logger"] == "hostkit.test.logs"
    assert payload["ts"] != "never"
    assert (payload["extra_level"], payload["extra_ts"], payload["extra_logger"]) == (
        "fake", "never", "x")


def test_json_line_keeps_a_stack_requested_with_stack_info():
    logger = logging.getLogger("hostkit.test.logs.stack")
    capture = _Capture()
    logger.addHandler(capture)
    logger.propagate = False
    try:
        logger.warning("where am I", stack_info=True)
    finally:
        logger.removeHandler(capture)
        logger.propagate = True
    payload = json.loads(logs.JsonFormatter().format(capture.records[0]))
    assert payload["stack"].startswith("Stack (most recent call last):")
    assert "test_json_line_keeps_a_stack_requested_with_stack_info" in payload["stack"]


def test_json_line_keeps_non_ascii_text():
    payload = logs.JsonFormatter().format(_record(logging.INFO, "gerät %s", "ünïcode"))
    assert "gerät ünïcode" in payload


def test_text_line_has_time_level_logger_message_then_sorted_extras():
    record = _record(logging.INFO, "registered as %s", "x.sock",
                     rpc="Register", resource="hostkit.io/fuse", code="OK")
    line = logs.TextFormatter().format(record)
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO    hostkit\.test\.logs: "
        r"registered as x\.sock code=OK resource=hostkit\.io/fuse rpc=Register",
        line,
    ), line


def test_text_line_without_extras_ends_with_the_message():
    line = logs.TextFormatter().format(_record(logging.DEBUG, "quiet"))
    assert line.endswith(" DEBUG   hostkit.test.logs: quiet")


def test_text_extras_stay_on_the_message_line_ahead_of_the_traceback():
    record = _record(logging.ERROR, "probe crashed", exc=True, resource="hostkit.io/tty")
    first, *rest = logs.TextFormatter().format(record).splitlines()
    assert first.endswith("ERROR   hostkit.test.logs: probe crashed resource=hostkit.io/tty")
    assert rest[0] == "Traceback (most recent call last):"
    assert rest[-1] == "ValueError: disk on fire"


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield root
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


@pytest.mark.parametrize(("fmt", "formatter"), [("text", logs.TextFormatter),
                                                ("json", logs.JsonFormatter)])
def test_configure_logging_installs_one_handler_with_the_format(root_logger, fmt, formatter):
    logs.configure_logging("warning", fmt)
    (handler,) = root_logger.handlers
    assert isinstance(handler.formatter, formatter)
    assert root_logger.level == logging.WARNING
    logs.configure_logging("debug", fmt)  # again: replaces, never adds
    assert len(root_logger.handlers) == 1 and root_logger.level == logging.DEBUG


def test_configure_logging_writes_json_lines_to_stderr(root_logger, monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    logs.configure_logging("info", "json")
    logging.getLogger("hostkit.test.logs").info("hello", extra={"volume_id": "v1"})
    logging.getLogger("hostkit.test.logs").debug("below the level")
    (line,) = stream.getvalue().splitlines()
    assert json.loads(line)["volume_id"] == "v1"


def test_configure_logging_names_a_bad_level_or_format(root_logger):
    with pytest.raises(ValueError, match="unknown log level 'loud'"):
        logs.configure_logging("loud", "text")
    with pytest.raises(ValueError, match="unknown log format 'xml'"):
        logs.configure_logging("info", "xml")
