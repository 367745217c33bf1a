"""The access log's line, written once per request: its text, and what its making skips."""

from __future__ import annotations

import io
import logging
import re

from shunter.api.middleware import access_log, log_access
from shunter.observability.logging import TextFormatter


def logged(*lines: tuple[str, str]) -> list[str]:
    """The text lines ``log_access`` writes for (path, worker) pairs."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(TextFormatter())
    access_log.addHandler(handler)
    access_log.setLevel(logging.INFO)
    try:
        for path, worker in lines:
            log_access("POST", path, 200, 0.0012345, worker, "chatcmpl-1", "")
    finally:
        access_log.removeHandler(handler)
        access_log.setLevel(logging.NOTSET)
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
