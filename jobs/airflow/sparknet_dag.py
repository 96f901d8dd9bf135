"""sparknet's pipeline as an Airflow DAG: one SparkSubmitOperator per stage, each
running `jobs/<stage>.py --config CONFIG --run-dir RUN_DIR` in sparknet's own venv.

This file is parsed by Airflow's interpreter, which has neither sparknet nor torch (nor
Spark itself: the Spark provider brings only the Spark Connect client): it imports only
Airflow. Every stage clears its own earlier outputs before it writes,
so a retried task starts clean; the train stage keeps its checkpoints and a retry
resumes from the latest one (a finished training is not redone).

Set where Airflow parses the DAG (scheduler, DAG processor, workers alike):
  SPARKNET_HOME            the sparknet checkout (default: the one holding this file)
  SPARKNET_PYTHON          sparknet's interpreter (default: $SPARKNET_HOME/.venv/bin/python);
                           runs the Spark driver and the executors' Python workers, and its
                           folder's spark-submit submits
  SPARKNET_RUNS            where run directories go (default: $SPARKNET_HOME/runs/airflow)
  SPARKNET_SPARK_CONN_ID   the Spark connection: its master (default: spark_default)
  SPARKNET_DRIVER_MEMORY   spark-submit's --driver-memory (default: 4g, what the jobs
                           ask for when not under spark-submit; the config's
                           spark.driver.memory comes too late there: the JVM is up)
  SPARKNET_SPARK_CONF      more Spark settings for every stage, a JSON object, e.g.
                           '{"spark.executor.memory": "8g"}'
  SPARKNET_RETRIES         retries of a failed stage (default: 2)
  SPARKNET_RETRY_DELAY_S   seconds before a retry (default: 60)

Params of a DAG run (trigger with conf):
  config    the dataset YAML, absolute or relative to SPARKNET_HOME
  run_dir   the run directory; empty: $SPARKNET_RUNS/<run id>, the same for every
            task and every retry of one DAG run
"""

from __future__ import annotations

import json
import os
import re
from datetime import timedelta
from pathlib import Path

from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator
from airflow.sdk import DAG, Param

# In sparknet.stages.STAGES order; tests/test_airflow.py checks that they agree.
STAGES = ("ingest", "clean", "features", "shard", "train", "evaluate", "export")

DAG_ID = "sparknet"

HOME = Path(os.environ.get("SPARKNET_HOME") or Path(__file__).resolve().parents[2])
PYTHON = os.environ.get("SPARKNET_PYTHON") or str(HOME / ".venv" / "bin" / "python")
RUNS = Path(os.environ.get("SPARKNET_RUNS") or HOME / "runs" / "airflow")
SPARK_CONN_ID = os.environ.get("SPARKNET_SPARK_CONN_ID") or "spark_default"
DRIVER_MEMORY = os.environ.get("SPARKNET_DRIVER_MEMORY") or "4g"


def _setting(name: str, default, parse):
    """An environment setting, or an import error that names it."""
    text = os.environ.get(name)
    if not text:
        return default
    try:
        return parse(text)
    except ValueError as exc:
        raise ValueError(f"{name}={text!r}: {exc}") from None


def _spark_conf(text: str) -> dict[str, str]:
    conf = json.loads(text)
    if not isinstance(conf, dict):
        raise ValueError("expected a JSON object of Spark settings")
    return {str(key): str(value) for key, value in conf.items()}


def _count(text: str) -> int:
    if int(text) < 0:
        raise ValueError("expected a count >= 0")
    return int(text)


def _seconds(text: str) -> float:
    if not float(text) >= 0:
        raise ValueError("expected seconds >= 0")
    return float(text)


SPARK_CONF = _setting("SPARKNET_SPARK_CONF", {}, _spark_conf)
RETRIES = _setting("SPARKNET_RETRIES", 2, _count)
RETRY_DELAY_S = _setting("SPARKNET_RETRY_DELAY_S", 60.0, _seconds)

# A run id such as `manual__2026-12-04T10:00:00+00:00` becomes one plain folder name.
UNSAFE_IN_FOLDER_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def sparknet_path(path: str) -> str:
    """An absolute path: spark-submit runs in the Airflow worker's folder, not in HOME."""
    return str((HOME / path).resolve()) if path else ""


def sparknet_run_dir(requested: str, run_id: str) -> str:
    if requested:
        return sparknet_path(requested)
    return str(RUNS / UNSAFE_IN_FOLDER_NAME.sub("_", run_id))


with DAG(
    dag_id=DAG_ID,
    description="sparknet: " + " -> ".join(STAGES),
    schedule=None,
    catchup=False,
    params={
        "config": Param(
            "conf/flights.yaml",
            type="string",
            minLength=1,
            description="dataset YAML, absolute or relative to SPARKNET_HOME",
        ),
        "run_dir": Param(
            "",
            type="string",
            description="run directory; empty: SPARKNET_RUNS/<run id>",
        ),
    },
    user_defined_macros={
        "sparknet_path": sparknet_path,
        "sparknet_run_dir": sparknet_run_dir,
    },
    default_args={
        "retries": RETRIES,
        "retry_delay": timedelta(seconds=RETRY_DELAY_S),
    },
    tags=["sparknet"],
) as dag:
    # Executors and the driver must run sparknet's interpreter (the one with torch and
    # sparknet); spark-submit is taken from its folder through PATH, which is where the
    # Spark provider looks for it.
    python_env = {
        "PYSPARK_PYTHON": PYTHON,
        "PYSPARK_DRIVER_PYTHON": PYTHON,
        "PATH": os.pathsep.join([str(Path(PYTHON).parent), os.environ.get("PATH", os.defpath)]),
    }
    previous = None
    for stage in STAGES:
        task = SparkSubmitOperator(
            task_id=stage,
            conn_id=SPARK_CONN_ID,
            application=str(HOME / "jobs" / f"{stage}.py"),
            name=f"sparknet-{stage}",
            application_args=[
                "--config",
                "{{ sparknet_path(params.config) }}",
                "--run-dir",
                "{{ sparknet_run_dir(params.run_dir, run_id) }}",
            ],
            conf={
                "spark.pyspark.python": PYTHON,
                "spark.pyspark.driver.python": PYTHON,
                # From the start: sparknet lowers it too, but only once its session is up,
                # after some forty lines of Spark's start-up chatter in every task's log.
                "spark.log.level": "WARN",
                **SPARK_CONF,
            },
            driver_memory=DRIVER_MEMORY,
            env_vars=python_env,
        )
        if previous is not None:
            previous >> task
        previous = task
