"""Evaluate: score the test split in Spark with the trained model and compare it with a
baseline that ignores the features: the train split's majority class (classification)
or its mean target (regression); with `evaluate.compare`, also with simpler models on
the same features (sparknet/compare.py). Ends by writing report.html (sparknet/report.py).

Scoring runs in executors (mapInPandas, one model load per Arrow batch stream); only
(label, prediction) pairs come back to the driver, where scikit-learn computes exact
metrics.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from sklearn.metrics import confusion_matrix

from sparknet.compare import (
    EPS,
    binary_scores,
    compare,
    comparison_text,
    multiclass_scores,
    regression_scores,
)
from sparknet.config import Config
from sparknet.errors import RunDirError
from sparknet.report import write_report
from sparknet.run_dir import RunDir, read_json, spark_path, write_json
from sparknet.shard import LABEL, SAMPLE_ID
from sparknet.train.model import ModelSpec, load_model_files

log = logging.getLogger(__name__)

PROBABILITY = "probability"  # binary: float64; multiclass: array<float64>, one per class
PREDICTION = "prediction"  # regression: float64, in the target's original unit


def output_column(spec: ModelSpec) -> tuple[str, str]:
    """(name, Spark type) of what score() adds for the model's task."""
    if spec.task == "multiclass":
        return PROBABILITY, "array<double>"
    if spec.task == "regression":
        return PREDICTION, "double"
    return PROBABILITY, "double"


