"""Barrier-mode DDP training in local[2] on a synthetic, learnable shard set."""

import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import small_training_config
from sparknet.errors import TrainingError
from sparknet.run_dir import RunDir, read_json, write_json
from sparknet.train.launcher import train
from sparknet.train.model import load_model_files, model_from_bytes

K = 4


W = np.array([1.5, -2.0, 0.5, 1.0], dtype=np.float32)


def linear_binary(x, rng):
    """y = 1 when w·x > 0 for a fixed w: a model that learns reaches high accuracy."""
    return (x @ W > 0).astype(np.float32)


def write_shards(
    run_dir: RunDir,
    n_train=3_001,
    n_validation=500,
    n_test=0,
    files=4,
    seed=0,
    label_of=linear_binary,
):
    """Shards of K standard-normal features and label_of(x, rng) as the float32 label;
    a test split only when n_test > 0."""
    rng = np.random.default_rng(seed)
    manifest = {
        "k": K,
        "columns": [f"pc_{i:03d}" for i in range(K)],
        "label": "label",
        "id": "sample_id",
        "splits": {},
    }
    sizes = {"train": n_train, "validation": n_validation, "test": n_test}
    for split, n in sizes.items():
        if not n:
            continue
        x = rng.normal(size=(n, K)).astype(np.float32)
        y = np.asarray(label_of(x, rng), dtype=np.float32)
        out = run_dir.shard(split)
        out.mkdir(parents=True)
        bounds = np.linspace(0, n, files + 1).astype(int)
        for f in range(files):
            lo, hi = bounds[f], bounds[f + 1]
            table = {"sample_id": np.arange(lo, hi, dtype=np.int64), "label": y[lo:hi]}
            table.update({c: x[lo:hi, i] for i, c in enumerate(manifest["columns"])})
            pq.write_table(pa.table(table), out / f"part-{f:05d}.parquet")
        manifest["splits"][split] = {"rows": n, "row_groups": files}
    write_json(run_dir.shards_manifest, manifest)
    return manifest


@pytest.fixture()
def shards(tmp_path):
    run_dir = RunDir.at(tmp_path)
    write_shards(run_dir)
    return run_dir


def test_two_ranks_train_to_identical_weights(spark, shards, caplog):
    caplog.set_level(logging.INFO, logger="sparknet")
    report = train(spark, small_training_config(workers=2), shards)

    assert report == read_json(shards.train_report)
    assert report["world_size"] == 2 and report["backend"] == "gloo"
    assert report["identical_weights"] is True
    assert report["torch_threads_per_rank"] == 1  # local[2], spark.task.cpus=1
    for epoch in report["epochs"]:
        assert epoch["samples"] == 3_001
        assert sum(epoch["rank_samples"]) == 3_001 and min(epoch["rank_samples"]) > 0
    first, last = report["epochs"][0], report["epochs"][-1]
    assert last["validation_loss"] < first["validation_loss"]
    assert last["validation_accuracy"] > 0.9

    spec, state = load_model_files(shards.model)
    model = model_from_bytes(spec, state)
    assert spec.columns == [f"pc_{i:03d}" for i in range(K)]
    with torch.no_grad():
        out = model(torch.zeros(3, K))
    assert out.shape == (3, 1)

    # The driver's progress: a line per epoch in the log, the history, the curves.
    epochs = len(report["epochs"])
    lines = [r.getMessage() for r in caplog.records]
    for n in range(1, epochs + 1):
        assert sum(line.startswith(f"epoch {n}/{epochs}: train loss") for line in lines) == 1
    # Each rank's own lines, logged again on the driver with its rank.
    relayed = {r.rank for r in caplog.records if r.name == "sparknet.train.worker"}
    assert relayed == {0, 1}
    history = [json.loads(line) for line in (shards.train_dir / "metrics.jsonl").open()]
    assert [r["type"] for r in history] == ["epoch"] * epochs + ["ranks"]
    for record, reported in zip(history, report["epochs"], strict=False):
        assert record["train_loss"] == pytest.approx(reported["train_loss"])
    ranks = history[-1]["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1] and history[-1]["ok"] is True
    assert sum(r["rows"] for r in ranks) == 3_001 * epochs
    assert all(r["steps"] == report["steps_per_epoch"] * epochs for r in ranks)
    assert all(r["samples_per_s"] > 0 and 0 <= r["data_wait_share"] < 1 for r in ranks)
    assert (shards.train_dir / "curves.png").stat().st_size > 1000


def test_one_rank_trains_too(spark, shards):
    report = train(spark, small_training_config(workers=1, epochs=2), shards)
    assert report["world_size"] == 1
    assert report["epochs"][-1]["samples"] == 3_001


def test_too_many_workers_fails_before_launch(spark, shards):
    with pytest.raises(TrainingError, match=r"train.workers=3 needs 3 concurrent task slots"):
        train(spark, small_training_config(workers=3), shards)


def test_shards_without_a_model_column_are_refused_before_launch(spark, shards):
    manifest = read_json(shards.shards_manifest)
    manifest["columns"] = manifest["columns"] + ["pc_missing"]
    write_json(shards.shards_manifest, manifest)
    with pytest.raises(
        TrainingError, match=r"part-00000.parquet lacks column\(s\) \['pc_missing'\]"
    ):
        train(spark, small_training_config(workers=2, timeout_s=30), shards)
    assert not (shards.model / "model.pt").exists()


def test_a_diverging_loss_stops_every_rank_with_a_hint(spark, shards):
    with pytest.raises(
        TrainingError, match=r"is not finite at epoch 0, step \d+ .*Lower train.learning_rate"
    ):
        train(
            spark,
            small_training_config(workers=2, epochs=2, optimizer="sgd", learning_rate=1e12),
            shards,
        )
