"""label.task beyond binary: multiclass and regression through train and evaluate, in
real barrier tasks in local[2]; the output-reading and metric functions without Spark."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from test_train import K, W, write_shards

from conftest import small_training_config
from sparknet.errors import RunDirError, TrainingError
from sparknet.evaluate import evaluate, multiclass_metrics, regression_metrics, score
from sparknet.run_dir import RunDir, read_json
from sparknet.train.launcher import train
from sparknet.train.model import (
    ModelSpec,
    build_mlp,
    load_model_files,
    model_from_bytes,
    predict,
    save_model,
    state_to_bytes,
    task_loss,
)
from sparknet.train.worker import weights_digest

CLASSES = ["low", "mid", "high"]
# Class scores x @ W3 + B3; the biases make the classes unequal in size, so the
# majority baseline has a clear class to pick.
W3 = np.array([[2.0, -1.0, -1.0], [-1.0, 2.0, -1.0], [0.5, 0.5, -1.0], [-1.0, -1.0, 2.0]])
B3 = np.array([0.8, 0.0, -0.4])
TARGET_MEAN, TARGET_SCALE, NOISE = 1000.0, 80.0, 5.0


def three_classes(x, rng):
    """A class index 0..2 that is a linear function's argmax: separable by construction."""
    return np.argmax(x @ W3 + B3, axis=1)


def linear_target(x, rng):
    """About 1000 ± 220, linear in x plus a little noise: R² near 1 is reachable."""
    return TARGET_MEAN + TARGET_SCALE * (x @ W) + NOISE * rng.normal(size=len(x))


MULTICLASS = {"task": "multiclass", "classes": CLASSES}
REGRESSION = {"task": "regression"}


def split_labels(run_dir: RunDir, split: str) -> np.ndarray:
    return pq.read_table(run_dir.shard(split)).column("label").to_numpy()


def assert_ranks_identical(run_dir: RunDir, report: dict) -> None:
    """Each rank's own digest, as it reported it, and the saved model's weights agree."""
    digests = report["rank_weights_digests"]
    assert len(digests) == 2 and digests[0] == digests[1] == report["weights_digest"]
    spec, state = load_model_files(run_dir.model)
    assert weights_digest(model_from_bytes(spec, state)) == digests[0]


# --- without Spark ---------------------------------------------------------------------


def test_model_json_round_trips_and_old_files_load_as_binary(tmp_path):
    spec = ModelSpec(["a", "b"], [4], "relu", 0.0, "multiclass", 3, CLASSES)
    save_model(tmp_path / "new", spec, state_to_bytes(build_mlp(spec)))
    loaded, state = load_model_files(tmp_path / "new")
    assert loaded == spec
    assert model_from_bytes(loaded, state)(torch.zeros(5, 2)).shape == (5, 3)

    # A model.json from before tasks existed: four keys, a one-output binary network.
    old = ModelSpec(["a", "b"], [4], "relu", 0.0)
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "model.json").write_text(
        json.dumps({"columns": ["a", "b"], "hidden": [4], "activation": "relu", "dropout": 0.0})
    )
    (tmp_path / "old" / "model.pt").write_bytes(state_to_bytes(build_mlp(old)))
    loaded, _ = load_model_files(tmp_path / "old")
    assert loaded.task == "binary" and loaded.n_outputs == 1 and loaded == old


@pytest.mark.parametrize(
    "fields, problem",
    [
        ({"task": "multiclass", "n_outputs": 2, "classes": CLASSES}, "n_outputs == len"),
        ({"task": "regression", "n_outputs": 3}, "needs n_outputs=1"),
        ({"task": "regression", "target_std": 0.0}, "target_std must be > 0"),
        ({"task": "ranking"}, "not one of"),
    ],
)
def test_inconsistent_model_json_is_refused(tmp_path, fields, problem):
    data = {"columns": ["a"], "hidden": [], "activation": "relu", "dropout": 0.0, **fields}
    (tmp_path / "model.json").write_text(json.dumps(data))
    with pytest.raises(RunDirError, match=problem):
        load_model_files(tmp_path)


