"""The jobs as a user runs them, on a sample of the real 2013 flights, in local[2]:
`python jobs/pipeline.py` for the whole path, then a stage under `spark-submit`."""

import sys
from pathlib import Path

import numpy as np
import pytest
from browser import assert_renders_with_images

from conftest import run_job
from sparknet.run_dir import read_json
from sparknet.train.data import iterate_rank
from sparknet.train.plan import ShardPlan

pytestmark = pytest.mark.slow


def test_every_flight_is_clean_or_rejected(pipeline_run):
    run_dir, n_rows, log, _ = pipeline_run
    quality = read_json(run_dir.quality)
    assert quality["rows_in"] == n_rows
    assert quality["rows_in"] == quality["clean"] + quality["rejected"]
    assert sum(quality["rejected_by_reason"].values()) == quality["rejected"]
    # Cancelled and diverted flights have no arr_delay: about 2.8% of 2013.
    assert 0.01 < quality["rejected_by_reason"]["missing_label"] / n_rows < 0.05
    for stage in ("ingest", "clean", "features", "shard", "train", "evaluate"):
        assert f"sparknet[{stage}] done: " in log


def test_pca_keeps_the_configured_variance(pipeline_run):
    run_dir, _, _, _ = pipeline_run
    pca = read_json(run_dir.pca)
    assert pca["variance_kept"] >= 0.95
    assert pca["k"] < pca["n_features_in"]
    assert pca["cumulative_explained_variance"][pca["k"] - 2] < 0.95  # k is the fewest


def test_ranks_read_every_shard_row_once_and_end_identical(pipeline_run):
    run_dir, _, _, _ = pipeline_run
    shards = read_json(run_dir.shards_manifest)
    n_train = shards["splits"]["train"]["rows"]
    plan = ShardPlan.from_json(read_json(run_dir.shard_plan)["train"])
    per_rank = [
        np.concatenate([ids for ids, _, _ in iterate_rank(plan, rank, 0, 13, shards["columns"])])
        for rank in (0, 1)
    ]
    np.testing.assert_array_equal(np.sort(np.concatenate(per_rank)), np.arange(n_train))

    report = read_json(run_dir.train_report)
    assert report["world_size"] == 2 and report["identical_weights"] is True
    assert all(e["samples"] == n_train for e in report["epochs"])
    assert report["epochs"][0]["rank_samples"] == [len(per_rank[0]), len(per_rank[1])]


def test_model_beats_the_majority_baseline(pipeline_run):
    run_dir, _, log, _ = pipeline_run
    metrics = read_json(run_dir.metrics)
    assert metrics["rows"] == read_json(run_dir.shards_manifest)["splits"]["test"]["rows"]
    assert metrics["model"]["roc_auc"] > 0.65
    assert metrics["model"]["log_loss"] < metrics["majority_baseline"]["log_loss"]
    assert "majority_baseline" in log and "roc_auc" in log


def test_comparison_table_has_every_model_on_the_test_split(pipeline_run):
    run_dir, _, log, _ = pipeline_run
    metrics = read_json(run_dir.metrics)
    comparison = metrics["comparison"]
    models = {m["name"].split(" (")[0]: m for m in comparison["models"]}
    assert set(models) == {
        "majority baseline",
        "sklearn LogisticRegression",
        "sklearn HistGradientBoostingClassifier",
        "Spark ML MultilayerPerceptronClassifier",
        "sparknet MLP [128, 64]",
    }
    assert comparison["test_rows"] == metrics["rows"]
    network = models["sparknet MLP [128, 64]"]
    assert network["roc_auc"] == pytest.approx(metrics["model"]["roc_auc"], rel=1e-12)
    for name, m in models.items():
        assert m["fit_seconds"] is not None and m["log_loss"] > 0, name
        if name != "majority baseline":
            assert m["roc_auc"] > 0.6, name
    assert "comparison on the test split" in log and "HistGradientBoostingClassifier" in log


def test_report_opens_in_chromium_with_its_images(pipeline_run, tmp_path):
    run_dir, _, _, _ = pipeline_run
    timings = read_json(run_dir.timings)
    # export runs after evaluate wrote the report, so only timings.json holds its seconds.
    assert list(timings) == ["ingest", "clean", "features", "shard", "train", "evaluate", "export"]
    page = run_dir.report.read_text()
    for stage in ("clean", "features", "shard", "train"):
        assert f"<td>{stage}</td>" in page
    assert "Spark ML MultilayerPerceptronClassifier" in page
    assert_renders_with_images(run_dir.report, tmp_path)


def test_stage_runs_unchanged_under_spark_submit(pipeline_run):
    run_dir, _, _, config_path = pipeline_run
    before = read_json(run_dir.metrics)
    spark_submit = Path(sys.executable).parent / "spark-submit"
    code, log = run_job(
        [
            str(spark_submit),
            "--master",
            "local[2]",
            "jobs/evaluate.py",
            "--config",
            str(config_path),
            "--run-dir",
            str(run_dir.root),
        ]
    )
    assert code == 0, log[-5000:]
    assert "master local[2]" in log
    after = read_json(run_dir.metrics)
    # approx compares flat mappings only; the confusion matrix holds exact counts.
    numbers = {k: v for k, v in before["model"].items() if isinstance(v, float)}
    assert {k: after["model"][k] for k in numbers} == pytest.approx(numbers, rel=1e-9)
    assert after["model"]["confusion_matrix"] == before["model"]["confusion_matrix"]


def test_bad_config_is_one_clear_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nsources: {}\n")
    code, log = run_job([sys.executable, "jobs/pipeline.py", "--config", str(bad)])
    assert code == 2
    assert "missing required key 'main'" in log
    assert "Traceback" not in log


def test_stage_without_its_input_names_the_stage_to_run(tmp_path):
    code, log = run_job(
        [
            sys.executable,
            "jobs/train.py",
            "--config",
            "conf/flights.yaml",
            "--run-dir",
            str(tmp_path),
        ]
    )
    assert code == 2
    assert "run the 'shard' stage first" in log
    assert "Traceback" not in log
