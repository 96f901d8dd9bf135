"""The run directory: one folder holding every stage's output, so that any stage can
run alone given the folder the previous stages wrote.

    <run-dir>/
      raw/                 ingest: the raw files, as shipped
      clean/               clean: the cleaned, joined rows (Parquet)
      rejects/             clean: every refused row with source, file, raw record, reason
      quality.json         clean: row reconciliation, rejects by reason
      features/            features: rows with split and PCA vector (Parquet)
      feature_pipeline/    features: the fitted Spark ML PipelineModel
      pca.json             features: k and explained variance
      pca_scree.png        features: scree plot (per-component and cumulative variance, k)
      shards/{train,validation,test}/   shard: Petastorm-readable Parquet
      shards.json          shard: rows and row groups per split
      train/plan.json      train: the shard plan (each rank's rows and batches per epoch)
      train/metrics.jsonl  train: one line per finished epoch, then each rank's throughput
      train/curves.png     train: loss and validation metrics per epoch
      train/mlflow.json    train: the MLflow run it was logged to (only with tracking on)
      model/               train: model.pt (state_dict) + model.json (architecture)
      train.json           train: per-epoch history, per-rank sample accounting
      checkpoints/         train: the latest checkpoints, resumed by a relaunch
      metrics.json         evaluate: test metrics and baselines
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sparknet.errors import RunDirError

SPLITS = ("train", "validation", "test")


def spark_path(path: str | os.PathLike) -> str:
    """A local path as Spark is given it: with its scheme. Spark resolves a bare path on
    its default filesystem, which on a YARN cluster is HDFS, while sparknet's own file
    calls (JSON reports, shard footers, the model) use the local, shared mount."""
    text = str(path)
    return text if "://" in text else "file://" + os.path.abspath(text)


@dataclass(frozen=True)
class RunDir:
    root: Path

    @classmethod
    def at(cls, path: str | os.PathLike) -> "RunDir":
        return cls(Path(path).resolve())

    @property
    def raw(self) -> Path:
        return self.root / "raw"

    @property
    def clean(self) -> Path:
        return self.root / "clean"

    @property
    def rejects(self) -> Path:
        return self.root / "rejects"

    @property
    def quality(self) -> Path:
        return self.root / "quality.json"

    @property
    def features(self) -> Path:
        return self.root / "features"

    @property
    def feature_pipeline(self) -> Path:
        return self.root / "feature_pipeline"

    @property
    def pca(self) -> Path:
        return self.root / "pca.json"

    @property
    def pca_scree(self) -> Path:
        return self.root / "pca_scree.png"

    @property
    def shards(self) -> Path:
        return self.root / "shards"

    def shard(self, split: str) -> Path:
        return self.shards / split

    @property
    def shards_manifest(self) -> Path:
        return self.root / "shards.json"

    @property
    def train_dir(self) -> Path:
        """What training keeps besides the model and its report."""
        return self.root / "train"

    @property
    def shard_plan(self) -> Path:
        return self.train_dir / "plan.json"

    @property
    def checkpoints(self) -> Path:
        """Not among any stage's outputs: a relaunched or rerun train stage resumes from
        them. Each names the config and shards it belongs to; others are removed."""
        return self.root / "checkpoints"

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def train_report(self) -> Path:
        return self.root / "train.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    def outputs(self, stage: str) -> list[Path]:
        """What `stage` writes (ingest's raw/ is left out: users may place raw files there
        themselves)."""
        return {
            "ingest": [],
            "clean": [self.clean, self.rejects, self.quality],
            "features": [self.features, self.feature_pipeline, self.pca, self.pca_scree],
            "shard": [self.shards, self.shards_manifest],
            "train": [self.train_dir, self.model, self.train_report],
            "evaluate": [self.metrics],
        }[stage]

    def clear_from(self, stage: str, order: list[str]) -> list[Path]:
        """Removes the outputs of `stage` and of every stage after it in `order`, so that
        a stage that fails or is killed half way can never leave earlier results for the
        next stage to read as its own. Returns what was removed."""
        removed = []
        for later in order[order.index(stage) :]:
            for path in self.outputs(later):
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
                else:
                    continue
                removed.append(path)
        return removed

    def require(self, path: Path, stage: str) -> Path:
        """Fails with the stage to run first when an input is missing."""
        if not path.exists():
            raise RunDirError(
                f"{path} does not exist: run the '{stage}' stage first "
                f"(jobs/{stage}.py --config CONFIG --run-dir {self.root})"
            )
        return path


def write_json(path: Path, data: Any) -> None:
    """Writes atomically, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())
