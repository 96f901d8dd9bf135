"""MLflow tracking against a local file store, read back through MlflowClient; and
nothing at all without a URI. No Spark: the run directory is written by hand."""

import json
import logging
import sys

import pytest

from conftest import epoch_record, small_training_config, synthetic_config_dict
from sparknet.config import config_from_dict
from sparknet.errors import ConfigError
from sparknet.run_dir import RunDir, write_json
from sparknet.tracking import after_stage

EPOCHS = 3


@pytest.fixture()
def run_dir(tmp_path):
    """What the stages up to evaluate leave behind, in miniature."""
    run = RunDir.at(tmp_path / "run")
    write_json(run.quality, {"reconciled": True, "sources": {"rows": {"rows_in": 10}}})
    write_json(run.pca, {"k": 3, "variance_kept": 0.97})
    write_json(run.shard_plan, {"train_digest": "abc123", "validation_digest": "def456"})
    epochs = [epoch_record(e) for e in range(EPOCHS)]
    write_json(
        run.train_report,
        {
            "task": "binary",
            "world_size": 2,
            "seconds": 9.0,
            "train_rows": 1000,
            "shard_plan_digest": "abc123",
            "steps_per_epoch": 8,
            "best_epoch": 2,
            "epochs": epochs,
        },
    )
    ranks = {"type": "ranks", "ranks": [], "ok": True}
    for rank, rate in ((0, 500.0), (1, 400.0)):
        ranks["ranks"].append({"rank": rank, "samples_per_s": rate, "data_wait_share": 0.1})
    (run.train_dir / "metrics.jsonl").write_text(json.dumps(ranks) + "\n")
    (run.train_dir / "curves.png").write_bytes(b"\x89PNG not really")
    run.model.mkdir()
    (run.model / "model.json").write_text('{"columns": ["pc_000"]}')
    (run.model / "model.pt").write_bytes(b"weights")
    write_json(
        run.metrics,
        {
            "rows": 100,
            "task": "binary",
            "model": {"accuracy": 0.9, "roc_auc": 0.95, "log_loss": 0.3},
            "majority_baseline": {"predicts": 0.0, "accuracy": 0.6, "roc_auc": 0.5},
        },
    )
    return run


@pytest.fixture()
def store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # MLflow 3 refuses its file store unless asked; a test needs no server.
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    return f"file://{tmp_path}/mlruns"


def hide_mlflow(monkeypatch) -> None:
    """As if mlflow were not installed, also after an earlier test imported it."""
    for name in [m for m in sys.modules if m == "mlflow" or m.startswith("mlflow.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "mlflow", None)


def tracked_config(uri: str, experiment: str = "sparknet-test"):
    data = synthetic_config_dict(train={"epochs": EPOCHS, "learning_rate": 0.01})
    data["tracking"] = {"mlflow_uri": uri, "experiment": experiment}
    return config_from_dict(data)


def test_train_and_evaluate_are_logged_to_one_run(run_dir, store):
    from mlflow.tracking import MlflowClient

    config = tracked_config(store)
    run_id = after_stage("train", config, run_dir)
    assert run_id and after_stage("evaluate", config, run_dir) == run_id
    assert after_stage("shard", config, run_dir) is None

    client = MlflowClient(tracking_uri=store)
    run = client.get_run(run_id)
    assert client.get_experiment(run.info.experiment_id).name == "sparknet-test"
    params = run.data.params
    assert params["train.learning_rate"] == "0.01" and params["train.epochs"] == str(EPOCHS)
    assert params["train.hidden"] == "[128, 64]" and params["split.key"] == '["id"]'
    assert params["sources.rows.columns.x1.type"] == "double"
    assert params["derived.pca_k"] == "3"
    assert params["derived.shard_plan_digest"] == "abc123"
    assert params["derived.validation_plan_digest"] == "def456"
    assert "path" not in params and "tracking.mlflow_uri" in params

    history = client.get_metric_history(run_id, "train_loss")
    assert sorted((m.step, round(m.value, 6)) for m in history) == [(0, 0.7), (1, 0.6), (2, 0.5)]
    assert len(client.get_metric_history(run_id, "validation_auc")) == EPOCHS
    assert [m.value for m in client.get_metric_history(run_id, "samples_per_s")] == [500.0] * 3
    metrics = run.data.metrics
    assert metrics["rank_1_samples_per_s"] == 400.0 and metrics["best_epoch"] == 2
    assert metrics["test_roc_auc"] == 0.95 and metrics["test_baseline_roc_auc"] == 0.5
    assert "test_baseline_predicts" in metrics  # numeric, so kept

    top = {a.path for a in client.list_artifacts(run_id)}
    assert {"quality.json", "pca.json", "train.json", "metrics.json", "model", "train"} <= top
    model = {a.path for a in client.list_artifacts(run_id, "model")}
    assert model == {"model/model.json", "model/model.pt"}
    local = client.download_artifacts(run_id, "quality.json", str(run_dir.root / "back"))
    assert json.loads(open(local).read())["reconciled"] is True
    assert "train/curves.png" in {a.path for a in client.list_artifacts(run_id, "train")}


def test_the_environment_variable_is_honoured(run_dir, store, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    run_id = after_stage("train", tracked_config(""), run_dir)
    assert MlflowClient(tracking_uri=store).get_run(run_id).data.params["derived.pca_k"] == "3"


def test_without_a_uri_nothing_is_logged_nor_imported(run_dir, tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # MLflow's default store would be ./mlruns or ./mlflow.db
    hide_mlflow(monkeypatch)  # any import of it would now fail loudly
    config = small_training_config()
    assert config.tracking.mlflow_uri == ""
    with caplog.at_level(logging.DEBUG, logger="sparknet"):
        for stage in ("train", "evaluate"):
            assert after_stage(stage, config, run_dir) is None
    assert caplog.records == []
    assert not (run_dir.train_dir / "mlflow.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_uri_without_mlflow_installed_warns_once(run_dir, store, monkeypatch, caplog):
    hide_mlflow(monkeypatch)
    assert after_stage("train", tracked_config(store), run_dir) is None
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "mlflow is not installed" in caplog.text


def test_an_unreachable_server_does_not_fail_the_stage(run_dir, monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    # Port 9 on loopback: nothing listens, the connection is refused at once.
    assert after_stage("train", tracked_config("http://127.0.0.1:9"), run_dir) is None
    assert "MLflow tracking at http://127.0.0.1:9 failed after the train stage" in caplog.text
    assert not (run_dir.train_dir / "mlflow.json").exists()


@pytest.mark.parametrize(
    "uri, words",
    [
        ("sqlite:///tmp/mlflow.db", "SQL stores need the full mlflow package"),
        ("file://relative/mlruns", "needs an absolute path"),
        ("http://host:5000 ", "contains whitespace"),
    ],
)
def test_bad_tracking_uris_are_refused_naming_the_key(uri, words):
    with pytest.raises(ConfigError, match="tracking.mlflow_uri") as info:
        tracked_config(uri)
    assert words in str(info.value)


def test_bad_experiment_and_environment_uri(run_dir, monkeypatch, caplog):
    with pytest.raises(ConfigError, match="tracking.experiment"):
        tracked_config("", experiment=" ")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "postgresql://db/mlflow")
    assert after_stage("train", tracked_config(""), run_dir) is None
    assert "environment variable MLFLOW_TRACKING_URI" in caplog.text
