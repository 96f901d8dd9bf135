"""Logging: one format for driver and tasks, stage (and rank) in every line."""

import logging
import sys

FORMAT = "%(asctime)s %(levelname)s sparknet[%(stage)s] %(message)s"


class _StageFilter(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.stage = "-"

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "stage"):
            record.stage = self.stage
        return True


_stage_filter = _StageFilter()


def setup_logging(level: int = logging.INFO) -> None:
    root = logging.getLogger("sparknet")
    if any(getattr(h, "_sparknet", False) for h in root.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler._sparknet = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
    handler.addFilter(_stage_filter)
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False
    # py4j logs every gateway call at INFO, and an interrupted or failed call with its
    # traceback, partly through the root logger; the failure itself reaches the user
    # through the exception sparknet reports. Other libraries' root records still show.
    logging.getLogger("py4j").setLevel(logging.CRITICAL)
    root_logger = logging.getLogger()
    if not root_logger.handlers:
        fallback = logging.StreamHandler(sys.stderr)
        fallback.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        fallback.addFilter(lambda record: "py4j" not in record.pathname)
        root_logger.addHandler(fallback)
    # pyspark logs every failed query as a page of JSON before raising it; the
    # exception itself reaches the user once, through sparknet's own message.
    for name in ("DataFrameQueryContextLogger", "SQLQueryContextLogger"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def add_handler(handler: logging.Handler) -> logging.Handler:
    """Adds `handler` to sparknet's loggers with the same format and stage as the
    console's, and on its own: a training rank's records travel to the driver."""
    handler.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
    handler.addFilter(_stage_filter)
    root = logging.getLogger("sparknet")
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    root.propagate = False
    return handler


def set_stage(stage: str) -> None:
    _stage_filter.stage = stage
