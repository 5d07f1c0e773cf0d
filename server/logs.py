"""Logging for both processes (the front-end and the engine): plain lines or one JSON object per line,
with the id of the request being served where there is one."""

from __future__ import annotations

import contextvars
import json
import logging

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request id, and any structured extras."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"), "level": record.levelname.lower(),
               "logger": record.name, "message": record.getMessage(), "request_id": request_id_var.get()}
        if hasattr(record, "http"):
            out.update(record.http)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def setup_logging(level: str, fmt: str) -> None:
    """`fmt` "json" or "text", as --log-format says."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonLogFormatter() if fmt == "json"
                         else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
