"""Evaluate: score the test split in Spark with the trained model and compare it with a
baseline that ignores the features: the train split's majority class (classification)
or its mean target (regression).

Scoring runs in executors (mapInPandas, one model load per Arrow batch stream); only
(label, prediction) pairs come back to the driver, where scikit-learn computes exact
metrics.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    log_loss,
    mean_absolute_error,
    precision_recall_fscore_support,
    r2_score,
    roc_auc_score,
    root_mean_squared_error,
)

from sparknet.config import Config
from sparknet.errors import RunDirError
from sparknet.run_dir import RunDir, spark_path, write_json
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


def binary_metrics(y: np.ndarray, p: np.ndarray, train_positive_share: float) -> dict:
    p = np.clip(p, 1e-7, 1 - 1e-7)
    majority = 1.0 if train_positive_share >= 0.5 else 0.0
    constant = np.full_like(p, np.clip(train_positive_share, 1e-7, 1 - 1e-7))
    return {
        "rows": int(len(y)),
        "positive_share": float(y.mean()),
        "model": {
            "accuracy": float(accuracy_score(y, p >= 0.5)),
            "roc_auc": float(roc_auc_score(y, p)),
            "log_loss": float(log_loss(y, p, labels=[0, 1])),
        },
        "majority_baseline": {
            "predicts": majority,
            "accuracy": float(np.mean(y == majority)),
            "roc_auc": 0.5,
            "log_loss": float(log_loss(y, constant, labels=[0, 1])),
        },
    }


def multiclass_metrics(
    y: np.ndarray, p: np.ndarray, classes: list[str], train_counts: np.ndarray
) -> dict:
    """y (n,) class indices, p (n, C) class probabilities, train_counts (C,) rows per
    class in the train split, which picks the baseline's class and its constant
    probabilities."""
    n_classes = len(classes)
    labels = list(range(n_classes))
    y = y.astype(np.int64)
    test_counts = np.bincount(y, minlength=n_classes)

    def classification(predicted: np.ndarray, probabilities: np.ndarray) -> dict:
        precision, recall, f1, _ = precision_recall_fscore_support(
            y, predicted, labels=labels, average="macro", zero_division=0
        )
        return {
            "accuracy": float(accuracy_score(y, predicted)),
            "macro_precision": float(precision),
            "macro_recall": float(recall),
            "macro_f1": float(f1),
            "log_loss": float(log_loss(y, probabilities, labels=labels)),
        }

    model = classification(p.argmax(axis=1), p)
    absent = [classes[i] for i in labels if test_counts[i] == 0]
    if absent:
        # One-vs-rest AUC has no negatives-vs-positives split for a class with no rows.
        model["roc_auc"] = None
        model["roc_auc_note"] = f"not computed: classes {absent} have no rows in the test split"
    else:
        model["roc_auc"] = float(
            roc_auc_score(y, p, multi_class="ovr", average="macro", labels=labels)
        )
    model["confusion_matrix"] = {
        "classes": list(classes),
        "rows": "true class",
        "columns": "predicted class",
        "counts": confusion_matrix(y, p.argmax(axis=1), labels=labels).tolist(),
    }

    majority = int(np.argmax(train_counts))
    # The train split's class shares, kept off 0 so an unseen class costs a finite loss.
    prior = np.clip(train_counts / train_counts.sum(), 1e-7, None)
    prior = prior / prior.sum()
    baseline = {
        "predicts": classes[majority],
        "chosen_on": "train split label distribution",
        **classification(np.full_like(y, majority), np.tile(prior, (len(y), 1))),
        "roc_auc": None if absent else 0.5,  # constant scores rank nothing
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

    def errors(values: np.ndarray) -> dict:
        return {
            "rmse": float(root_mean_squared_error(y, values)),
            "mae": float(mean_absolute_error(y, values)),
            "r2": float(r2_score(y, values)),
        }

    return {
        "rows": int(len(y)),
        "target_mean": float(y.mean()),
        "target_std": float(y.std()),
        "model": errors(predicted),
        "mean_baseline": {
            "predicts": float(train_mean),
            "chosen_on": "train split mean",
            **errors(np.full_like(y, train_mean)),
        },
    }


def evaluate(spark: SparkSession, config: Config, run_dir: RunDir) -> dict:
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
    scored = score(test, spec, state).select(LABEL, name).toPandas()
    y = scored[LABEL].to_numpy(np.float64)

    if spec.task == "multiclass":
        counts = dict(train.groupBy(LABEL).count().collect())
        train_counts = np.array([counts.get(float(i), 0) for i in range(len(spec.classes))])
        # (n, C): the Arrow arrays come back as one numpy array per row.
        p = np.stack(scored[name].to_numpy())
        metrics = multiclass_metrics(y, p, spec.classes, train_counts)
    else:
        train_mean = float(train.agg(F.avg(LABEL)).first()[0])
        if spec.task == "regression":
            metrics = regression_metrics(y, scored[name].to_numpy(np.float64), train_mean)
        else:
            metrics = binary_metrics(y, scored[name].to_numpy(), train_mean)
    metrics["split"] = "test"
    metrics["label"] = config.label.name
    metrics["task"] = spec.task
    write_json(run_dir.metrics, metrics)
    log.info("test metrics (%d rows):\n%s", metrics["rows"], metrics_table(metrics))
    return metrics


TABLE_COLUMNS = {
    "binary": ("accuracy", "roc_auc", "log_loss"),
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
