"""The access log's line, written once per request: its text, and what its making skips."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager

from shunter.api.middleware import access_log, log_access
from shunter.observability.logging import InfoLines, JsonFormatter, TextFormatter


@contextmanager
def text_lines(
    logger: logging.Logger,
) -> Iterator[tuple[io.StringIO, logging.StreamHandler[io.StringIO]]]:
    """``logger`` at INFO writing text lines to the yielded buffer through the yielded
    handler, as the gateway's own handlers do; undone after."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(TextFormatter())
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield out, handler
    finally:
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
    try:
        for handler in (plain, not_plain):
            access_log.addHandler(handler)
            log_access("POST", "/v1/x\n", 502, 0.0021, None, "req-9", "upstream_unavailable")
            access_log.removeHandler(handler)
    finally:
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
