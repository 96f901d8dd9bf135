"""Records runs in MLflow, when a tracking URI is configured (`tracking.mlflow_uri`, else
the MLFLOW_TRACKING_URI environment variable); without one nothing here imports mlflow.

After the train stage a new MLflow run (in experiment `tracking.experiment`) gets:
- params: the effective config flattened (`train.learning_rate`, `pca.variance`, ...),
  and what the stages derived from it (`derived.pca_k`, `derived.shard_plan_digest`, ...);
- metrics per epoch (MLflow step = epoch): losses, validation metrics, learning rate,
  samples/s, data wait; and each rank's throughput from train/metrics.jsonl;
- artifacts: quality.json, feature_quality.json, pca.json, pca_scree.png, train.json,
  train/ (plan, history, curves) and the model folder under `model/`.
The run id is kept in train/mlflow.json, so that the evaluate stage, in the same job or
in a later one (Airflow runs stages as separate tasks), adds the test metrics
(`test_roc_auc`, `test_baseline_roc_auc`, ...) and metrics.json to the same run.

Tracking is a copy of what the run directory already holds: when the tracking server
cannot be reached the stage still succeeds, with one warning that says so.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import time
from pathlib import Path

from sparknet.config import Config, check_mlflow_uri
from sparknet.errors import ConfigError
from sparknet.run_dir import RunDir, read_json, write_json
from sparknet.train.progress import METRICS_FILE

log = logging.getLogger(__name__)

ENV_URI = "MLFLOW_TRACKING_URI"
RUN_FILE = "mlflow.json"
# MLflow's own limits: params and metrics per log_batch call, characters per param value.
PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 1000
PARAM_VALUE_CHARS = 6000
EPOCH_METRICS = (
    "train_loss",
    "validation_loss",
    "validation_accuracy",
    "validation_auc",
    "validation_rmse",
    "learning_rate",
    "samples_per_s",
    "seconds",
    "data_wait_seconds",
)


def tracking_uri(config: Config) -> str:
    """The URI to log to, or "" for no tracking. The config's key wins over the
    environment, which is shared with every other tool on the machine."""
    if config.tracking.mlflow_uri:
        return config.tracking.mlflow_uri
    uri = os.environ.get(ENV_URI, "").strip()
    if uri:
        check_mlflow_uri(f"environment variable {ENV_URI}", uri)
    return uri


def after_stage(stage: str, config: Config, run_dir: RunDir) -> str | None:
    """Logs what `stage` produced, if tracking is on; returns the MLflow run id."""
    if stage not in ("train", "evaluate"):
        return None
    try:
        uri = tracking_uri(config)
    except ConfigError as exc:
        log.warning("MLflow tracking is off: %s", exc)
        return None
    if not uri:
        return None
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        log.warning(
            "tracking.mlflow_uri / %s is set but mlflow is not installed; install "
            "requirements.lock (it pins mlflow-skinny)",
            ENV_URI,
        )
        return None
    try:
        client = MlflowClient(tracking_uri=uri)
        if stage == "train":
            return log_training(client, config, run_dir, uri)
        return log_evaluation(client, run_dir)
    except Exception as exc:  # tracking must not fail a stage whose outputs are written
        log.warning(
            "MLflow tracking at %s failed after the %s stage: %s; every output is in %s",
            uri,
            stage,
            str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
            run_dir.root,
        )
        log.debug("MLflow failure", exc_info=True)
        return None


def log_training(client, config: Config, run_dir: RunDir, uri: str) -> str:
    from mlflow.entities import Metric, Param

    experiment = client.get_experiment_by_name(config.tracking.experiment)
    experiment_id = (
        experiment.experiment_id
        if experiment is not None
        else client.create_experiment(config.tracking.experiment)
    )
    report = read_json(run_dir.train_report)
    run = client.create_run(
        experiment_id,
        run_name=f"{config.name} {run_dir.root.name}",
        # The run is logged once training ended; its span in MLflow is the training's.
        start_time=int((time.time() - report["seconds"]) * 1000),
        tags={
            "sparknet.run_dir": str(run_dir.root),
            "sparknet.config": config.path,
            "sparknet.task": report["task"],
        },
    )
    run_id = run.info.run_id
    params = {**flatten_config(config), **derived_params(run_dir, report)}
    now = int(time.time() * 1000)
    metrics = [
        Metric(key, float(value), now, step)
        for key, value, step in epoch_metrics(report, run_dir.train_dir / METRICS_FILE)
    ]
    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), PARAMS_PER_BATCH):
        client.log_batch(run_id, params=items[i : i + PARAMS_PER_BATCH])
    for i in range(0, len(metrics), METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=metrics[i : i + METRICS_PER_BATCH])

    for path in (
        run_dir.quality,
        run_dir.feature_quality,
        run_dir.pca,
        run_dir.pca_scree,
        run_dir.train_report,
    ):
        if path.exists():
            client.log_artifact(run_id, str(path))
    for folder, name in ((run_dir.train_dir, "train"), (run_dir.model, "model")):
        if folder.is_dir():
            client.log_artifacts(run_id, str(folder), artifact_path=name)
    client.set_terminated(run_id, "FINISHED")
    # Written after the artifacts, so the train folder's copy in MLflow does not hold it.
    write_json(run_dir.train_dir / RUN_FILE, {"tracking_uri": uri, "run_id": run_id})
    log.info(
        "MLflow: run %s in experiment '%s' at %s (%d params, %d metric values)",
        run_id,
        config.tracking.experiment,
        uri,
        len(params),
        len(metrics),
    )
    return run_id


def log_evaluation(client, run_dir: RunDir) -> str | None:
    """Adds the test metrics to the run the train stage logged, if it logged one."""
    from mlflow.entities import Metric

    saved = run_dir.train_dir / RUN_FILE
    if not saved.exists():
        log.info("MLflow: the train stage logged no run; the test metrics are not tracked")
        return None
    run_id = read_json(saved)["run_id"]
    metrics = read_json(run_dir.metrics)
    now = int(time.time() * 1000)
    values = []
    for part, prefix in (
        ("model", "test_"),
        ("majority_baseline", "test_baseline_"),
        ("mean_baseline", "test_baseline_"),
    ):
        for key, value in metrics.get(part, {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                values.append(Metric(prefix + key, float(value), now, 0))
    client.log_batch(run_id, metrics=values)
    client.log_artifact(run_id, str(run_dir.metrics))
    log.info("MLflow: %d test metrics added to run %s", len(values), run_id)
    return run_id


def flatten_config(config: Config) -> dict[str, str]:
    """`train.schedule.name` -> "cosine": every value the config sets or defaults to,
    lists as JSON. Unset ones (None, "", [], {}) are left out: a dataset's column list
    would otherwise be hundreds of `format: ""` and `values: []`."""
    flat: dict[str, str] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), inner)
        elif value is None or value == "" or value == []:
            return
        elif isinstance(value, bool):
            flat[prefix] = "true" if value else "false"
        elif isinstance(value, (list, tuple)):
            flat[prefix] = json.dumps(value)
        else:
            flat[prefix] = str(value)

    data = dataclasses.asdict(config)
    data.pop("path")
    walk("", data)
    return {_param_key(k): v[:PARAM_VALUE_CHARS] for k, v in flat.items()}


def _param_key(key: str) -> str:
    """MLflow keys allow letters, digits, _ - . space and /; dataset keys may hold more."""
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", key)


def derived_params(run_dir: RunDir, report: dict) -> dict[str, str]:
    """What the stages chose from the config: PCA's k and the plans that fixed each
    rank's rows, which two runs must share to be compared step by step."""
    params = {
        "derived.shard_plan_digest": report["shard_plan_digest"],
        "derived.steps_per_epoch": str(report["steps_per_epoch"]),
        "derived.train_rows": str(report["train_rows"]),
        "derived.world_size": str(report["world_size"]),
    }
    if run_dir.shard_plan.exists():
        params["derived.validation_plan_digest"] = read_json(run_dir.shard_plan)[
            "validation_digest"
        ]
    if run_dir.pca.exists():
        pca = read_json(run_dir.pca)
        params["derived.pca_k"] = str(pca["k"])
        params["derived.pca_variance_kept"] = str(pca["variance_kept"])
    return params


def epoch_metrics(report: dict, history_path: Path) -> list[tuple[str, float, int]]:
    """(key, value, step): train.json's history per epoch, then per-rank throughput and
    the best epoch once."""
    values = []
    for record in report["epochs"]:
        record = {**record, "samples_per_s": record["samples"] / max(record["seconds"], 1e-9)}
        for key in EPOCH_METRICS:
            if record.get(key) is not None:
                values.append((key, record[key], record["epoch"]))
    if report["best_epoch"] is not None:
        values.append(("best_epoch", report["best_epoch"], 0))
    values.append(("train_seconds", report["seconds"], 0))
    if history_path.exists():
        for line in history_path.read_text().splitlines():
            entry = json.loads(line)
            if entry.get("type") != "ranks":
                continue
            for rank in entry["ranks"]:
                for key in ("samples_per_s", "data_wait_share"):
                    if rank[key] is not None:
                        values.append((f"rank_{rank['rank']}_{key}", rank[key], 0))
    return values
