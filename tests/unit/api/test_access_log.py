"""The access log's line, written once per request: its text, and what its making skips."""

from __future__ import annotations

import io
import json
import logging
import random
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from shunter.api.middleware import access_log, log_access
from shunter.observability.logging import (
    InfoLines,
    JsonFormatter,
    TextFormatter,
    plain_handlers,
)


@contextmanager
def text_lines(
    logger: logging.Logger,
) -> Iterator[tuple[io.StringIO, logging.StreamHandler[io.StringIO]]]:
    """``logger`` at INFO writing text lines to the yielded buffer through the yielded
    handler, as the gateway's own handlers do; undone after. Its records do not reach the
    root logger's handlers, where pytest's captures would send every line through a record
    (the direct path writes only to plain stream handlers)."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(TextFormatter())
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield out, handler
    finally:
        logger.propagate = True
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)


def logged(*lines: tuple[str, str]) -> list[str]:
    """The text lines ``log_access`` writes for (path, worker) pairs."""
    with text_lines(access_log) as (out, _):
        for path, worker in lines:
            log_access("POST", path, 200, 0.0012345, worker, "chatcmpl-1", "")
    return out.getvalue().splitlines()


def test_an_access_line_has_its_fields() -> None:
    [line] = logged(("/v1/chat/completions", "http://w:1"))
    stamp, rest = line[:19], line[20:]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", stamp)
    assert rest == (
        "INFO shunter.access: POST /v1/chat/completions 200 status=200 latency_ms=1.234 "
        "worker=http://w:1 request_id=chatcmpl-1 error_code="
    )


def test_the_time_is_formatted_once_a_second_and_is_each_records_own() -> None:
    formatter = TextFormatter()
    stamps = []
    for created in (1_700_000_000.1, 1_700_000_000.9, 1_700_000_001.0, 1_699_999_999.5):
        record = logging.makeLogRecord({"msg": "m", "created": created})
        stamps.append(formatter.format(record)[:19])
    assert stamps == [
        "2023-11-14 22:13:20",
        "2023-11-14 22:13:20",
        "2023-11-14 22:13:21",
        "2023-11-14 22:13:19",
    ]


def test_only_a_line_that_needs_it_is_escaped() -> None:
    plain, forged = logged(("/a", "http://w:1"), ("/b\n\u2028\\\x85\t\u2029", "http://w:1"))
    assert "POST /a 200" in plain
    assert "POST /b\\x0a\\u2028\\\\\\x85\\x09\\u2029 200" in forged


def test_an_access_record_is_made_without_walking_the_stack() -> None:
    """No format prints the caller's file and line, so the record is made without them."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep()
    access_log.addHandler(handler)
    access_log.setLevel(logging.INFO)
    try:
        log_access("GET", "/health", 200, 0.001, None, "req-1", "")
    finally:
        access_log.removeHandler(handler)
        access_log.setLevel(logging.NOTSET)
    [record] = records
    assert (record.lineno, record.getMessage()) == (0, "GET /health 200")


def direct_and_recorded(formatter: logging.Formatter) -> tuple[str, str]:
    """The access line written directly (a plain stream handler) and the same line formatted
    from a record (a handler that is not plain, so ``log_access`` makes one)."""
    direct, recorded = io.StringIO(), io.StringIO()
    plain = logging.StreamHandler(direct)
    plain.setFormatter(formatter)

    class Recorded(logging.StreamHandler):  # type: ignore[type-arg]
        pass

    not_plain = Recorded(recorded)
    not_plain.setFormatter(formatter)
    access_log.setLevel(logging.INFO)
    access_log.propagate = False  # past pytest's captures on the root logger (see text_lines)
    try:
        for handler in (plain, not_plain):
            access_log.addHandler(handler)
            log_access("POST", "/v1/x\n", 502, 0.0021, None, "req-9", "upstream_unavailable")
            access_log.removeHandler(handler)
    finally:
        access_log.propagate = True
        access_log.setLevel(logging.NOTSET)
    return direct.getvalue(), recorded.getvalue()


def test_a_line_written_directly_is_the_line_a_record_gives() -> None:
    direct, recorded = direct_and_recorded(TextFormatter())
    assert direct[19:] == recorded[19:]  # the stamps may be a second apart
    assert direct.endswith(
        "POST /v1/x\\x0a 502 status=502 latency_ms=2.1 worker=None "
        "request_id=req-9 error_code=upstream_unavailable\n"
    )
    direct, recorded = direct_and_recorded(JsonFormatter())
    lines = [json.loads(text) for text in (direct, recorded)]
    assert [{k: v for k, v in line.items() if k != "ts"} for line in lines] == [
        {
            "level": "info",
            "logger": "shunter.access",
            "message": "POST /v1/x\n 502",
            "status": 502,
            "latency_ms": 2.1,
            "worker": None,
            "request_id": "req-9",
            "error_code": "upstream_unavailable",
        }
    ] * 2


def test_a_filter_or_a_handler_above_info_is_honoured_on_the_direct_path() -> None:
    with text_lines(access_log) as (out, handler):
        handler.setLevel(logging.WARNING)
        log_access("GET", "/a", 200, 0.001, None, "req-1", "")
        handler.setLevel(logging.NOTSET)
        handler.addFilter(lambda record: record.getMessage() != "GET /b 200")
        log_access("GET", "/b", 200, 0.001, None, "req-2", "")
        log_access("GET", "/c", 200, 0.001, None, "req-3", "")
    assert ["GET /c 200" in line for line in out.getvalue().splitlines()] == [True]