def test_regression_is_trained_standardised_and_read_in_the_original_unit():
    spec = ModelSpec(["a"], [], "relu", 0.0, "regression", target_mean=1000.0, target_std=50.0)
    label = torch.tensor([950.0, 1000.0, 1100.0])
    standard = ((label - 1000.0) / 50.0).unsqueeze(1)  # (3, 1), what a perfect net outputs
    assert task_loss(spec, standard, label).item() == pytest.approx(0.0, abs=1e-12)
    # Off by one standard deviation everywhere: MSE 1 on the standardised scale.
    assert task_loss(spec, standard + 1, label).item() == pytest.approx(1.0)
    np.testing.assert_allclose(predict(spec, standard).numpy(), label.numpy())


def test_multiclass_reads_as_class_probabilities():
    spec = ModelSpec(["a"], [], "relu", 0.0, "multiclass", 3, CLASSES)
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 5.0]])
    label = torch.tensor([0.0, 2.0])  # class indices as the shards store them: float
    assert task_loss(spec, logits, label).item() == pytest.approx(
        F.cross_entropy(logits, torch.tensor([0, 2])).item()
    )
    p = predict(spec, logits)
    assert p.dtype == torch.float64 and p.shape == (2, 3)
    np.testing.assert_allclose(p.sum(dim=1).numpy(), 1.0, rtol=0, atol=1e-12)
    assert p.argmax(dim=1).tolist() == [0, 2]


def test_multiclass_metrics_say_why_auc_is_missing():
    y = np.array([0, 0, 1, 1, 0], dtype=np.float64)  # no row of class 2 ("high")
    p = np.array([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.5, 0.4, 0.1]] + [[1, 0, 0]])
    metrics = multiclass_metrics(y, p, CLASSES, train_counts=np.array([10, 30, 5]))

    model = metrics["model"]
    assert model["accuracy"] == pytest.approx(4 / 5)
    assert model["roc_auc"] is None and "['high']" in model["roc_auc_note"]
    assert model["confusion_matrix"]["classes"] == CLASSES
    assert model["confusion_matrix"]["counts"] == [[3, 0, 0], [1, 1, 0], [0, 0, 0]]
    baseline = metrics["majority_baseline"]
    # "mid" is the train split's majority, although "low" is the test split's.
    assert baseline["predicts"] == "mid" and baseline["accuracy"] == pytest.approx(2 / 5)
    assert metrics["class_share"] == pytest.approx([0.6, 0.4, 0.0])


def test_regression_metrics_against_the_train_mean():
    y = np.array([10.0, 20.0, 30.0, 40.0])
    metrics = regression_metrics(y, y + np.array([1.0, -1.0, 1.0, -1.0]), train_mean=20.0)
    assert metrics["model"] == pytest.approx({"rmse": 1.0, "mae": 1.0, "r2": 1 - 4 / 500})
    baseline = metrics["mean_baseline"]
    assert baseline["predicts"] == 20.0
    assert baseline["mae"] == pytest.approx(10.0)  # |10-20|, 0, 10, 20
    assert baseline["r2"] == pytest.approx(1 - 600 / 500)


# --- train and evaluate in barrier tasks -----------------------------------------------


def test_binary_evaluate_keeps_its_keys(spark, tmp_path):
    run_dir = RunDir.at(tmp_path)
    write_shards(run_dir, n_test=1_000)
    config = small_training_config(label=None)
    train(spark, config, run_dir)
    metrics = evaluate(spark, config, run_dir)

    assert metrics == read_json(run_dir.metrics)
    for key in ("rows", "positive_share", "model", "majority_baseline", "split", "label"):
        assert key in metrics
    # The keys MLflow tracking and earlier runs' readers know stay; the rest are added.
    assert {"accuracy", "roc_auc", "log_loss"} <= set(metrics["model"])
    assert {"precision", "recall", "f1", "pr_auc", "confusion_matrix", "calibration"} <= set(
        metrics["model"]
    )
    assert "comparison" not in metrics  # evaluate.compare is off by default
    assert run_dir.report.exists()
    assert metrics["model"]["accuracy"] > 0.9 and metrics["model"]["roc_auc"] > 0.95


