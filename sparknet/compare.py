"""How the network compares with simpler models given the same inputs: the PCA
components in the shards, the train split to fit on and the test split to score.

Rows of the comparison table, each with its fit rows, fit seconds and the task's test
metrics:
  - the constant baseline (train split's majority class, or mean target);
  - scikit-learn's LogisticRegression (LinearRegression) and HistGradientBoosting, on
    the first `evaluate.compare_rows` sample ids of the train split. Sample ids follow a
    seeded hash order (sparknet/shard.py), so that prefix is a uniform random sample;
  - Spark ML's MultilayerPerceptronClassifier with the network's layer sizes, on the
    same sample, for at most `evaluate.spark_mlp_iterations` L-BFGS iterations
    (classification only: Spark ML has no MLP regressor). Each iteration is a pass of
    forward and backward over the sample in the JVM, far slower per row than torch;
    on all 229k flights it took minutes, hence the sample;
  - the network itself, with the train stage's seconds.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    log_loss,
    mean_absolute_error,
    precision_recall_fscore_support,
    r2_score,
    roc_auc_score,
    root_mean_squared_error,
)

from sparknet.config import Config
from sparknet.shard import LABEL, SAMPLE_ID
from sparknet.train.model import ModelSpec

log = logging.getLogger(__name__)

EPS = 1e-7


def describe_inputs(columns: list[str], components: int) -> str:
    """The network's inputs in words: the PCA components, then any appended encodings
    (the shards name both `pc_…`; pca.json's k says where the components end)."""
    appended = len(columns) - components
    text = f"the network's {len(columns)} inputs from the shards: {components} PCA components"
    plural = "s" if appended != 1 else ""
    return text + (f" and {appended} target-encoded column{plural}" if appended else "")


def binary_scores(y: np.ndarray, p: np.ndarray) -> dict:
    """y (n,) 0/1, p (n,) positive-class probability; the class is p >= 0.5."""
    p = np.clip(p, EPS, 1 - EPS)
    predicted = (p >= 0.5).astype(np.int64)
    precision, recall, f1, _ = precision_recall_fscore_support(
        y, predicted, average="binary", zero_division=0
    )
    constant = np.ptp(p) == 0  # ranks nothing: both areas are the chance level
    return {
        "accuracy": float(accuracy_score(y, predicted)),
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
        "roc_auc": 0.5 if constant else float(roc_auc_score(y, p)),
        "pr_auc": float(y.mean()) if constant else float(average_precision_score(y, p)),
        "log_loss": float(log_loss(y, p, labels=[0, 1])),
    }


def multiclass_scores(y: np.ndarray, p: np.ndarray) -> dict:
    """y (n,) class indices, p (n, C) class probabilities; macro averages over classes.
    ROC AUC (one-vs-rest) is None when a class has no test rows."""
    n_classes = p.shape[1]
    labels = list(range(n_classes))
    predicted = p.argmax(axis=1)
    precision, recall, f1, _ = precision_recall_fscore_support(
        y, predicted, labels=labels, average="macro", zero_division=0
    )
    scores = {
        "accuracy": float(accuracy_score(y, predicted)),
        "macro_precision": float(precision),
        "macro_recall": float(recall),
        "macro_f1": float(f1),
        "roc_auc": None,
        "log_loss": float(log_loss(y, np.clip(p, EPS, None), labels=labels)),
    }
    if np.bincount(y, minlength=n_classes).min() > 0:
        scores["roc_auc"] = (
            0.5
            if np.ptp(p, axis=0).max() == 0
            else float(roc_auc_score(y, p, multi_class="ovr", average="macro", labels=labels))
        )
    return scores


def regression_scores(y: np.ndarray, predicted: np.ndarray) -> dict:
    return {
        "rmse": float(root_mean_squared_error(y, predicted)),
        "mae": float(mean_absolute_error(y, predicted)),
        "r2": float(r2_score(y, predicted)),
    }


def task_scores(task: str, y: np.ndarray, out: np.ndarray) -> dict:
    if task == "binary":
        return binary_scores(y.astype(np.int64), out)
    if task == "multiclass":
        return multiclass_scores(y.astype(np.int64), out)
    return regression_scores(y, out)


def sklearn_models(task: str, seed: int) -> dict[str, object]:
    from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
    from sklearn.linear_model import LinearRegression, LogisticRegression

    if task == "regression":
        return {
            "sklearn LinearRegression": LinearRegression(),
            "sklearn HistGradientBoostingRegressor": HistGradientBoostingRegressor(
                random_state=seed
            ),
        }
    return {
        "sklearn LogisticRegression": LogisticRegression(max_iter=500),
        "sklearn HistGradientBoostingClassifier": HistGradientBoostingClassifier(random_state=seed),
    }


def model_output(task: str, model, x: np.ndarray) -> np.ndarray:
    """What the metrics read: positive-class probability (n,), class probabilities
    (n, C), or the predicted target (n,)."""
    if task == "regression":
        return model.predict(x)
    p = model.predict_proba(x)
    return p[:, 1] if task == "binary" else p


def timed(fit: Callable[[], object]) -> tuple[object, float]:
    started = time.perf_counter()
    fitted = fit()
    return fitted, time.perf_counter() - started


def aligned_to_classes(p: np.ndarray, seen: np.ndarray, n_classes: int) -> np.ndarray:
    """(n, len(seen)) probabilities over the classes a model saw in training → (n, C),
    zero for classes absent from its train sample."""
    full = np.zeros((len(p), n_classes))
    full[:, seen.astype(np.int64)] = p
    return full


def spark_mlp_probabilities(
    fit_rows: DataFrame, test: DataFrame, spec: ModelSpec, iterations: int, seed: int
) -> tuple[np.ndarray, float]:
    """Fits Spark ML's MLP with the network's layer sizes on `fit_rows`; returns
    the test split's probabilities ((n,) positive class or (n, C)) in sample_id order
    and the fit seconds."""
    from pyspark.ml.classification import MultilayerPerceptronClassifier
    from pyspark.ml.feature import VectorAssembler
    from pyspark.ml.functions import vector_to_array

    n_classes = 2 if spec.task == "binary" else len(spec.classes)
    assembler = VectorAssembler(inputCols=list(spec.columns), outputCol="features")
    mlp = MultilayerPerceptronClassifier(
        layers=[spec.n_inputs, *spec.hidden, n_classes],
        maxIter=iterations,
        seed=seed,
        labelCol=LABEL,
        featuresCol="features",
    )
    # The label column is float32 in the shards; Spark ML wants a double class index.
    vectors = assembler.transform(fit_rows).withColumn(LABEL, F.col(LABEL).cast("double"))
    model, seconds = timed(lambda: mlp.fit(vectors))
    scored = (
        model.transform(assembler.transform(test))
        .select(SAMPLE_ID, vector_to_array("probability").alias("p"))
        .toPandas()
        .sort_values(SAMPLE_ID)
    )
    p = np.stack(scored["p"].to_numpy())
    return (p[:, 1] if spec.task == "binary" else p), seconds


def compare(
    config: Config,
    spec: ModelSpec,
    train: DataFrame,
    test: DataFrame,
    y_test: np.ndarray,
    network: dict,
    baseline: dict,
    components: int,
) -> dict:
    """The comparison table (rows as in the module docstring). `y_test` and every model's
    test output are in sample_id order. `network` and `baseline` are
    {name, fit_rows, fit_seconds, output} for the rows computed elsewhere."""
    task = spec.task
    columns = list(spec.columns)
    seed = config.train.seed
    n_train = train.count()

    x_test = test.select(SAMPLE_ID, *columns).toPandas().sort_values(SAMPLE_ID)
    x_test = x_test[columns].to_numpy(np.float32)
    fit_rows = train.where(F.col(SAMPLE_ID) < config.evaluate.compare_rows)
    sample = fit_rows.select(LABEL, *columns).toPandas()
    x_fit = sample[columns].to_numpy(np.float32)
    y_fit = sample[LABEL].to_numpy(np.float64)
    if task != "regression":
        y_fit = y_fit.astype(np.int64)

    rows = [baseline]
    for name, model in sklearn_models(task, seed).items():
        with warnings.catch_warnings():
            # An unconverged logistic fit is still a fair, cheap reference point.
            warnings.simplefilter("ignore", category=UserWarning)
            warnings.filterwarnings("ignore", message=".*converge.*")
            _, seconds = timed(lambda m=model: m.fit(x_fit, y_fit))
        out = model_output(task, model, x_test)
        if task == "multiclass":
            out = aligned_to_classes(out, model.classes_, len(spec.classes))
        rows.append({"name": name, "fit_rows": len(y_fit), "fit_seconds": seconds, "output": out})
        log.info("%s: fitted on %d rows in %.1f s", name, len(y_fit), seconds)

    iterations = config.evaluate.spark_mlp_iterations
    if task != "regression" and iterations > 0:
        out, seconds = spark_mlp_probabilities(fit_rows, test, spec, iterations, seed)
        name = f"Spark ML MultilayerPerceptronClassifier (maxIter {iterations})"
        rows.append({"name": name, "fit_rows": len(y_fit), "fit_seconds": seconds, "output": out})
        log.info("%s: fitted on %d rows in %.1f s", name, len(y_fit), seconds)
    rows.append(network)

    table = []
    for row in rows:
        table.append(
            {
                "name": row["name"],
                "fit_rows": int(row["fit_rows"]),
                "fit_seconds": None if row["fit_seconds"] is None else float(row["fit_seconds"]),
                **task_scores(task, y_test, row["output"]),
            }
        )
    return {
        "split": "test",
        "test_rows": int(len(y_test)),
        "features": describe_inputs(columns, components),
        "sample_rows": int(len(y_fit)),
        "sample": (
            f"the first {len(y_fit)} sample ids of the {n_train}-row train split "
            "(a uniform random sample: ids follow a seeded hash order)"
            if len(y_fit) < n_train
            else f"the whole {n_train}-row train split"
        ),
        "models": table,
    }


COLUMNS = {
    "binary": ("accuracy", "precision", "recall", "f1", "roc_auc", "pr_auc", "log_loss"),
    "multiclass": ("accuracy", "macro_f1", "roc_auc", "log_loss"),
    "regression": ("rmse", "mae", "r2"),
}


def comparison_frame(task: str, comparison: dict) -> pd.DataFrame:
    """The table as rows of model name, fit rows, fit seconds and the task's metrics."""
    keys = ["fit_rows", "fit_seconds", *COLUMNS[task]]
    return pd.DataFrame(
        [[m[k] for k in keys] for m in comparison["models"]],
        index=[m["name"] for m in comparison["models"]],
        columns=keys,
    )


def comparison_text(task: str, comparison: dict) -> str:
    """A fixed-width rendering for the driver's log."""
    frame = comparison_frame(task, comparison)
    rows = [("model", *frame.columns)]
    for name, values in frame.iterrows():
        cells = [name]
        for key, value in values.items():
            if value is None or (isinstance(value, float) and np.isnan(value)):
                cells.append("n/a")
            elif key == "fit_rows":
                cells.append(str(int(value)))
            elif key == "fit_seconds":
                cells.append(f"{value:.1f}")
            else:
                cells.append(f"{value:.4f}")
        rows.append(tuple(cells))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in rows
    )