def test_secret_fields_are_redacted_on_the_direct_path() -> None:
    logger = logging.getLogger("shunter.test_lines")
    with text_lines(logger) as (out, _):
        InfoLines(logger).write("called", {"api_key": "sk-1", "n": 1})
    assert out.getvalue().endswith("called api_key=<redacted> n=1\n")


def written_and_recorded(*args: Any) -> tuple[str, str]:
    """``log_access(*args)``'s text line as written directly, and as ``TextFormatter``
    formats the record a handler that is not plain is handed, each less its time stamp."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    with text_lines(access_log) as (out, _):
        assert plain_handlers(access_log) is not None  # written directly
        log_access(*args)
    keep = Keep()
    access_log.addHandler(keep)
    access_log.setLevel(logging.INFO)
    try:
        log_access(*args)
    finally:
        access_log.removeHandler(keep)
        access_log.setLevel(logging.NOTSET)
    [record] = records
    return out.getvalue()[20:], TextFormatter().format(record)[20:] + "\n"


@pytest.mark.parametrize(
    "args",
    [
        ("GET", "/health", 200, 0.0001, None, "req-1", ""),  # no worker, no error code
        ("POST", "/v1/x\r\nforged 200", 502, 0.0021, "http://w:1", "req-2", "upstream_x"),
        ("POST", "/a\\x0a", 200, 0.5, "http://w\x1b[31m:1", "req-3", ""),  # backslash, ESC
        ("DELETE", "/caf\u00e9/\u2028/\x85/\x7f", 404, 1.0, None, "req-4", "not_found"),
        ("POST", "/b", 500, 0.0, "http://w:1", "req\t5", "code\nwith\\break"),
        ("PO\x00ST", "/c", 200, 12.3456789, "http://w:1", "req-6", ""),
    ],
)
def test_a_written_line_is_the_line_its_record_gives(args: tuple[Any, ...]) -> None:
    written, recorded = written_and_recorded(*args)
    assert written == recorded
    assert "\n" not in written[:-1] and "\r" not in written


def test_the_latency_has_the_digits_of_rounding_to_a_microsecond() -> None:
    """``repr(round(ms, 3))``, as a record's field prints, whatever the float: ties, whole
    milliseconds, trailing zeros, under a microsecond, minutes."""
    rng = random.Random(17)
    latencies = [0.0, 1e-7, 5e-7, 0.0005, 0.0012345, 0.0021, 0.002, 2.0, 59.9999999, 86400.5]
    latencies += [rng.uniform(0, 2) for _ in range(300)]
    latencies += [rng.randrange(0, 10**7) / 10**7 for _ in range(300)]  # near-ties
    with text_lines(access_log) as (out, _):
        for seconds in latencies:
            log_access("GET", "/a", 200, seconds, None, "req-1", "")
    written = re.findall(r" latency_ms=(\S+) ", out.getvalue())
    assert written == [repr(round(seconds * 1000, 3)) for seconds in latencies]


def test_a_formatter_of_its_own_formats_the_line() -> None:
    class Upper(TextFormatter):
        def line(self, asctime: str, level: str, logger: str, message: str, fields: Any) -> str:
            return super().line(asctime, level, logger, message, fields).upper()

    with text_lines(access_log) as (out, handler):
        handler.setFormatter(Upper())
        log_access("GET", "/health", 200, 0.001, None, "req-1", "")
    assert out.getvalue().endswith(
        " GET /HEALTH 200 STATUS=200 LATENCY_MS=1.0 WORKER=NONE REQUEST_ID=REQ-1 ERROR_CODE=\n"
    )


def test_text_and_json_handlers_each_get_their_own_line() -> None:
    json_out = io.StringIO()
    json_handler = logging.StreamHandler(json_out)
    json_handler.setFormatter(JsonFormatter())
    with text_lines(access_log) as (out, _):
        access_log.addHandler(json_handler)
        try:
            log_access("GET", "/health", 200, 0.001, None, "req-1", "")
        finally:
            access_log.removeHandler(json_handler)
    assert out.getvalue().endswith(
        " GET /health 200 status=200 latency_ms=1.0 worker=None request_id=req-1 error_code=\n"
    )
    assert json.loads(json_out.getvalue())["latency_ms"] == 1.0


def test_a_handler_that_is_not_plain_gets_a_record_with_the_fields() -> None:
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    keep = Keep()
    access_log.addHandler(keep)
    access_log.setLevel(logging.INFO)
    try:
        log_access("POST", "/v1/chat/completions", 200, 0.0012345, "http://w:1", "r-1", "")
    finally:
        access_log.removeHandler(keep)
        access_log.setLevel(logging.NOTSET)
    [record] = records
    names = ("status", "latency_ms", "worker", "request_id", "error_code")
    assert {name: getattr(record, name) for name in names} == {
        "status": 200,
        "latency_ms": 1.234,
        "worker": "http://w:1",
        "request_id": "r-1",
        "error_code": "",
    }
    assert (record.levelno, record.name) == (logging.INFO, "shunter.access")


def test_a_stream_that_fails_is_reported_and_the_next_line_is_written() -> None:
    class Broken(io.StringIO):
        def write(self, text: str) -> int:
            raise OSError("disk full")

    reported: list[logging.LogRecord] = []
    with text_lines(access_log) as (out, handler):
        handler.handleError = reported.append  # type: ignore[method-assign,assignment]
        handler.setStream(Broken())
        log_access("GET", "/a", 200, 0.001, None, "req-1", "")
        handler.setStream(out)
        log_access("GET", "/b", 200, 0.001, None, "req-2", "")
    assert [record.getMessage() for record in reported] == ["GET /a 200"]
    assert "GET /b 200" in out.getvalue()