def score(df: DataFrame, spec: ModelSpec, state: bytes) -> DataFrame:
    """Keeps SAMPLE_ID and LABEL and adds the model's reading of each row (see
    output_column): the positive-class probability, the class probabilities in
    spec.classes order, or the predicted target."""
    spark = df.sparkSession
    state_bc = spark.sparkContext.broadcast(state)
    columns = list(spec.columns)
    name, spark_type = output_column(spec)

    def predict_batches(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        import torch

        from sparknet.train.model import model_from_bytes, predict

        torch.set_num_threads(1)
        model = model_from_bytes(spec, state_bc.value)
        with torch.no_grad():
            for batch in batches:
                x = torch.from_numpy(batch[columns].to_numpy(dtype=np.float32))
                out = predict(spec, model(x)).numpy()
                # (n, C) becomes n arrays of C, which Arrow writes as array<double>.
                values = list(out) if out.ndim == 2 else out
                yield pd.DataFrame({SAMPLE_ID: batch[SAMPLE_ID], LABEL: batch[LABEL], name: values})

    schema = f"{SAMPLE_ID} long, {LABEL} float, {name} {spark_type}"
    return df.select(SAMPLE_ID, LABEL, *columns).mapInPandas(predict_batches, schema)


CALIBRATION_BINS = 10


def calibration(confidence: np.ndarray, correct: np.ndarray, bins: int = CALIBRATION_BINS) -> dict:
    """Reliability bins: `confidence` (n,) in [0, 1] cut into equal-width bins; per
    non-empty bin its rows, mean confidence and the share `correct` (n,) 0/1 there.
    The expected calibration error is their gap weighted by rows."""
    index = np.minimum((confidence * bins).astype(np.int64), bins - 1)
    table = []
    gap = 0.0
    for b in range(bins):
        inside = index == b
        rows = int(inside.sum())
        if rows == 0:
            continue
        mean_confidence = float(confidence[inside].mean())
        observed = float(correct[inside].mean())
        gap += rows * abs(mean_confidence - observed)
        table.append(
            {
                "low": b / bins,
                "high": (b + 1) / bins,
                "rows": rows,
                "mean_predicted": mean_confidence,
                "observed": observed,
            }
        )
    return {"bins": table, "expected_calibration_error": gap / max(len(confidence), 1)}


def confusion(classes: list[str], y: np.ndarray, predicted: np.ndarray) -> dict:
    return {
        "classes": list(classes),
        "rows": "true class",
        "columns": "predicted class",
        "counts": confusion_matrix(y, predicted, labels=list(range(len(classes)))).tolist(),
    }


def binary_metrics(y: np.ndarray, p: np.ndarray, train_positive_share: float) -> dict:
    y = y.astype(np.int64)
    majority = 1.0 if train_positive_share >= 0.5 else 0.0
    model = binary_scores(y, p)
    model["confusion_matrix"] = confusion(["0", "1"], y, (p >= 0.5).astype(np.int64))
    model["calibration"] = {
        "of": "positive-class probability vs observed positive share",
        **calibration(p, y),
    }
    return {
        "rows": int(len(y)),
        "positive_share": float(y.mean()),
        "model": model,
        "majority_baseline": {
            "predicts": majority,
            "chosen_on": "train split positive share",
            **binary_scores(y, constant_output("binary", train_positive_share, len(y))),
        },
    }


def multiclass_metrics(
    y: np.ndarray, p: np.ndarray, classes: list[str], train_counts: np.ndarray
) -> dict:
    """y (n,) class indices, p (n, C) class probabilities, train_counts (C,) rows per
    class in the train split, which picks the baseline's class and its constant
    probabilities."""
    y = y.astype(np.int64)
    test_counts = np.bincount(y, minlength=len(classes))
    absent = [classes[i] for i in range(len(classes)) if test_counts[i] == 0]

    model = multiclass_scores(y, p)
    if absent:
        # One-vs-rest AUC has no negatives-vs-positives split for a class with no rows.
        model["roc_auc_note"] = f"not computed: classes {absent} have no rows in the test split"
    predicted = p.argmax(axis=1)
    model["confusion_matrix"] = confusion(classes, y, predicted)
    model["calibration"] = {
        "of": "top-class probability vs observed accuracy",
        **calibration(p.max(axis=1), (predicted == y).astype(np.float64)),
    }
    baseline = {
        "predicts": classes[int(np.argmax(train_counts))],
        "chosen_on": "train split label distribution",
        **multiclass_scores(y, constant_output("multiclass", train_counts, len(y))),
    }
    return {
        "rows": int(len(y)),
        "classes": list(classes),
        "class_share": (test_counts / max(len(y), 1)).tolist(),
        "model": model,
        "majority_baseline": baseline,
    }


def regression_metrics(y: np.ndarray, predicted: np.ndarray, train_mean: float) -> dict:
    """y and predicted (n,) in the target's original unit."""
    return {
        "rows": int(len(y)),
        "target_mean": float(y.mean()),
        "target_std": float(y.std()),
        "model": regression_scores(y, predicted),
        "mean_baseline": {
            "predicts": float(train_mean),
            "chosen_on": "train split mean",
            **regression_scores(y, constant_output("regression", train_mean, len(y))),
        },
    }


def constant_output(task: str, train_summary, n: int) -> np.ndarray:
    """The baseline's output for n rows from the train split's label: its positive
    share (binary), its class counts (multiclass: the class shares, kept off 0 so an
    unseen class costs a finite loss) or its mean (regression)."""
    if task == "multiclass":
        prior = np.clip(train_summary / train_summary.sum(), EPS, None)
        return np.tile(prior / prior.sum(), (n, 1))
    return np.full(n, float(train_summary))


def evaluate(spark: SparkSession, config: Config, run_dir: RunDir) -> dict:
    started = time.perf_counter()
    run_dir.require(run_dir.model / "model.pt", "train")
    run_dir.require(run_dir.train_report, "train")  # written last: training finished
    spec, state = load_model_files(run_dir.model)
    if spec.task != config.label.task or spec.classes != list(config.label.classes):
        raise RunDirError(
            f"{run_dir.model} holds a {spec.task} model (classes {spec.classes}), but the config "
            f"has label.task={config.label.task} (classes {config.label.classes}); rerun the "
            "'train' stage with this config"
        )
    test = spark.read.parquet(spark_path(run_dir.require(run_dir.shard("test"), "shard")))
    train = spark.read.parquet(spark_path(run_dir.shard("train")))
    name, _ = output_column(spec)
    # In sample_id order, which every other model's test output follows too.
    scored = score(test, spec, state).select(SAMPLE_ID, LABEL, name).toPandas()
    scored = scored.sort_values(SAMPLE_ID)
    y = scored[LABEL].to_numpy(np.float64)

    if spec.task == "multiclass":
        counts = dict(train.groupBy(LABEL).count().collect())
        train_summary = np.array([counts.get(float(i), 0) for i in range(len(spec.classes))])
        # (n, C): the Arrow arrays come back as one numpy array per row.
        out = np.stack(scored[name].to_numpy())
        metrics = multiclass_metrics(y, out, spec.classes, train_summary)
    else:
        train_summary = float(train.agg(F.avg(LABEL)).first()[0])
        out = scored[name].to_numpy(np.float64)
        if spec.task == "regression":
            metrics = regression_metrics(y, out, train_summary)
        else:
            metrics = binary_metrics(y, out, train_summary)
    metrics["split"] = "test"
    metrics["label"] = config.label.name
    metrics["task"] = spec.task
    log.info("test metrics (%d rows):\n%s", metrics["rows"], metrics_table(metrics))

    if config.evaluate.compare:
        train_report = read_json(run_dir.train_report)
        baseline = "mean_baseline" if spec.task == "regression" else "majority_baseline"
        metrics["comparison"] = compare(
            config,
            spec,
            train,
            test,
            y,
            network={
                "name": f"sparknet MLP {spec.hidden} (DDP, {len(train_report['epochs'])} epochs)",
                "fit_rows": train_report["train_rows"],
                "fit_seconds": train_report["seconds"],
                "output": out,
            },
            baseline={
                "name": baseline.replace("_", " "),
                "fit_rows": train_report["train_rows"],
                "fit_seconds": 0.0,
                "output": constant_output(spec.task, train_summary, len(y)),
            },
            components=read_json(run_dir.pca)["k"],
        )
        log.info(
            "comparison on the test split (%d rows; the comparison models fit on %s):\n%s",
            len(y),
            metrics["comparison"]["sample"],
            comparison_text(spec.task, metrics["comparison"]),
        )
    write_json(run_dir.metrics, metrics)
    write_report(run_dir, config, metrics, y, out, time.perf_counter() - started)
    log.info("report: %s", run_dir.committed(run_dir.report))
    return metrics


TABLE_COLUMNS = {
    "binary": ("accuracy", "f1", "roc_auc", "pr_auc", "log_loss"),
    "multiclass": ("accuracy", "macro_f1", "roc_auc", "log_loss"),
    "regression": ("rmse", "mae", "r2"),
}


def metrics_table(metrics: dict) -> str:
    task = metrics.get("task", "binary")
    keys = TABLE_COLUMNS[task]
    baseline = "mean_baseline" if task == "regression" else "majority_baseline"
    rows = [("", *keys)]
    for name in ("model", baseline):
        m = metrics[name]
        rows.append((name, *("n/a" if m[k] is None else f"{m[k]:.4f}" for k in keys)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.rjust(w) for cell, w in zip(r, widths, strict=True)) for r in rows
    )
