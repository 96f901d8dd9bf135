"""Evaluate: score the test split in Spark with the trained model and compare it with
the majority-class baseline.

Scoring runs in executors (mapInPandas, one model load per Arrow batch stream); only
(label, probability) pairs come back to the driver, where the metrics are exact.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from sklearn.metrics import accuracy_score, log_loss, roc_auc_score

from sparknet.config import Config
from sparknet.run_dir import RunDir, write_json
from sparknet.shard import LABEL, SAMPLE_ID
from sparknet.train.model import ModelSpec, load_model_files

log = logging.getLogger(__name__)

PROBABILITY = "probability"


def score(df: DataFrame, spec: ModelSpec, state: bytes) -> DataFrame:
    """Adds PROBABILITY (float64) from the model; keeps SAMPLE_ID and LABEL."""
    spark = df.sparkSession
    state_bc = spark.sparkContext.broadcast(state)
    columns = list(spec.columns)

    def predict(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        import torch

        from sparknet.train.model import model_from_bytes

        torch.set_num_threads(1)
        model = model_from_bytes(spec, state_bc.value)
        with torch.no_grad():
            for batch in batches:
                x = torch.from_numpy(batch[columns].to_numpy(dtype=np.float32))
                p = torch.sigmoid(model(x).squeeze(1)).double().numpy()
                yield pd.DataFrame(
                    {SAMPLE_ID: batch[SAMPLE_ID], LABEL: batch[LABEL], PROBABILITY: p}
                )

    schema = f"{SAMPLE_ID} long, {LABEL} float, {PROBABILITY} double"
    return df.select(SAMPLE_ID, LABEL, *columns).mapInPandas(predict, schema)


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


def evaluate(spark: SparkSession, config: Config, run_dir: RunDir) -> dict:
    run_dir.require(run_dir.model / "model.pt", "train")
    spec, state = load_model_files(run_dir.model)
    test = spark.read.parquet(str(run_dir.require(run_dir.shard("test"), "shard")))
    train_share = float(
        spark.read.parquet(str(run_dir.shard("train"))).agg(F.avg(LABEL)).first()[0]
    )
    scored = score(test, spec, state).select(LABEL, PROBABILITY).toPandas()
    metrics = binary_metrics(
        scored[LABEL].to_numpy(np.float64), scored[PROBABILITY].to_numpy(), train_share
    )
    metrics["split"] = "test"
    metrics["label"] = config.label.name
    write_json(run_dir.metrics, metrics)
    log.info("test metrics (%d rows):\n%s", metrics["rows"], metrics_table(metrics))
    return metrics


def metrics_table(metrics: dict) -> str:
    rows = [("", "accuracy", "roc_auc", "log_loss")]
    for name in ("model", "majority_baseline"):
        m = metrics[name]
        rows.append((name, f"{m['accuracy']:.4f}", f"{m['roc_auc']:.4f}", f"{m['log_loss']:.4f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join(
        "  ".join(cell.rjust(w) for cell, w in zip(r, widths, strict=True)) for r in rows
    )
