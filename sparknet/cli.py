"""Command line shared by every job in jobs/: `--config FILE --run-dir DIR [--master URL]`."""

from __future__ import annotations

import argparse
import datetime
import logging
import time
from collections.abc import Callable, Sequence

from py4j.protocol import Py4JJavaError
from pyspark.errors.exceptions.captured import CapturedException

from sparknet.config import load_config
from sparknet.errors import RunDirError, SparknetError, spark_error_summary
from sparknet.logs import set_stage, setup_logging
from sparknet.run_dir import RunDir
from sparknet.stack import stack_report
from sparknet.tracking import after_stage

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

    def body(sessions: list) -> None:
        config = load_config(args.config)
        if args.run_dir:
            run_dir = RunDir.at(args.run_dir)
        else:
            stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S")
            run_dir = RunDir.at(f"runs/{config.name}-{stamp}")
        if stages[0] == "ingest":
            run_dir.root.mkdir(parents=True, exist_ok=True)
        elif not run_dir.root.is_dir():
            raise RunDirError(
                f"run directory {run_dir.root} does not exist; stage {stages[0]} reads the "
                "outputs of the stages before it there"
            )
        log.info("config %s, run directory %s", args.config, run_dir.root)

        from sparknet.session import spark_session

        spark = spark_session(config, args.master)
        sessions.append(spark)
        log.info("stack: %s", ", ".join(f"{k} {v}" for k, v in stack_report().items()))
        started = time.perf_counter()
        for name in stages:
            set_stage(name)
            stage_started = time.perf_counter()
            if name == "train":
                from sparknet.train.launcher import already_trained

                note = already_trained(config, run_dir)
                if note:
                    log.info("%s", note)
                    continue
            removed = run_dir.clear_from(name, list(STAGES))
            if removed:
                log.info(
                    "removed earlier outputs of this and later stages: %s",
                    ", ".join(p.name for p in removed),
                )
            report = STAGES[name](spark, config, run_dir)
            rows = rows_of(name, report)
            seconds = time.perf_counter() - stage_started
            log.info("done: %sin %.1f s", f"{rows} rows " if rows is not None else "", seconds)
            run_dir.record_timing(name, seconds, list(STAGES))
            # Here, not inside the stages: a stage's outputs are the run directory;
            # tracking copies them elsewhere and is off unless configured.
            after_stage(name, config, run_dir)
        set_stage("-")
        log.info(
            "finished %s in %.1f s; outputs in %s",
            ", ".join(stages),
            time.perf_counter() - started,
            run_dir.root,
        )

    return guarded(body)


def guarded(body: Callable[[list], None]) -> int:
    """Runs a job's body and turns its failure into an exit code and one log line; stops
    the Spark sessions the body appended to its argument."""
    sessions: list = []
    try:
        body(sessions)
        return 0
    except SparknetError as exc:
        log.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        log.error("interrupted; the stage's outputs may be incomplete: rerun it")
        return 130
    except (CapturedException, Py4JJavaError) as exc:
        # A Spark failure that sparknet did not foresee: its error class and message
        # name the cause; the JVM stack would bury them.
        log.error("Spark failed: %s", spark_error_summary(exc, lines=3))
        log.debug("Spark failure", exc_info=True)
        return 1
    finally:
        for spark in sessions:
            try:
                spark.stop()
            except Exception:  # the gateway may be gone after an interrupt
                log.debug("spark.stop() failed", exc_info=True)
