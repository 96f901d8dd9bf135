"""Logging: one format for the driver and the training ranks.

    2026-12-05T10:15:02.123Z INFO [stage=train rank=1] sparknet.train.worker: ...

UTC time in ISO 8601 (a cluster's hosts need not share a time zone), level, the stage
and the torch rank (`-` on the driver), the module's logger, the message. Every module
logs through `logging.getLogger(__name__)`, below the `sparknet` logger that this
configures. A training rank sends its records to the driver over its event connection
(sparknet/train/events.py), which logs them again with the rank's number, so the
driver's log (the one spark-submit and Airflow keep) holds every rank's lines too.
"""

from __future__ import annotations

import datetime
import logging
import sys

FORMAT = "%(asctime)s %(levelname)s [stage=%(stage)s rank=%(rank)s] %(name)s: %(message)s"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class _Context(logging.Filter):
    """Stamps each record with the stage and rank of this process, unless the record
    already carries them (a rank's record logged again on the driver)."""

    def __init__(self) -> None:
        super().__init__()
        self.stage = "-"
        self.rank = "-"

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "stage"):
            record.stage = self.stage
        if not hasattr(record, "rank"):
            record.rank = self.rank
        return True


class _Formatter(logging.Formatter):
    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        moment = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


_context = _Context()


def formatter() -> logging.Formatter:
    return _Formatter(FORMAT)


def setup_logging(level: int | str = logging.INFO) -> None:
    """Sends sparknet's records to stderr in FORMAT; a second call only sets the level."""
    root = logging.getLogger("sparknet")
    root.setLevel(level)
    if any(getattr(h, "_sparknet", False) for h in root.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler._sparknet = True  # type: ignore[attr-defined]
    handler.setFormatter(formatter())
    handler.addFilter(_context)
    root.addHandler(handler)
    root.propagate = False
    # py4j logs every gateway call at INFO, and an interrupted or failed call with its
    # traceback, partly through the root logger; the failure itself reaches the user
    # through the exception sparknet reports. Other libraries' root records still show.
    logging.getLogger("py4j").setLevel(logging.CRITICAL)
    root_logger = logging.getLogger()
    if not root_logger.handlers:
        # Other libraries' records, and Python warnings (scikit-learn's, pyarrow's), in
        # the same format, with the stage they happened in.
        fallback = logging.StreamHandler(sys.stderr)
        fallback.setFormatter(formatter())
        fallback.addFilter(_context)
        fallback.addFilter(lambda record: "py4j" not in record.pathname)
        root_logger.addHandler(fallback)
        logging.captureWarnings(True)
    # pyspark logs every failed query as a page of JSON before raising it; the
    # exception itself reaches the user once, through sparknet's own message.
    for name in ("DataFrameQueryContextLogger", "SQLQueryContextLogger"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def add_handler(handler: logging.Handler) -> logging.Handler:
    """Adds `handler` to sparknet's loggers with the same format, stage and rank as the
    console's, and on its own: a training rank's records travel to the driver."""
    handler.setFormatter(formatter())
    handler.addFilter(_context)
    root = logging.getLogger("sparknet")
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    root.propagate = False
    return handler


def set_stage(stage: str) -> None:
    _context.stage = stage


def set_rank(rank: int | str) -> None:
    """This process's torch rank; `-` for the driver and every other process."""
    _context.rank = str(rank)