def test_multiclass_trains_and_evaluates(spark, tmp_path):
    run_dir = RunDir.at(tmp_path)
    write_shards(run_dir, n_test=1_500, label_of=three_classes)
    config = small_training_config(label=MULTICLASS)
    report = train(spark, config, run_dir)

    assert report["task"] == "multiclass" and report["world_size"] == 2
    assert_ranks_identical(run_dir, report)
    first, last = report["epochs"][0], report["epochs"][-1]
    assert last["validation_loss"] < first["validation_loss"]
    assert last["validation_accuracy"] > 0.85  # chance is 1/3
    spec, state = load_model_files(run_dir.model)
    assert spec.classes == CLASSES and spec.n_outputs == 3
    assert model_from_bytes(spec, state)(torch.zeros(2, K)).shape == (2, 3)

    metrics = evaluate(spark, config, run_dir)
    model, baseline = metrics["model"], metrics["majority_baseline"]
    train_counts = np.bincount(split_labels(run_dir, "train").astype(int), minlength=3)
    assert baseline["predicts"] == CLASSES[int(np.argmax(train_counts))]
    assert model["accuracy"] > 0.85 and model["accuracy"] > baseline["accuracy"] + 0.3
    assert model["macro_f1"] > 0.8 and model["roc_auc"] > 0.95
    assert model["log_loss"] < baseline["log_loss"]
    counts = np.array(model["confusion_matrix"]["counts"])
    assert counts.sum() == metrics["rows"] == 1_500
    test_counts = np.bincount(split_labels(run_dir, "test").astype(int), minlength=3)
    np.testing.assert_array_equal(counts.sum(axis=1), test_counts)
    assert np.trace(counts) == round(model["accuracy"] * 1_500)

    with pytest.raises(RunDirError, match=r"holds a multiclass model.*rerun the 'train' stage"):
        evaluate(spark, small_training_config(label=None), run_dir)


def test_regression_trains_and_reports_in_the_targets_unit(spark, tmp_path):
    run_dir = RunDir.at(tmp_path)
    write_shards(run_dir, n_test=1_000, label_of=linear_target)
    config = small_training_config(label=REGRESSION)
    report = train(spark, config, run_dir)

    assert report["task"] == "regression"
    assert_ranks_identical(run_dir, report)
    spec, state = load_model_files(run_dir.model)
    y_train = split_labels(run_dir, "train").astype(np.float64)
    # The standardisation comes from the train split alone.
    assert spec.target_mean == pytest.approx(y_train.mean(), rel=1e-9)
    assert spec.target_std == pytest.approx(y_train.std(), rel=1e-6)
    assert report["target_mean"] == spec.target_mean
    first, last = report["epochs"][0], report["epochs"][-1]
    assert last["validation_rmse"] < first["validation_rmse"]
    assert last["validation_rmse"] < 0.3 * y_train.std()  # in the target's unit (std ~220)

    metrics = evaluate(spark, config, run_dir)
    model, baseline = metrics["model"], metrics["mean_baseline"]
    assert baseline["predicts"] == pytest.approx(y_train.mean(), rel=1e-6)
    assert model["r2"] > 0.9 and baseline["r2"] < 0.01
    # Predictions left on the standardised scale would be ~1000 off.
    assert model["rmse"] < 0.3 * baseline["rmse"] and model["rmse"] < 60
    test = spark.read.parquet(str(run_dir.shard("test")))
    predicted = score(test, spec, state).toPandas()
    assert abs(predicted["prediction"].mean() - predicted["label"].mean()) < 20


def test_labels_that_do_not_fit_the_task_are_refused_before_launch(spark, tmp_path):
    run_dir = RunDir.at(tmp_path)
    write_shards(run_dir, label_of=linear_target)
    with pytest.raises(TrainingError, match=r"label.task=multiclass expects class indices 0..2"):
        train(spark, small_training_config(label=MULTICLASS), run_dir)
    assert not run_dir.model.exists()


def test_a_constant_regression_target_is_refused(spark, tmp_path):
    run_dir = RunDir.at(tmp_path)
    write_shards(run_dir, label_of=lambda x, rng: np.full(len(x), 7.0))
    with pytest.raises(TrainingError, match=r"label 'y' is constant \(7.0\)"):
        train(spark, small_training_config(label=REGRESSION), run_dir)
