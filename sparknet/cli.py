"""Command line shared by every job in jobs/: `--config FILE --run-dir DIR [--master URL]`."""

from __future__ import annotations

import argparse
import datetime
import logging
import time
from collections.abc import Sequence

from sparknet.config import load_config
from sparknet.errors import SparknetError
from sparknet.logs import set_stage, setup_logging
from sparknet.run_dir import RunDir
from sparknet.stack import stack_report

log = logging.getLogger("sparknet")


def parse_args(stages: Sequence[str], argv: Sequence[str] | None) -> argparse.Namespace:
    whole = len(stages) > 1
    parser = argparse.ArgumentParser(
        description="sparknet: run "
        + (f"the stages {', '.join(stages)}" if whole else f"the {stages[0]} stage"),
    )
    parser.add_argument("--config", required=True, help="dataset YAML, e.g. conf/flights.yaml")
    parser.add_argument(
        "--run-dir",
        required=not whole,
        help="folder holding every stage's output"
        + (" (default: runs/<config name>-<UTC time>)" if whole else ""),
    )
    parser.add_argument(
        "--master",
        help="Spark master when not launched by spark-submit (default: the config's spark.master)",
    )
    return parser.parse_args(argv)


def main(stages: Sequence[str], argv: Sequence[str] | None = None) -> int:
    from sparknet.stages import STAGES, rows_of

    args = parse_args(stages, argv)
    setup_logging()
    spark = None
    try:
        config = load_config(args.config)
        if args.run_dir:
            run_dir = RunDir.at(args.run_dir)
        else:
            stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S")
            run_dir = RunDir.at(f"runs/{config.name}-{stamp}")
        run_dir.root.mkdir(parents=True, exist_ok=True)
        log.info("config %s, run directory %s", args.config, run_dir.root)

        from sparknet.session import spark_session

        spark = spark_session(config, args.master)
        log.info("stack: %s", ", ".join(f"{k} {v}" for k, v in stack_report().items()))
        started = time.perf_counter()
        for name in stages:
            set_stage(name)
            stage_started = time.perf_counter()
            report = STAGES[name](spark, config, run_dir)
            log.info(
                "done: %d rows in %.1f s",
                rows_of(name, report),
                time.perf_counter() - stage_started,
            )
        set_stage("-")
        log.info(
            "finished %s in %.1f s; outputs in %s",
            ", ".join(stages),
            time.perf_counter() - started,
            run_dir.root,
        )
        return 0
    except SparknetError as exc:
        log.error("%s", exc)
        return 2
    finally:
        if spark is not None:
            spark.stop()
