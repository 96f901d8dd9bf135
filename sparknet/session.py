"""The SparkSession every job uses.

Run as `python jobs/X.py`, the job starts its own Spark in the config's master
(local[2] by default). Run under `spark-submit`, the master and resources come from
spark-submit and the config's `spark.master` is ignored.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

from pyspark.sql import SparkSession

from sparknet.config import Config

log = logging.getLogger(__name__)

# Settings sparknet relies on; a user's config may override any of them.
DEFAULT_CONF = {
    # Count and reject rows the same whichever columns a query reads.
    "spark.sql.csv.parser.columnPruning.enabled": "false",
    "spark.sql.execution.arrow.pyspark.enabled": "true",
    "spark.sql.session.timeZone": "UTC",
    "spark.driver.memory": "4g",
    "spark.sql.shuffle.partitions": "8",
    # Progress bars garble logs captured by Airflow and spark-submit.
    "spark.ui.showConsoleProgress": "false",
    # Wide feature tables otherwise warn that plan strings were truncated.
    "spark.sql.debug.maxToStringFields": "1000",
    # Parquet writes commit through a temp folder; no _SUCCESS marker to confuse readers.
    "spark.hadoop.mapreduce.fileoutputcommitter.marksuccessfuljobs": "false",
}


def under_spark_submit() -> bool:
    # spark-submit starts the JVM first and hands the Python driver its gateway.
    return "PYSPARK_GATEWAY_PORT" in os.environ


def spark_session(config: Config, master: str | None = None) -> SparkSession:
    # Executors must run this interpreter: the system python3 lacks torch and sparknet.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    # Python workers inherit this: petastorm's threads and pyspark's daemon leave files
    # to the garbage collector, and pyarrow 12's legacy API warns on every call.
    os.environ.setdefault("PYTHONWARNINGS", "ignore::ResourceWarning,ignore::FutureWarning")

    builder = SparkSession.builder.appName(f"sparknet-{config.name}")
    if master:
        builder = builder.master(master)
    elif not under_spark_submit():
        builder = builder.master(config.spark.master)
    for key, value in {**DEFAULT_CONF, **config.spark.conf}.items():
        builder = builder.config(key, value)

    spark = builder.getOrCreate()
    if threading.current_thread() is threading.main_thread():
        # PySpark's own SIGINT handler calls into the JVM while the main thread may be
        # blocked in another JVM call, and py4j fails with a "reentrant call" error that
        # hides the interrupt. Raise it plainly; spark.stop() then cancels the jobs.
        signal.signal(signal.SIGINT, signal.default_int_handler)
    spark.sparkContext.setLogLevel(config.spark.log_level)
    # A failed task is reported once, by sparknet, as its error class and message; Spark
    # would also log the task's whole JVM stack twice (executor and scheduler).
    jvm = spark.sparkContext._jvm
    configurator = jvm.org.apache.logging.log4j.core.config.Configurator
    level = jvm.org.apache.logging.log4j.Level
    configurator.setLevel("org.apache.spark.executor.Executor", level.FATAL)
    configurator.setLevel("org.apache.spark.scheduler.TaskSetManager", level.FATAL)
    log.info(
        "spark %s, master %s, default parallelism %d",
        spark.version,
        spark.sparkContext.master,
        spark.sparkContext.defaultParallelism,
    )
    return spark
