"""Driver side of training: check the cluster can host the barrier stage, launch one
barrier task per rank, verify what the ranks report, save the model.
"""

from __future__ import annotations

import logging
import math
import re
import shutil
import time

from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from sparknet.config import Config
from sparknet.errors import TrainingError
from sparknet.run_dir import RunDir, read_json, write_json
from sparknet.shard import LABEL
from sparknet.train.model import ModelSpec, load_model_files, model_from_bytes
from sparknet.train.worker import TaskSpec, run_rank, validation_summary, weights_digest

log = logging.getLogger(__name__)

LOSSES = {
    "binary": "binary cross-entropy on the logit",
    "multiclass": "cross-entropy over the class logits",
    "regression": "mean squared error of the standardised target",
}


def label_summary(spark: SparkSession, path: str) -> dict:
    """One pass over a split's shards: rows, mean, population std, min, max of the label,
    and how many labels are not whole numbers (class indices must be)."""
    label = F.col(LABEL).cast("double")
    row = (
        spark.read.parquet(path)
        .agg(
            F.count(label).alias("rows"),
            F.avg(label).alias("mean"),
            F.stddev_pop(label).alias("std"),
            F.min(label).alias("min"),
            F.max(label).alias("max"),
            F.sum((label != F.floor(label)).cast("long")).alias("fractional"),
        )
        .first()
    )
    return row.asDict()


def check_labels(config: Config, split: str, summary: dict) -> None:
    """Refuses labels that do not fit label.task, which happens when the config changed
    after the clean and shard stages ran; inside the tasks it would surface as an index
    error or a silently wrong loss."""
    task, n = config.label.task, summary["rows"]
    if not n:
        raise TrainingError(f"the {split} shards hold no labels; rerun the shard stage")
    low, high = summary["min"], summary["max"]
    if not (math.isfinite(low) and math.isfinite(high)):
        raise TrainingError(
            f"the {split} shards hold a non-finite label (min {low}, max {high}); the label is "
            "stored as float32, so a value beyond ±3.4e38 overflows: rescale label.expr"
        )
    if task == "regression":
        return
    n_classes = 2 if task == "binary" else len(config.label.classes)
    if summary["fractional"] or low < 0 or high > n_classes - 1:
        raise TrainingError(
            f"label.task={task} expects class indices 0..{n_classes - 1} in the {split} "
            f"shards, found labels from {low} to {high} ({summary['fractional']} not whole); "
            "rerun the clean, features and shard stages with this config"
        )


def build_model_spec(config: Config, columns: list[str], train_labels: dict) -> ModelSpec:
    t, label = config.train, config.label
    spec = {
        "columns": list(columns),
        "hidden": list(t.hidden),
        "activation": t.activation,
        "dropout": t.dropout,
        "task": label.task,
    }
    if label.task == "multiclass":
        spec.update(n_outputs=len(label.classes), classes=list(label.classes))
    elif label.task == "regression":
        # min == max, not std == 0: Spark's stddev of equal values can round to ~1e-16.
        if train_labels["min"] == train_labels["max"]:
            raise TrainingError(
                f"label.task=regression but the train split's label '{label.name}' is constant "
                f"({train_labels['mean']}): there is nothing to learn; check label.expr"
            )
        spec.update(target_mean=float(train_labels["mean"]), target_std=float(train_labels["std"]))
    return ModelSpec(**spec)


def task_spec(config: Config, run_dir: RunDir, model: ModelSpec) -> TaskSpec:
    t = config.train
    return TaskSpec(
        train_path=str(run_dir.shard("train")),
        model_path=str(run_dir.model),
        validation_path=str(run_dir.shard("validation")),
        model=model,
        optimizer=t.optimizer,
        learning_rate=t.learning_rate,
        weight_decay=t.weight_decay,
        epochs=t.epochs,
        batch_size=t.batch_size,
        seed=t.seed,
        device=t.device,
        prefetch_row_groups=t.prefetch_row_groups,
        timeout_s=t.timeout_s,
    )


def preflight(spark: SparkSession, workers: int, device: str, manifest: dict) -> None:
    """Refuse now, with the knob to change, what would otherwise fail inside the tasks
    or leave a barrier stage waiting for slots."""
    sc = spark.sparkContext
    conf = sc.getConf()
    if device == "cuda" and not conf.get("spark.task.resource.gpu.amount", None):
        raise TrainingError(
            "train.device=cuda but spark.task.resource.gpu.amount is not set: Spark would "
            "give the training tasks no GPU; set it (and the executor GPU resources) or use "
            "train.device=auto"
        )
    if conf.get("spark.dynamicAllocation.enabled", "false").lower() == "true":
        raise TrainingError(
            "spark.dynamicAllocation.enabled=true: Spark refuses barrier stages with dynamic "
            "allocation; disable it for the training job"
        )
    task_cpus = int(conf.get("spark.task.cpus", "1"))
    slots = sc.defaultParallelism // task_cpus
    if workers > slots:
        raise TrainingError(
            f"train.workers={workers} needs {workers} concurrent task slots, but master "
            f"{sc.master} offers {slots} ({sc.defaultParallelism} cores / spark.task.cpus="
            f"{task_cpus}); lower train.workers or add cores"
        )


