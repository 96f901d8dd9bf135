"""The run directory: one folder holding every stage's output, so that any stage can
run alone given the folder the previous stages wrote.

    <run-dir>/
      raw/                 ingest: the raw files, as shipped
      clean/               clean: the cleaned, joined rows (Parquet)
      rejects/             clean: every refused row with source, file, raw record, reason
      quality.json         clean: row reconciliation, rejects by reason, column profile
      features/            features: rows with split and PCA vector (Parquet)
      feature_pipeline/    features: the fitted Spark ML PipelineModel
      feature_quality.json features: per feature its fill, clip, encoding and rows filled
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
      checkpoints/         train: the latest checkpoints, resumed by a relaunch or a rerun
      metrics.json         evaluate: test metrics, calibration, the comparison table
      report.html          evaluate: the run on one self-contained page (images inline)
      artifact/            export: everything scoring needs (see sparknet/export.py)
      config.yaml          the command line: the effective config of its latest run
      timings.json         the command line: seconds per stage, from each stage's last run
      _status/<stage>.json the command line: written last when a stage commits
      _staging/<stage>/    the command line: where a running stage writes its outputs
      _lock                the command line: held by the command running here (who)

Run through the command line (sparknet/status.py), a stage writes its outputs under
_staging/<stage>/ (a RunDir `staged` for it maps them there and everything else to the
committed files) and they are renamed into place only when it succeeds.
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
STATUS_DIR = "_status"
LOCK_FILE = "_lock"
STAGING_DIR = "_staging"

# What each stage writes, relative to the run directory. ingest's raw/ is merged file
# by file: users may place raw files there themselves.
OUTPUTS: dict[str, tuple[str, ...]] = {
    "ingest": ("raw",),
    "clean": ("clean", "rejects", "quality.json"),
    "features": (
        "features",
        "feature_pipeline",
        "feature_quality.json",
        "pca.json",
        "pca_scree.png",
    ),
    "shard": ("shards", "shards.json"),
    "train": ("train", "model", "train.json"),
    "evaluate": ("metrics.json", "report.html"),
    "export": ("artifact",),
}


def spark_path(path: str | os.PathLike) -> str:
    """A local path as Spark is given it: with its scheme. Spark resolves a bare path on
    its default filesystem, which on a YARN cluster is HDFS, while sparknet's own file
    calls (JSON reports, shard footers, the model) use the local, shared mount."""
    text = str(path)
    return text if "://" in text else "file://" + os.path.abspath(text)


@dataclass(frozen=True)
class RunDir:
    root: Path
    # Set while a stage runs through the command line: that stage's outputs resolve
    # under _staging/<stage>/, every other path to the committed files.
    stage: str | None = None

    @classmethod
    def at(cls, path: str | os.PathLike) -> RunDir:
        return cls(Path(path).resolve())

    def staged(self, stage: str) -> RunDir:
        return RunDir(self.root, stage)

    def staging(self, stage: str) -> Path:
        return self.root / STAGING_DIR / stage

    def status(self, stage: str) -> Path:
        return self.root / STATUS_DIR / f"{stage}.json"

    def _out(self, name: str) -> Path:
        if self.stage is not None and name in OUTPUTS[self.stage]:
            return self.staging(self.stage) / name
        return self.root / name

    def committed(self, path: Path) -> Path:
        """Where `path`, possibly under this stage's staging folder, lands once the stage
        commits: for records and messages that outlive the run."""
        if self.stage is None:
            return path
        try:
            return self.root / path.relative_to(self.staging(self.stage))
        except ValueError:
            return path

    @property
    def raw(self) -> Path:
        return self._out("raw")

    @property
    def clean(self) -> Path:
        return self._out("clean")

    @property
    def rejects(self) -> Path:
        return self._out("rejects")

    @property
    def quality(self) -> Path:
        return self._out("quality.json")

    @property
    def features(self) -> Path:
        return self._out("features")

    @property
    def feature_pipeline(self) -> Path:
        return self._out("feature_pipeline")

    @property
    def feature_quality(self) -> Path:
        return self._out("feature_quality.json")

    @property
    def pca(self) -> Path:
        return self._out("pca.json")

    @property
    def pca_scree(self) -> Path:
        return self._out("pca_scree.png")

    @property
    def shards(self) -> Path:
        return self._out("shards")

    def shard(self, split: str) -> Path:
        return self.shards / split

    @property
    def shards_manifest(self) -> Path:
        return self._out("shards.json")

    @property
    def train_dir(self) -> Path:
        """What training keeps besides the model and its report."""
        return self._out("train")

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
        return self._out("model")

    @property
    def train_report(self) -> Path:
        return self._out("train.json")

    @property
    def metrics(self) -> Path:
        return self._out("metrics.json")

    @property
    def report(self) -> Path:
        return self._out("report.html")

    @property
    def artifact(self) -> Path:
        return self._out("artifact")

    @property
    def config(self) -> Path:
        """The effective config (the file plus --set overrides) of the latest command."""
        return self.root / "config.yaml"

    @property
    def timings(self) -> Path:
        """Not a stage's output: every stage run through the command line adds its own."""
        return self.root / "timings.json"

    def record_timing(self, stage: str, seconds: float, order: list[str]) -> None:
        """Keeps `stage`'s seconds and forgets those of the stages after it, whose
        outputs its new ones invalidate."""
        timings = read_json(self.timings) if self.timings.exists() else {}
        later = set(order[order.index(stage) :])
        timings = {name: s for name, s in timings.items() if name not in later}
        timings[stage] = round(seconds, 2)
        write_json(self.timings, {name: timings[name] for name in order if name in timings})

    def outputs(self, stage: str) -> list[Path]:
        """What `stage` writes, where this view puts it."""
        return [self._out(name) for name in OUTPUTS[stage]]

    def discard(self, stage: str) -> None:
        """Removes `stage`'s commit record, then its committed outputs: a run directory
        in which it never finished. The status goes first, so nothing reads a half-removed
        output as committed."""
        self.status(stage).unlink(missing_ok=True)
        for path in RunDir.at(self.root).outputs(stage):
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)

    def lock(self, command: str) -> RunDirLock:
        """Held by one command at a time (see RunDirLock); raises RunDirError naming the
        command that holds it."""
        return RunDirLock.take(self.root / LOCK_FILE, command)

    def require(self, path: Path, stage: str) -> Path:
        """Fails with the stage to run first when an input is missing."""
        if not path.exists():
            raise RunDirError(
                f"{path} does not exist: run the '{stage}' stage first "
                f"(jobs/{stage}.py --config CONFIG --run-dir {self.root})"
            )
        return path


