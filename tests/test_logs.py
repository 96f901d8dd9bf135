"""One log format for driver and ranks; an expected error is one line, never a trace."""

import io
import logging
import time

import pytest

from conftest import LOG_LINE
from sparknet import logs
from sparknet.cli import guarded
from sparknet.errors import ConfigError, DataError
from sparknet.train.events import EventClient, EventServer


@pytest.fixture()
def console():
    """sparknet's console logging as a job sets it up, writing to a buffer; undone
    afterwards (other tests read records through pytest's handler on the root logger)."""
    root = logging.getLogger("sparknet")
    saved = (list(root.handlers), root.level, root.propagate)
    logs.setup_logging()
    buffer = io.StringIO()
    (handler,) = [h for h in root.handlers if getattr(h, "_sparknet", False)]
    handler.setStream(buffer)
    yield buffer.getvalue
    root.handlers[:], root.level, root.propagate = saved
    logs.set_stage("-")
    logs.set_rank("-")


def test_every_line_has_utc_time_stage_rank_and_module(console):
    logs.set_stage("clean")
    logging.getLogger("sparknet.clean").info("344 rows in")
    (line,) = console().splitlines()
    match = LOG_LINE.match(line)
    assert match, line
    stamp, level, stage, rank, logger, message = match.groups()
    assert (level, stage, rank, logger, message) == (
        "INFO",
        "clean",
        "-",
        "sparknet.clean",
        "344 rows in",
    )
    # ISO 8601 in UTC: within a few seconds of now.
    parsed = time.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S")
    assert abs(time.mktime(parsed) - time.mktime(time.gmtime())) < 60


def test_a_rank_s_lines_reach_the_driver_log_with_its_rank(console):
    logs.set_stage("train")
    with EventServer("127.0.0.1", world_size=2) as server:
        client = EventClient(server.address, server.token, rank=1, timeout_s=10)
        # The handler a rank's process logs through (worker.run_rank); fed records
        # directly here, since driver and rank share this process.
        forward = client.handler()
        record = logging.LogRecord(
            "sparknet.train.worker", logging.INFO, __file__, 1, "resumed at %s", ("epoch 2",), None
        )
        forward.handle(record)
        record = logging.LogRecord(
            "sparknet.train.checkpoint", logging.WARNING, __file__, 1, "disk full", (), None
        )
        forward.handle(record)
        client.close(done=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not (1 in server.ranks and server.ranks[1].done):
            time.sleep(0.05)
    lines = [LOG_LINE.match(line).groups()[1:] for line in console().splitlines()]
    assert ("INFO", "train", "1", "sparknet.train.worker", "resumed at epoch 2") in lines
    assert ("WARNING", "train", "1", "sparknet.train.checkpoint", "disk full") in lines


def test_an_expected_error_is_one_line_and_exit_code_2(console):
    def body(sessions):
        raise ConfigError("conf/x.yaml: train.epochs: must be > 0, got 0")

    assert guarded(body) == 2
    (line,) = console().splitlines()
    assert line.endswith(
        "ERROR [stage=- rank=-] sparknet.cli: conf/x.yaml: train.epochs: must be > 0, got 0"
    )


def test_an_expected_error_raised_in_a_spark_task_is_one_line_too(spark, console):
    def refuse(batches):
        for _ in batches:
            raise DataError("predict: column 'distance' holds text in row 3")
        yield from ()

    def body(sessions):
        spark.range(4, numPartitions=1).mapInPandas(refuse, "id long").collect()

    assert guarded(body) == 2
    err = console()
    (line,) = err.splitlines()
    assert line.endswith("sparknet.cli: predict: column 'distance' holds text in row 3")
    assert "Traceback" not in err


def test_an_unforeseen_spark_failure_is_summarised_with_exit_code_1(spark, console):
    def body(sessions):
        spark.sql("SELECT 1 / 0").collect()

    assert guarded(body) == 1
    (line,) = console().splitlines()
    assert "sparknet.cli: Spark failed: [DIVIDE_BY_ZERO]" in line