def python_error(exc: Exception) -> str:
    """The useful part of a failed Spark job's message: the Python exception from the task."""
    text = str(exc)
    found = re.findall(r"(sparknet\.errors\.\w+: .*?)(?:\n\s+at |\Z)", text, flags=re.S)
    if found:
        return found[-1].strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return "\n".join(lines[-15:])


def train(spark: SparkSession, config: Config, run_dir: RunDir) -> dict:
    manifest = read_json(run_dir.require(run_dir.shards_manifest, "shard"))
    columns = manifest["columns"]
    workers = config.train.workers
    preflight(spark, workers, config.train.device, manifest)
    # A model left by an earlier run must not pass for this one's if training fails.
    shutil.rmtree(run_dir.model, ignore_errors=True)
    # The regression target's mean/std come from the train split alone, computed once
    # here and shipped in the spec, so every rank standardises with the same numbers.
    train_labels = label_summary(spark, str(run_dir.shard("train")))
    check_labels(config, "train", train_labels)
    check_labels(config, "validation", label_summary(spark, str(run_dir.shard("validation"))))
    model_spec = build_model_spec(config, columns, train_labels)
    spec = task_spec(config, run_dir, model_spec)

    def run(_partition):
        yield run_rank(spec)

    started = time.perf_counter()
    log.info(
        "launching %d barrier tasks (one torch rank each), %d epochs", workers, config.train.epochs
    )
    sc = spark.sparkContext
    sc.setJobDescription(f"sparknet train: {workers} ranks")
    try:
        results = sc.parallelize(range(workers), workers).barrier().mapPartitions(run).collect()
    except Exception as exc:
        raise TrainingError(f"training failed: {python_error(exc)}") from None
    finally:
        sc.setJobDescription(None)
    seconds = time.perf_counter() - started
    results.sort(key=lambda r: r["rank"])

    digests = {r["rank"]: r["weights_digest"] for r in results}
    if len(set(digests.values())) != 1:
        raise TrainingError(f"ranks finished with different weights: {digests}")
    n_train = manifest["splits"]["train"]["rows"]
    history = results[0]["history"]
    for record in history:
        _check_coverage(record, n_train)
        record["rank_samples"] = [r["history"][record["epoch"]]["rank_samples"] for r in results]

    # Rank 0 wrote the model; what is on disk must be what every rank ended with.
    saved_spec, state = load_model_files(run_dir.model)
    saved_digest = weights_digest(model_from_bytes(saved_spec, state))
    if saved_spec != model_spec or saved_digest != digests[0]:
        raise TrainingError(
            f"{run_dir.model} does not hold the trained weights (digest {saved_digest}, "
            f"ranks {digests[0]})"
        )
    report = {
        "world_size": results[0]["world_size"],
        "backend": results[0]["backend"],
        "torch_threads_per_rank": results[0]["torch_threads"],
        "identical_weights": True,
        "weights_digest": digests[0],
        "rank_weights_digests": [r["weights_digest"] for r in results],
        "seconds": seconds,
        "train_rows": n_train,
        "task": model_spec.task,
        "loss": LOSSES[model_spec.task],
        "epochs": history,
    }
    if model_spec.task == "regression":
        report["target_mean"] = model_spec.target_mean
        report["target_std"] = model_spec.target_std
    write_json(run_dir.train_report, report)
    log.info(
        "trained %d epochs on %d ranks in %.1f s: %s; weights identical on all ranks",
        len(history),
        report["world_size"],
        seconds,
        validation_summary(model_spec.task, history[-1]),
    )
    return report


def _check_coverage(record: dict, n: int) -> None:
    """Dense ids 0..n-1: count n, sum n(n-1)/2, sum of squares (n-1)n(2n-1)/6."""
    expected = (n, n * (n - 1) / 2, (n - 1) * n * (2 * n - 1) / 6)
    got = (record["samples"], record["sample_id_sum"], record["sample_id_square_sum"])
    if got[0] != expected[0] or any(
        abs(g - e) > 1e-9 * max(e, 1) for g, e in zip(got[1:], expected[1:], strict=True)
    ):
        raise TrainingError(
            f"epoch {record['epoch']}: the ranks together did not see each of the {n} train "
            f"samples exactly once (count, id sum, id square sum = {got}, expected {expected})"
        )
