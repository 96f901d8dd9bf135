"""The stages in pipeline order: what each runs, what it reads, what its outputs
depend on.

Each stage reads earlier stages' committed outputs from the run directory, writes its
own, and returns a report whose row count goes to the log. The declarations decide
when the command line recomputes a stage and when it may skip it (sparknet/status.py):
a stage is recomputed when a config key in `depends_on` changed, when a stage in
`inputs` was recomputed, or (`reads_raw`) when the raw source files changed. A key it
reads that changes how it runs but not what it writes is `operational`; the tests
check that every key a stage reads is one or the other.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass

from pyspark.sql import SparkSession

from sparknet.clean import clean
from sparknet.config import Config, TrainConfig
from sparknet.evaluate import evaluate
from sparknet.export import export
from sparknet.features import fit_and_project
from sparknet.ingest import ingest
from sparknet.run_dir import RunDir
from sparknet.shard import shard
from sparknet.train.launcher import LAUNCH_SETTINGS, train

log = logging.getLogger(__name__)

StageFn = Callable[[SparkSession, Config, RunDir], dict]


@dataclass(frozen=True)
class Stage:
    name: str
    run: StageFn
    inputs: tuple[str, ...] = ()  # stages whose committed outputs it reads
    depends_on: tuple[str, ...] = ()  # config sections or dotted keys
    operational: tuple[str, ...] = ()
    reads_raw: bool = False  # the source files under raw/ (or absolute paths)
    spark: bool = True
    # Called before the stage recomputes: (committed view, a finished run is being
    # replaced, --force).
    before_recompute: Callable[[RunDir, bool, bool], None] | None = None

    def __call__(self, spark: SparkSession | None, config: Config, run_dir: RunDir) -> dict:
        return self.run(spark, config, run_dir)


def _clear_checkpoints(run_dir: RunDir, replacing: bool, forced: bool) -> None:
    """Checkpoints outlive a failed train stage, so that rerunning it resumes. When a
    finished training is replaced (its config, its shards or its worker count changed)
    or --force asks for a new one, they belong to the old training: a checkpoint of the
    same config and shards taken at its last epoch would otherwise end the new one at
    once with the old weights."""
    if (replacing or forced) and run_dir.checkpoints.exists():
        shutil.rmtree(run_dir.checkpoints)
        log.info("removed %s: they belong to the training being replaced", run_dir.checkpoints)


TRAINING = tuple(
    f"train.{f.name}" for f in dataclasses.fields(TrainConfig) if f.name not in LAUNCH_SETTINGS
)
# Everything but where the config was read from.
WHOLE_CONFIG = tuple(f.name for f in dataclasses.fields(Config) if f.name != "path")

STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in (
        Stage(
            "ingest",
            lambda spark, config, run_dir: ingest(config, run_dir),
            depends_on=("ingest",),
            spark=False,
        ),
        Stage("clean", clean, depends_on=("sources", "main", "joins", "label"), reads_raw=True),
        Stage(
            "features",
            fit_and_project,
            inputs=("clean",),
            depends_on=("sources", "main", "joins", "label", "features", "pca", "split"),
        ),
        Stage(
            "shard",
            shard,
            inputs=("features",),
            depends_on=("label", "split", "shard"),
            # Only checked: every split must hold a row per rank.
            operational=("train.workers",),
        ),
        Stage(
            "train",
            train,
            inputs=("shard",),
            # The worker count changes the model (a step averages workers x batch_size
            # rows), though a checkpoint may be resumed with another one.
            depends_on=("label", *TRAINING, "train.workers"),
            operational=tuple(f"train.{key}" for key in LAUNCH_SETTINGS if key != "workers"),
            before_recompute=_clear_checkpoints,
        ),
        Stage(
            "evaluate",
            evaluate,
            # The report also shows the clean and features stages' quality and PCA.
            inputs=("clean", "features", "shard", "train"),
            # train.seed: the comparison models' train sample.
            depends_on=("name", "label", "evaluate", "train.seed"),
        ),
        Stage(
            "export",
            export,
            # The card holds the test metrics; the lookups are cleaned from raw/ again.
            inputs=("features", "train", "evaluate"),
            # The artifact holds the whole config.
            depends_on=WHOLE_CONFIG,
            reads_raw=True,
        ),
    )
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
