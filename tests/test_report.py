"""Evaluation metrics, the comparison table and report.html, on hand-made inputs (the
real pipeline's report is opened in tests/test_end_to_end.py)."""

import dataclasses
import json

import numpy as np
import pytest
from browser import assert_renders_with_images

from conftest import epoch_record, synthetic_config
from sparknet.compare import compare, comparison_text
from sparknet.config import EvaluateConfig
from sparknet.errors import ConfigError
from sparknet.evaluate import (
    binary_metrics,
    calibration,
    constant_output,
    multiclass_metrics,
    regression_metrics,
)
from sparknet.report import write_report
from sparknet.run_dir import RunDir, write_json
from sparknet.train.model import ModelSpec

BINARY_KEYS = ("accuracy", "precision", "recall", "f1", "roc_auc", "pr_auc", "log_loss")


def binary_sample(n=2000, seed=0):
    """Labels drawn from the probabilities themselves: a perfectly calibrated model."""
    rng = np.random.default_rng(seed)
    p = rng.uniform(size=n)
    return (rng.uniform(size=n) < p).astype(np.float64), p


def test_calibration_bins_hold_rows_mean_probability_and_observed_share():
    confidence = np.array([0.05, 0.15, 0.15, 0.95, 1.0])
    correct = np.array([0, 0, 1, 1, 1])
    result = calibration(confidence, correct, bins=10)
    assert [b["rows"] for b in result["bins"]] == [1, 2, 2]  # 1.0 falls in the last bin
    assert result["bins"][1]["observed"] == 0.5
    assert result["bins"][1]["mean_predicted"] == pytest.approx(0.15)
    gap = 0.05 * 1 + 0.35 * 2 + 0.025 * 2
    assert result["expected_calibration_error"] == pytest.approx(gap / 5)


def test_binary_metrics_cover_the_issue_list_for_model_and_baseline():
    y, p = binary_sample()
    metrics = binary_metrics(y, p, float(y.mean()))
    for key in BINARY_KEYS:
        assert metrics["model"][key] is not None
        assert key in metrics["majority_baseline"]
    assert metrics["model"]["calibration"]["expected_calibration_error"] < 0.05
    assert np.sum(metrics["model"]["confusion_matrix"]["counts"]) == len(y)
    assert metrics["majority_baseline"]["roc_auc"] == 0.5
    assert metrics["majority_baseline"]["pr_auc"] == pytest.approx(y.mean())


def test_multiclass_baseline_and_absent_class():
    y = np.array([0, 0, 1, 1, 0, 1])
    p = np.tile([0.6, 0.3, 0.1], (6, 1))
    metrics = multiclass_metrics(y, p, ["a", "b", "c"], np.array([5, 3, 2]))
    assert metrics["model"]["roc_auc"] is None  # class c has no test rows
    assert "roc_auc_note" in metrics["model"]
    assert metrics["majority_baseline"]["predicts"] == "a"
    assert len(metrics["model"]["calibration"]["bins"]) == 1


def test_evaluate_compare_settings_are_checked():
    with pytest.raises(ConfigError, match="evaluate.compare_rows"):
        synthetic_config_with(compare_rows=0)
    with pytest.raises(ConfigError, match="evaluate.spark_mlp_iterations"):
        synthetic_config_with(spark_mlp_iterations=-1)


def synthetic_config_with(**evaluate):
    from conftest import synthetic_config_dict
    from sparknet.config import config_from_dict

    return config_from_dict({**synthetic_config_dict(), "evaluate": evaluate})