class RunDirLock:
    """An exclusive flock on <run-dir>/_lock for as long as a command runs there. Two
    commands in one run directory (a scheduler's retry while the first try still runs, a
    second terminal) would recompute the same stage into the same staging folder and
    commit each other's half-written outputs; the second one is refused instead. The
    kernel drops the lock when the holder exits, however it dies, so it never goes
    stale; the file keeps who took it last, for the message. A lock needs a filesystem
    that honours flock across hosts (a local disk, NFSv4, Lustre; not every FUSE mount):
    where it does not, it only guards one host."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self._fd = path, fd

    @classmethod
    def take(cls, path: Path, command: str) -> RunDirLock:
        import datetime
        import fcntl
        import socket

        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
            os.close(fd)
            raise RunDirError(
                f"run directory {path.parent} is in use by another command "
                f"({holder or 'no details recorded'}); wait for it to end, or stop it, "
                "then run this again: two commands in one run directory would overwrite "
                "each other's stages"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        who = f"pid {os.getpid()} on {socket.gethostname()} since {now}: {command}"
        os.ftruncate(fd, 0)
        os.pwrite(fd, (who + "\n").encode(), 0)
        return cls(path, fd)

    def stop(self) -> None:
        """Releases it; named like SparkSession.stop, which the command line calls on
        both."""
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None


def write_json(path: Path, data: Any) -> None:
    """Writes atomically, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())
