"""Structured logging on the standard ``logging`` module.

Records carry their context as ``extra`` fields; the text format prints them as
``key=value`` after the message, the JSON format (``--log-json``) as object members.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import sys
import time

# Attributes every LogRecord has; anything else on a record came from ``extra``.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
_SECRET_KEYS = {"authorization", "api_key", "headers"}


def _extras(record: logging.LogRecord) -> dict[str, object]:
    return {
        k: ("<redacted>" if k in _SECRET_KEYS else v)
        for k, v in vars(record).items()
        if k not in _STANDARD
    }


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S")
        self.converter = time.gmtime

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = _extras(record)
        if extras:
            line += " " + " ".join(f"{k}={v}" for k, v in extras.items())
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.created)),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **_extras(record),
        }
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


def setup_logging(
    level: str = "info", log_dir: str | None = None, as_json: bool = False, name: str = "shunter"
) -> None:
    formatter: logging.Formatter = JsonFormatter() if as_json else TextFormatter()
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_dir:
        os.makedirs(log_dir, exist_ok=True)
        handlers.append(
            logging.handlers.TimedRotatingFileHandler(
                os.path.join(log_dir, name), when="midnight", backupCount=7, utc=True
            )
        )
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        handler.setFormatter(formatter)
        root.addHandler(handler)
    level_name = {"warn": "warning"}.get(level.lower(), level.lower())
    logging.getLogger("shunter").setLevel(level_name.upper())
    root.setLevel(logging.WARNING)
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
