"""Scoring with the run's artifact: the test split's raw flights, scored from scratch by
the predict path (library and jobs/predict.py), get the predictions the evaluate stage
computes for those rows; bad inputs give clear errors or rejects with reasons."""

import csv
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from pyspark.sql import functions as F

from conftest import evaluated_by_key, run_job
from sparknet.config import load_config
from sparknet.errors import DataError, RunDirError
from sparknet.export import CARD, SCORER, export
from sparknet.features import SPLIT
from sparknet.predict import load_artifact, network_for, predict
from sparknet.run_dir import read_json
from sparknet.shard import SAMPLE_ID, component_columns

pytestmark = pytest.mark.slow

TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def run(spark, pipeline_run):
    run_dir, _, _, config_path = pipeline_run
    config = load_config(config_path)
    if not run_dir.artifact.exists():
        # Rerunning evaluate (test_end_to_end does, under spark-submit) clears the
        # artifact: its card holds the metrics evaluate wrote.
        export(spark, config, run_dir)
    return run_dir, config


@pytest.fixture(scope="module")
def evaluated(spark, run):
    run_dir, config = run
    return evaluated_by_key(spark, run_dir, config)


@pytest.fixture(scope="module")
def test_split_raw(spark, run, flights_sample):
    """The raw flights (all columns as text, as in the file) whose key is in the test split."""
    run_dir, config = run
    raw_dir, _ = flights_sample
    key = list(config.split.key)
    raw = spark.read.option("header", "true").csv(str(raw_dir / "flights.csv"))
    features = spark.read.parquet(str(run_dir.features))
    test_keys = features.filter(F.col(SPLIT) == "test").select(*key)
    typed = raw.withColumns({f"_k_{c}": F.col(c).cast(features.schema[c].dataType) for c in key})
    on = [F.col(f"_k_{c}").eqNullSafe(test_keys[c]) for c in key]
    return typed.join(test_keys, on=on, how="left_semi").select(*raw.columns)


def joined_with_evaluate(evaluated, scored: pd.DataFrame, key: list[str]) -> pd.DataFrame:
    expected = evaluated
    scored = scored.astype({c: expected[c].dtype for c in key})
    return expected.merge(scored, on=key, suffixes=("_evaluate", "_predict"), validate="1:1")


def test_predict_reproduces_evaluate_row_by_row(spark, run, evaluated, test_split_raw):
    run_dir, config = run
    key = list(config.split.key)
    scored, rejects = predict(spark, config, run_dir, test_split_raw)
    scored = scored.toPandas()

    assert rejects.count() == 0
    assert len(scored) == test_split_raw.count() == len(evaluated)
    both = joined_with_evaluate(evaluated, scored, key)
    assert len(both) == len(scored)
    diff = np.abs(both["probability_evaluate"] - both["probability_predict"])
    assert diff.max() <= TOLERANCE
    np.testing.assert_array_equal(both["predicted_late"], both["probability_predict"] >= 0.5)


def predict_job(run, input_path, output) -> list[str]:
    run_dir, config = run
    return [
        sys.executable,
        "jobs/predict.py",
        "--config",
        str(config.path),
        "--run-dir",
        str(run_dir.root),
        "--input",
        str(input_path),
        "--output",
        str(output),
    ]