def shard_frame(spark, n, offset, seed):
    """Shard-shaped rows: sample_id, float label, pc_000..pc_003; the label follows the
    first two components."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4))
    y = (x[:, 0] + x[:, 1] + 0.3 * rng.normal(size=n) > 0).astype(float)
    rows = [(offset + i, float(y[i]), *map(float, x[i])) for i in range(n)]
    schema = "sample_id long, label float, pc_000 float, pc_001 float, pc_002 float, pc_003 float"
    return spark.createDataFrame(rows, schema), x, y


def test_comparison_fits_every_model_on_the_same_features(spark):
    train, _, _ = shard_frame(spark, 1200, 0, seed=1)
    test, x_test, y_test = shard_frame(spark, 400, 0, seed=2)
    config = dataclasses.replace(
        synthetic_config(), evaluate=EvaluateConfig(compare_rows=500, spark_mlp_iterations=30)
    )
    spec = ModelSpec(
        columns=["pc_000", "pc_001", "pc_002", "pc_003"], hidden=[8], activation="relu", dropout=0
    )
    share = 0.5
    result = compare(
        config,
        spec,
        train,
        test,
        y_test,
        network={
            "name": "network",
            "fit_rows": 1200,
            "fit_seconds": 1.0,
            "output": 1 / (1 + np.exp(-3 * (x_test[:, 0] + x_test[:, 1]))),
        },
        baseline={
            "name": "baseline",
            "fit_rows": 1200,
            "fit_seconds": 0.0,
            "output": constant_output("binary", share, len(y_test)),
        },
        components=3,
    )
    assert result["features"] == (
        "the network's 4 inputs from the shards: 3 PCA components and 1 target-encoded column"
    )
    models = {m["name"].split(" (")[0]: m for m in result["models"]}
    assert list(models) == [
        "baseline",
        "sklearn LogisticRegression",
        "sklearn HistGradientBoostingClassifier",
        "Spark ML MultilayerPerceptronClassifier",
        "network",
    ]
    assert models["sklearn LogisticRegression"]["fit_rows"] == 500
    assert models["Spark ML MultilayerPerceptronClassifier"]["fit_rows"] == 500
    assert models["baseline"]["roc_auc"] == 0.5
    for name in ("sklearn LogisticRegression", "Spark ML MultilayerPerceptronClassifier"):
        assert models[name]["roc_auc"] > 0.9, name
        assert models[name]["fit_seconds"] > 0
    assert "first 500 sample ids" in result["sample"]
    text = comparison_text("binary", result)
    assert "pr_auc" in text and "sklearn LogisticRegression" in text
    json.dumps(result)  # goes into metrics.json as is


def hand_made_run(tmp_path, task):
    """A run directory with what the report reads besides metrics: quality.json,
    feature_quality.json, pca.json + scree plot, train.json (no curves.png: drawn from
    the history), timings."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    run_dir = RunDir.at(tmp_path / "run")
    run_dir.root.mkdir()
    write_json(
        run_dir.quality,
        {
            "rows_in": 110,
            "clean": 100,
            "rejected": 10,
            "reconciled": True,
            "rejected_by_reason": {"missing_label": 10},
            "columns": {"x": {"type": "double", "nulls": 0, "min": 0.0, "max": 1.0}},
        },
    )
    write_json(
        run_dir.feature_quality,
        {"columns": {"wind_gust": {"kind": "numeric", "impute": "median", "fill": 4.5}}},
    )
    write_json(run_dir.pca, {"k": 3, "n_features_in": 9, "variance_kept": 0.96})
    fig = Figure(figsize=(6, 3))
    FigureCanvasAgg(fig)
    fig.subplots().bar(range(9), np.linspace(0.3, 0.01, 9))
    fig.savefig(run_dir.pca_scree)
    epochs = [epoch_record(e) for e in range(3)]
    write_json(
        run_dir.train_report,
        {"epochs": epochs, "world_size": 2, "train_rows": 1000, "seconds": 9.5, "task": task},
    )
    for stage, seconds in [("ingest", 1.0), ("clean", 5.0), ("features", 7.0), ("train", 9.5)]:
        run_dir.record_timing(stage, seconds, ["ingest", "clean", "features", "shard", "train"])
    return run_dir


def test_timings_forget_the_stages_after_a_rerun_one(tmp_path):
    run_dir = RunDir.at(tmp_path)
    order = ["a", "b", "c"]
    for stage in order:
        run_dir.record_timing(stage, 1.0, order)
    run_dir.record_timing("b", 2.0, order)
    assert json.loads(run_dir.timings.read_text()) == {"a": 1.0, "b": 2.0}


@pytest.mark.parametrize("task", ["binary", "multiclass", "regression"])
def test_report_is_one_page_with_inline_images(tmp_path, task):
    run_dir = hand_made_run(tmp_path, task)
    rng = np.random.default_rng(0)
    if task == "binary":
        y, out = binary_sample()
        metrics = binary_metrics(y, out, 0.5)
    elif task == "multiclass":
        y = rng.integers(0, 3, size=600).astype(float)
        out = rng.dirichlet([1, 1, 1], size=600)
        metrics = multiclass_metrics(y, out, ["a", "b", "c"], np.array([1, 1, 1]))
    else:
        y = rng.normal(size=600)
        out = y + 0.3 * rng.normal(size=600)
        metrics = regression_metrics(y, out, 0.0)
    metrics.update(task=task, label="y", split="test")
    config = synthetic_config()

    page = write_report(run_dir, config, metrics, y, out, 1.5).read_text()
    images = page.count("src='data:image/png;base64,")
    assert images == (3 if task == "regression" else 4)  # curves, (cm), training, scree
    assert "http" not in page.replace("http-equiv", "")  # nothing fetched from anywhere
    for text in (
        "missing_label",
        "wind_gust",  # the features table, from feature_quality.json
        "Seconds per stage",
        "evaluate (until this report)",
        "96.0%",
    ):
        assert text in page
    if task == "binary":
        assert_renders_with_images(run_dir.report, tmp_path)
