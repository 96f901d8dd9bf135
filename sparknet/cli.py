"""Command line shared by every job in jobs/:

    --config FILE --run-dir DIR [--set KEY=VALUE ...] [--force [STAGE ...]]
    [--master URL] [--log-level LEVEL]

Each stage is skipped when its committed outputs already belong to this config and
these inputs, and otherwise recomputed and committed atomically (sparknet/status.py).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from py4j.protocol import Py4JJavaError
from pyspark.errors.exceptions.captured import CapturedException

from sparknet import status
from sparknet.config import Config, config_yaml, load_config
from sparknet.errors import RunDirError, SparknetError, spark_error_summary, sparknet_error_in
from sparknet.logs import LEVELS, set_stage, setup_logging
from sparknet.run_dir import RunDir
from sparknet.stack import stack_report

log = logging.getLogger(__name__)


def add_common_options(parser: argparse.ArgumentParser, set_note: str = "") -> None:
    """--set, --master and --log-level, the same in every job (jobs/predict.py too)."""
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.epochs=3 or --set 'train.hidden=[64, 32]' "
        "(repeatable; the value is read as YAML)" + set_note,
    )
    parser.add_argument(
        "--master",
        help="Spark master when not launched by spark-submit (default: the config's spark.master)",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=LEVELS,
        help="sparknet's log level (Spark's own is the config's spark.log_level)",
    )


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
        "--force",
        nargs="*",
        metavar="STAGE",
        help="recompute these stages (default: every stage this job runs) even when their "
        "outputs are up to date",
    )
    add_common_options(parser)
    args = parser.parse_args(argv)
    if args.force is not None:
        unknown = [s for s in args.force if s not in stages]
        if unknown:
            parser.error(f"--force {' '.join(unknown)}: this job runs {', '.join(stages)}")
        args.force = set(args.force or stages)
    else:
        args.force = set()
    return args


def main(stages: Sequence[str], argv: Sequence[str] | None = None) -> int:
    args = parse_args(stages, argv)
    setup_logging(args.log_level)

    def body(sessions: list) -> None:
        from sparknet.stages import STAGES

        config = load_config(args.config, args.set)
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
        # Released by guarded() after Spark has stopped: a failed stage's tasks may
        # write into its staging folder until then.
        sessions.append(run_dir.lock(" ".join([Path(sys.argv[0]).name, *sys.argv[1:]])))
        save_config(run_dir, config)
        log.info(
            "config %s%s (effective config in %s), run directory %s",
            args.config,
            "".join(f" --set {item}" for item in args.set),
            run_dir.config.name,
            run_dir.root,
        )
        log.info("stack: %s", ", ".join(f"{k} {v}" for k, v in stack_report().items()))

        @functools.cache
        def spark():
            # Started for the first stage that needs it: a run whose stages are all up
            # to date does not wait for Spark.
            from sparknet.session import spark_session

            session = spark_session(config, args.master)
            sessions.append(session)
            return session

        started = time.perf_counter()
        run_stages(STAGES, stages, config, run_dir, spark, args.force)
        log.info(
            "finished %s in %.1f s; outputs in %s",
            ", ".join(stages),
            time.perf_counter() - started,
            run_dir.root,
        )

    return guarded(body)


def save_config(run_dir: RunDir, config: Config) -> None:
    tmp = run_dir.config.with_suffix(".yaml.tmp")
    tmp.write_text(
        f"# The effective config of the latest command run here ({config.path} and its "
        f"--set overrides).\n{config_yaml(config)}"
    )
    tmp.replace(run_dir.config)


def run_stages(
    table: dict,
    names: Sequence[str],
    config: Config,
    run_dir: RunDir,
    spark: Callable[[], object],
    force: set[str] = frozenset(),
) -> None:
    """Runs `names` in order: each is skipped when up to date, else recomputed in its
    staging folder and committed. `table` maps stage names to sparknet.stages.Stage."""
    from sparknet.stages import rows_of
    from sparknet.tracking import after_stage

    order = list(table)
    try:
        for name in names:
            stage = table[name]
            set_stage(name)
            status.check_inputs(table, stage, config, run_dir)
            decision = status.decide(stage, config, run_dir, forced=name in force)
            if not decision.run:
                status.remove_leftovers(run_dir, name)
                log.info("skipped: %s", decision.reason)
                continue
            log.info("running: %s", decision.reason)
            inputs = status.current_inputs(stage, config, run_dir)
            started_at, started = status.now_utc(), time.perf_counter()
            staged, replacing = status.begin(run_dir, stage)
            if stage.before_recompute is not None:
                stage.before_recompute(run_dir, replacing, name in force)
            report = stage(spark() if stage.spark else None, config, staged)
            # Here, not inside the stages: a stage's outputs are the run directory;
            # tracking copies them elsewhere and is off unless configured.
            after_stage(name, config, staged)
            rows = rows_of(name, report)
            seconds = time.perf_counter() - started
            committed = status.commit(
                run_dir,
                status.record(stage, config, inputs, started_at, seconds, rows, name in force),
            )
            run_dir.record_timing(name, seconds, order)
            log.info(
                "done: %sin %.1f s; committed %s",
                f"{rows} rows " if rows is not None else "",
                seconds,
                ", ".join(committed) or "nothing",
            )
    except BaseException:
        if run_dir.staging(name).exists():
            log.info(
                "what %s wrote is in %s until it runs again; finished stages are kept: the "
                "same command with --run-dir %s continues from %s",
                name,
                run_dir.staging(name),
                run_dir.root,
                name,
            )
        raise
    finally:
        set_stage("-")


def guarded(body: Callable[[list], None]) -> int:
    """Runs a job's body and turns its failure into an exit code and one log line; stops
    what the body appended to its argument (Spark sessions, a run directory's lock: each
    has `stop()`), the last appended first."""
    sessions: list = []
    try:
        body(sessions)
        return 0
    except SparknetError as exc:
        log.error("%s", exc)
        log.debug("traceback", exc_info=True)
        return 2
    except KeyboardInterrupt:
        log.error("interrupted; finished stages are kept, the interrupted one starts over")
        return 130
    except (CapturedException, Py4JJavaError) as exc:
        expected = sparknet_error_in(exc)
        if expected:
            # Raised on purpose inside a Spark task: as plain as on the driver.
            log.error("%s", expected)
            log.debug("Spark failure", exc_info=True)
            return 2
        # A Spark failure that sparknet did not foresee: its error class and message
        # name the cause; the JVM stack would bury them.
        log.error("Spark failed: %s", spark_error_summary(exc, lines=3))
        log.debug("Spark failure", exc_info=True)
        return 1
    finally:
        for spark in reversed(sessions):
            try:
                spark.stop()
            except Exception:  # the gateway may be gone after an interrupt
                log.debug("spark.stop() failed", exc_info=True)