def test_predict_job_scores_files_and_rejects_bad_rows(run, evaluated, test_split_raw, tmp_path):
    run_dir, config = run
    key = list(config.split.key)
    rows = test_split_raw.toPandas()
    header = list(rows.columns)
    bad_month = rows.iloc[0].copy()
    bad_month["month"], bad_month["flight"] = "13", "999999"
    no_carrier = rows.iloc[1].copy()
    no_carrier["carrier"], no_carrier["flight"] = "NA", "999998"
    input_csv = tmp_path / "flights.csv"
    with open(input_csv, "w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(header)
        for _, row in pd.concat([rows, pd.DataFrame([bad_month, no_carrier])]).iterrows():
            writer.writerow(["NA" if v is None else v for v in row])
        fh.write("2013,1,1,517\n")  # a cut-off line: too few fields

    out = tmp_path / "scored"
    code, log = run_job(predict_job(run, input_csv, out))
    assert code == 0, log[-5000:]
    summary = read_json(out / "summary.json")
    assert summary["rows_in"] == len(rows) + 3
    assert summary["scored"] == len(rows)
    assert summary["rejected_by_reason"] == {
        "missing_value": 1,
        "out_of_range": 1,
        "wrong_field_count": 1,
    }
    assert summary["reconciled"] is True
    # Spark reuses its Python workers: local[2] runs at most two at a time.
    assert 1 <= summary["network_loads"] <= 2
    assert f"{len(rows) + 3} rows in: {len(rows)} scored, 3 rejected" in log

    rejects = pd.read_parquet(out / "rejects")
    by_reason = dict(zip(rejects["reason"], rejects["column"], strict=True))
    assert by_reason["out_of_range"] == "month" and by_reason["missing_value"] == "carrier"

    scored = pd.read_parquet(out / "scores")
    assert list(scored.columns) == [*key, "probability", "predicted_late"]
    both = joined_with_evaluate(evaluated, scored, key)
    assert len(both) == len(rows)
    assert np.abs(both["probability_evaluate"] - both["probability_predict"]).max() <= TOLERANCE


def test_predict_job_applies_set_and_refuses_a_different_scoring_config(run, tmp_path):
    """--set reaches the config predict scores with: a Spark setting is accepted, a
    changed split (a key that decides how a row is scored) is refused by name."""
    run_dir, _ = run
    base = predict_job(run, run_dir.raw, tmp_path / "scored")
    base += ["--set", "spark.conf.spark.sql.shuffle.partitions=3"]
    code, log = run_job([*base, "--set", "split.seed=14"])
    assert code != 0
    assert "differs from the one" in log and "['split']" in log, log[-3000:]
    assert not (tmp_path / "scored").exists()

    code, log = run_job([*base, "--set", "split.sed=14"])
    assert code != 0 and "split.sed" in log, log[-3000:]


def test_where_the_training_files_were_does_not_decide_scoring(run):
    """A config that reads its training data from elsewhere scores the same; one that
    cleans a column otherwise is refused, naming the section."""
    run_dir, config = run
    main = config.main
    elsewhere = load_config(config.path, [f"sources.{main}.path=/data/2014/{main}.csv"])
    # Accepted, and scoring goes on with the config the run was trained with.
    assert load_artifact(run_dir, elsewhere).config.sources[main].path == (
        config.sources[main].path
    )
    stricter = load_config(config.path, [f"sources.{main}.columns.distance.max=100"])
    with pytest.raises(RunDirError, match=r"differs from the one .* in \['sources'\]"):
        load_artifact(run_dir, stricter)


def test_missing_column_is_named(spark, run, test_split_raw):
    run_dir, config = run
    with pytest.raises(DataError, match=r"no column\(s\) \['distance'\]"):
        predict(spark, config, run_dir, test_split_raw.drop("distance"))


def test_optional_column_may_be_absent(spark, run, test_split_raw):
    """The label's input is not known when a flight is scored before it flies."""
    run_dir, config = run
    scored, _ = predict(spark, config, run_dir, test_split_raw.drop("arr_delay", "arr_time"))
    assert "probability" in scored.columns


def test_mistyped_column_is_named(spark, run, test_split_raw):
    run_dir, config = run
    bad = test_split_raw.withColumn("distance", F.col("distance") > 100)
    with pytest.raises(DataError, match="'distance' is boolean, but .*distance is double"):
        predict(spark, config, run_dir, bad)


def test_typed_input_scores_like_text(spark, run, evaluated, test_split_raw):
    run_dir, config = run
    key = list(config.split.key)
    typed = test_split_raw.withColumns(
        {"distance": F.col("distance").cast("double"), "month": F.col("month").cast("int")}
    )
    scored, _ = predict(spark, config, run_dir, typed)
    both = joined_with_evaluate(evaluated, scored.toPandas(), key)
    assert len(both) == len(evaluated)
    assert np.abs(both["probability_evaluate"] - both["probability_predict"]).max() <= TOLERANCE


def test_artifact_card_and_torchscript(spark, run, evaluated):
    run_dir, config = run
    root = run_dir.artifact
    card = read_json(root / CARD)
    pca = read_json(run_dir.pca)
    assert card["pca"]["k"] == pca["k"]
    assert card["features"]["names"] == pca["feature_names"]
    assert card["test_metrics"] == read_json(run_dir.metrics)
    assert card["versions"]["torch"].startswith("2.13")
    assert len(card["config_sha256"]) == 64
    columns = {c["name"]: c for c in card["input"]["columns"]}
    assert columns["distance"] == {
        "name": "distance",
        "type": "double",
        "required": True,
        "min": 0,
        "nullable": False,
    }
    assert columns["arr_delay"]["required"] is False
    assert card["input"]["id"] == list(config.split.key)

    # The network reads the k components, then the appended target encodings.
    inputs = card["network"]["inputs"]
    assert inputs[: pca["k"]] == component_columns(pca["k"])
    assert len(inputs) == pca.get("n_features_out", pca["k"])

    # TorchScript alone (no sparknet model code) gives evaluate's probabilities.
    scorer = torch.jit.load(str(root / "network" / SCORER))
    test = spark.read.parquet(str(run_dir.shard("test"))).toPandas()
    x = torch.from_numpy(test[inputs].to_numpy(np.float32))
    with torch.no_grad():
        p = scorer(x).numpy()
    expected = evaluated
    by_id = expected.set_index(SAMPLE_ID).loc[test[SAMPLE_ID], "probability"].to_numpy()
    assert np.abs(p - by_id).max() <= TOLERANCE
    # The state dict loads without unpickling arbitrary objects.
    state = torch.load(root / "network" / "model.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())


def test_network_loads_once_per_worker():
    """network_for caches by the artifact's digest in the worker process."""
    from sparknet.predict import _NETWORKS
    from sparknet.train.model import ModelSpec, build_mlp, state_to_bytes

    class Counter:
        value = 0

        def add(self, n):
            self.value += n

    class Broadcast:
        def __init__(self, value):
            self.value = value

    spec = ModelSpec(columns=["a", "b"], hidden=[3], activation="relu", dropout=0.0)
    state = Broadcast(state_to_bytes(build_mlp(spec)))
    loads = Counter()
    _NETWORKS.pop("digest-x", None)
    first = network_for(spec, "digest-x", state, loads)
    assert network_for(spec, "digest-x", state, loads) is first
    assert loads.value == 1
