"""The stages in pipeline order. Each reads the previous stages' output from the run
directory, writes its own, and returns a report whose row count goes to the log."""

from __future__ import annotations

from collections.abc import Callable

from pyspark.sql import SparkSession

from sparknet.clean import clean
from sparknet.config import Config
from sparknet.evaluate import evaluate
from sparknet.export import export
from sparknet.features import fit_and_project
from sparknet.ingest import ingest
from sparknet.run_dir import RunDir
from sparknet.shard import shard
from sparknet.train.launcher import train

Stage = Callable[[SparkSession, Config, RunDir], dict]

STAGES: dict[str, Stage] = {
    "ingest": lambda spark, config, run_dir: ingest(config, run_dir),
    "clean": clean,
    "features": fit_and_project,
    "shard": shard,
    "train": train,
    "evaluate": evaluate,
    "export": export,
}


def rows_of(stage: str, report: dict) -> int | None:
    """The number of rows a stage produced, for the log line (ingest copies files,
    export writes the artifact)."""
    if stage in ("ingest", "export"):
        return None
    if stage == "clean":
        return report["clean"]
    if stage == "features":
        return sum(report["rows_by_split"].values())
    if stage == "shard":
        return sum(s["rows"] for s in report["splits"].values())
    if stage == "train":
        return report["train_rows"]
    return report["rows"]
