"""Driver side of training: check the cluster can host the barrier stage, launch one
barrier task per rank, verify what the ranks report, save the model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import shutil
import socket
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from sparknet.config import Config
from sparknet.errors import TrainingError
from sparknet.run_dir import RunDir, read_json, spark_path, write_json
from sparknet.shard import LABEL, SAMPLE_ID
from sparknet.train import checkpoint
from sparknet.train.events import EventServer
from sparknet.train.model import ModelSpec, load_model_files, model_from_bytes
from sparknet.train.plan import ShardPlan, make_plan, read_row_groups
from sparknet.train.progress import Progress
from sparknet.train.worker import ID_MODULUS, TaskSpec, run_rank, validation_summary, weights_digest

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
        spark.read.parquet(spark_path(path))
        .agg(
            F.count(label).alias("rows"),
            F.sum((label.isNull() | F.isnan(label)).cast("long")).alias("nulls"),
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
    if summary["nulls"]:
        raise TrainingError(
            f"the {split} shards hold {summary['nulls']} null or NaN labels; the clean stage "
            "rejects those: rerun the clean, features and shard stages"
        )
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
        "batch_norm": t.batch_norm,
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


def preflight(spark: SparkSession, workers: int, device: str) -> None:
    """Refuse now, with the knob to change, what would otherwise fail inside the tasks
    or leave a barrier stage waiting for slots."""
    sc = spark.sparkContext
    conf = sc.getConf()
    gpus_per_task = conf.get("spark.task.resource.gpu.amount", None)
    if device == "cpu" and gpus_per_task:
        log.warning(
            "train.device=cpu but spark.task.resource.gpu.amount=%s: the training tasks "
            "hold GPUs they will not use",
            gpus_per_task,
        )
    if device == "cuda" and not gpus_per_task:
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
    # Executors register with the driver after the application starts: give them what is
    # left of Spark's own registration window, counted from the application's start, so
    # that a train stage run right after the session starts does not count too early,
    # and one run later (after the other stages) does not wait at all.
    started_s = sc.startTime / 1000
    window_s = registration_window_s(sc)
    slots = wait_for_slots(sc, workers, max(0.0, started_s + window_s - time.time()))
    if workers > slots:
        task_cpus = int(conf.get("spark.task.cpus", "1"))
        waited = (
            ""
            if is_local(sc)
            else f" {time.time() - started_s:.0f} s after the application started (executors "
            f"had spark.scheduler.maxRegisteredResourcesWaitingTime={window_s:g} s to register)"
        )
        raise TrainingError(
            f"train.workers={workers} needs {workers} concurrent task slots, but master "
            f"{sc.master} offers {slots} (the registered executors' cores / "
            f"spark.task.cpus={task_cpus}){waited}; lower train.workers or add cores"
        )


def is_local(sc) -> bool:
    return sc.master.startswith("local")


def task_slots(sc) -> int:
    """Tasks of the training stage the cluster can run at once, counted the way Spark's
    own barrier check counts them: the registered executors' cores (and other task
    resources) over what one task takes. Not `defaultParallelism`: on a cluster that is
    never below 2, and it counts cores, not slots."""
    jsc = sc._jsc.sc()
    profile = jsc.resourceProfileManager().defaultResourceProfile()
    return int(jsc.maxNumConcurrentTasks(profile))


def registration_window_s(sc) -> float:
    """How long Spark itself may wait for executors to register before it schedules
    (spark.scheduler.maxRegisteredResourcesWaitingTime, 30 s by default); nothing in
    local mode, whose slots exist from the start."""
    if is_local(sc):
        return 0.0
    key = "spark.scheduler.maxRegisteredResourcesWaitingTime"
    return sc._jsc.sc().conf().getTimeAsMs(key, "30s") / 1000


# How often the driver counts the registered executors while it waits for them.
SLOT_POLL_S = 0.25


def wait_for_slots(sc, wanted: int, within_s: float) -> int:
    """The task slots, as soon as there are `wanted` of them, or what there is after
    `within_s`."""
    deadline = time.monotonic() + within_s
    while True:
        slots = task_slots(sc)
        if slots >= wanted or time.monotonic() >= deadline:
            return slots
        time.sleep(SLOT_POLL_S)


def python_error(exc: Exception) -> str:
    """The useful part of a failed Spark job's message: the Python exception from the task."""
    text = str(exc)
    found = re.findall(r"(sparknet\.errors\.\w+: .*?)(?:\n\s+at |\Z)", text, flags=re.S)
    if found:
        return found[-1].strip()
    # No Python exception: an executor went away (killed, out of memory, its node lost).
    lost = re.search(r"ExecutorLostFailure \(.*", text)
    if lost:
        return lost.group(0).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return "\n".join(lines[-15:])


# The validation split is only scored: a large batch, no step constraint.
VALIDATION_BATCH = 8192


def make_plans(
    config: Config, run_dir: RunDir, workers: int | None = None
) -> tuple[ShardPlan, ShardPlan]:
    """The train and validation plans from the shards' footers, written to plan.json."""
    t = config.train
    workers = workers or t.workers
    plans = (
        make_plan(
            read_row_groups(run_dir.shard("train")),
            workers,
            t.batch_size,
            min_batch=2 if t.batch_norm else 1,
        ),
        make_plan(
            read_row_groups(run_dir.shard("validation")),
            workers,
            VALIDATION_BATCH,
            where=f"the validation split ({run_dir.shard('validation')})",
        ),
    )
    write_json(
        run_dir.shard_plan,
        {
            "seed": t.seed,
            "train": plans[0].to_json(),
            "validation": plans[1].to_json(),
            "train_digest": plans[0].digest,
            "validation_digest": plans[1].digest,
        },
    )
    return plans


def check_shard_columns(plan: ShardPlan, wanted: list[str]) -> None:
    """Every file the ranks will read holds the columns the model reads: found here, a
    mismatch is one message naming the file; found in a task, an AttributeError."""
    for path in sorted({g.path for g in plan.groups}):
        names = set(pq.read_schema(path).names)
        missing = [c for c in wanted if c not in names]
        if missing:
            raise TrainingError(
                f"{path} lacks column(s) {missing} that shards.json lists; rerun the shard stage"
            )


# train settings that may change between launches of one training without changing what
# a checkpoint holds: a relaunch after a lost executor may have fewer workers.
LAUNCH_SETTINGS = (
    "workers",
    "timeout_s",
    "max_attempts",
    "checkpoint",
    "fault",
    "device",
    "prefetch_row_groups",
)


def fingerprint(config: Config, manifest: dict) -> str:
    """What a checkpoint or a finished training belongs to: the training config (less
    LAUNCH_SETTINGS), the label, and the shards."""
    t = dataclasses.asdict(config.train)
    for key in LAUNCH_SETTINGS:
        t.pop(key)
    content = {"train": t, "label": dataclasses.asdict(config.label), "shards": manifest}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def resume_point(directory: str, fingerprint_: str, workers: int) -> tuple[str, dict] | None:
    """The latest checkpoint of this run; with another world size only one taken at an
    epoch boundary, since the plan (and so the mid-epoch position) depends on it."""
    found = checkpoint.latest(directory, fingerprint_)
    if found and found[1]["world_size"] != workers and found[1]["step"] != 0:
        found = checkpoint.latest(directory, fingerprint_, epoch_boundary=True)
    return found


def relaunch_workers(spark: SparkSession, wanted: int) -> int:
    """Ranks for a relaunch: as many as wanted when the slots are there, fewer when
    executors were lost (the shards are re-planned for them)."""
    sc = spark.sparkContext
    # A lost executor is replaced by the cluster manager (a standalone worker launches a
    # new one within seconds): wait for it as long as Spark waits for executors at start.
    slots = wait_for_slots(sc, wanted, registration_window_s(sc))
    if slots < 1:
        raise TrainingError("no task slots left to relaunch training on")
    if slots < wanted:
        log.warning("only %d task slots left: relaunching with %d ranks", slots, slots)
    return min(wanted, slots)


def _position(found: tuple[str, dict] | None) -> dict | None:
    if found is None:
        return None
    state = found[1]
    return {"path": found[0], "epoch": state["epoch"], "step": state["step"]}


def driver_address(spark: SparkSession) -> tuple[str, str]:
    """(address executors use to reach the driver, address to bind on the driver)."""
    conf = spark.sparkContext.getConf()
    host = conf.get("spark.driver.host", None) or "127.0.0.1"
    return host, conf.get("spark.driver.bindAddress", None) or host


# How long a cancelled job may take to end before the driver stops waiting for it.
CANCEL_WAIT_S = 60.0
# How long a failed job's ranks may take to report their end before the driver says why
# it failed.
RANKS_END_WAIT_S = 10.0


def run_barrier(
    spark: SparkSession,
    spec: TaskSpec,
    events: EventServer,
    timeout_s: float,
    ranks_file: Path | None = None,
):
    """Runs one barrier task per rank and waits for them, never longer than `timeout_s`
    without progress from some rank: then the job is cancelled (Spark kills the tasks
    and their Python workers) and the error says which rank stalled where."""
    sc = spark.sparkContext
    workers = spec.train_plan.world_size
    group = f"sparknet-train-{events.token[:8]}"
    outcome: dict = {}

    def run(_partition):
        yield run_rank(spec)

    def job() -> None:
        sc.setJobGroup(group, f"sparknet train: {workers} ranks", interruptOnCancel=True)
        try:
            rdd = sc.parallelize(range(workers), workers).barrier().mapPartitions(run)
            outcome["results"] = rdd.collect()
        except Exception as exc:  # handed to the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=job, name="sparknet-train-job", daemon=True)
    thread.start()
    stalled = None
    while thread.is_alive():
        thread.join(timeout=1.0)
        if ranks_file is not None and len(events.ranks) == workers:
            # Which process is which rank, for whoever has to look at (or kill) one.
            ranks = events.snapshot().values()
            write_json(
                ranks_file,
                {
                    "attempt": spec.attempt,
                    "ranks": [
                        {
                            "rank": r.rank,
                            "host": r.host,
                            "pid": r.pid,
                            "python": r.python,
                            "sparknet": r.sparknet,
                        }
                        for r in ranks
                    ],
                },
            )
            ranks_file = None
        if thread.is_alive() and events.stalled_for() > timeout_s:
            stalled = events.diagnosis(timeout_s)
            log.error("cancelling training: %s", stalled.splitlines()[0])
            sc.cancelJobGroup(group)
            thread.join(timeout=CANCEL_WAIT_S)
            break
    if stalled is None and "error" not in outcome:
        return outcome["results"]
    if stalled is None:
        events.wait_until_ended(RANKS_END_WAIT_S)
    # What the ranks said comes first; Spark's message when they said nothing.
    if stalled:
        reason = stalled
    elif len(events.ranks) < workers:
        # A task that failed before it could report (a missing module, a bad setting):
        # Spark's error holds its Python exception.
        reason = python_error(outcome["error"])
    else:
        reason = events.diagnosis() or python_error(outcome["error"])
    error = TrainingError(f"training failed: {reason}")
    # Ranks that finished went back to Spark's pool of idle Python workers, which Spark
    # reuses: only the others must be gone.
    error.rank_pids = [s.pid for s in events.snapshot().values() if not s.done]
    error.retriable = events.retriable()
    _wait_for_ranks_to_exit(events)
    raise error


def _wait_for_ranks_to_exit(events: EventServer, within_s: float = 20.0) -> None:
    """Spark kills the tasks of a failed barrier stage and their Python workers; on this
    host, check that it did, so a failed run never leaves a training process behind
    unnoticed. (Executors on other hosts are the cluster manager's to check.)"""
    here = socket.gethostname()
    local = {
        s.pid: s.rank for s in events.snapshot().values() if s.host == here and s.pid and not s.done
    }
    deadline = time.monotonic() + within_s
    while local and time.monotonic() < deadline:
        local = {pid: rank for pid, rank in local.items() if process_running(pid)}
        time.sleep(0.2)
    for pid, rank in local.items():
        log.warning(
            "rank %d's process %d is still running %.0f s after the failure", rank, pid, within_s
        )


def process_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        # A zombie has exited; its parent just has not collected it yet.
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (OSError, IndexError):
        return False


def train(spark: SparkSession, config: Config, run_dir: RunDir, feed: str = "stream") -> dict:
    """The train stage. `feed="memory"` trains on the same batches held in memory instead
    of streamed (TaskSpec.feed): for the benchmark, not for users."""
    if feed not in ("stream", "memory"):
        raise ValueError(f"feed must be 'stream' or 'memory', got {feed!r}")
    manifest = read_json(run_dir.require(run_dir.shards_manifest, "shard"))
    columns = manifest["columns"]
    t = config.train
    preflight(spark, t.workers, t.device)
    # A model left by an earlier run must not pass for this one's if training fails.
    shutil.rmtree(run_dir.model, ignore_errors=True)
    # The regression target's mean/std come from the train split alone, computed once
    # here and shipped in the spec, so every rank standardises with the same numbers.
    train_labels = label_summary(spark, str(run_dir.shard("train")))
    check_labels(config, "train", train_labels)
    check_labels(config, "validation", label_summary(spark, str(run_dir.shard("validation"))))
    model_spec = build_model_spec(config, columns, train_labels)
    host, bind = driver_address(spark)
    run_fingerprint = fingerprint(config, manifest)
    checkpoints = str(run_dir.checkpoints)
    for path in checkpoint.clear_stale(checkpoints, run_fingerprint):
        log.info("removed %s: a checkpoint of another config or other shards", path)

    started = time.perf_counter()
    attempts: list[dict] = []
    workers = t.workers
    for attempt in range(t.max_attempts):
        if attempt:
            workers = relaunch_workers(spark, t.workers)
        train_plan, validation_plan = make_plans(config, run_dir, workers)
        for plan in (train_plan, validation_plan):
            check_shard_columns(plan, [*columns, LABEL, SAMPLE_ID])
        resume = resume_point(checkpoints, run_fingerprint, workers)
        log.info(
            "launching %d barrier tasks (one torch rank each): %d epochs of %d steps, %d rows "
            "per rank (plan %s)%s",
            workers,
            t.epochs,
            train_plan.steps_per_epoch,
            train_plan.rank_rows(0),
            train_plan.digest[:12],
            f"; resuming from {resume[0]} (epoch {resume[1]['epoch']}, step {resume[1]['step']})"
            if resume
            else "",
        )
        progress = Progress(
            run_dir.train_dir,
            model_spec.task,
            workers,
            t.epochs,
            train_plan.steps_per_epoch,
            earlier=resume[1]["history"] if resume else (),
        )
        # Leaving `progress` closes it, also when training fails: the epochs that finished
        # stay in the history and the curves.
        with progress, EventServer(bind, workers, listener=progress.on_event) as events:
            spec = TaskSpec(
                train_path=str(run_dir.shard("train")),
                validation_path=str(run_dir.shard("validation")),
                model_path=str(run_dir.model),
                model=model_spec,
                train=t,
                train_plan=train_plan,
                validation_plan=validation_plan,
                events=(host, events.address[1]),
                token=events.token,
                checkpoint_dir=checkpoints,
                fingerprint=run_fingerprint,
                resume_from=resume[0] if resume else None,
                attempt=attempt,
                feed=feed,
            )
            try:
                results = run_barrier(
                    spark, spec, events, t.timeout_s, run_dir.train_dir / "ranks.json"
                )
                break
            except TrainingError as exc:
                attempts.append(
                    {
                        "attempt": attempt,
                        "workers": workers,
                        "resumed_from": _position(resume),
                        "error": str(exc).splitlines()[0],
                        "failed_at": events.positions(),
                    }
                )
                write_json(run_dir.train_dir / "attempts.json", attempts)
                if not getattr(exc, "retriable", False) or attempt + 1 == t.max_attempts:
                    raise
                log.warning(
                    "attempt %d of %d failed: %s; relaunching from the latest checkpoint",
                    attempt + 1,
                    t.max_attempts,
                    str(exc).splitlines()[0],
                )
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
        "shard_plan_digest": train_plan.digest,
        "fingerprint": run_fingerprint,
        "attempts": attempts,
        "resumed_from": results[0]["resumed_from"],
        "steps_per_epoch": train_plan.steps_per_epoch,
        "task": model_spec.task,
        "loss": LOSSES[model_spec.task],
        "stopped_early": results[0]["stopped_early"],
        "best_epoch": results[0]["best_epoch"],
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
    """Dense ids 0..n-1: count n, sum n(n-1)/2, sum of squares (n-1)n(2n-1)/6 modulo
    ID_MODULUS, all exact integers."""
    expected = (n, n * (n - 1) // 2, ((n - 1) * n * (2 * n - 1) // 6) % ID_MODULUS)
    got = (record["samples"], record["sample_id_sum"], record["sample_id_square_sum_mod"])
    if got != expected:
        raise TrainingError(
            f"epoch {record['epoch']}: the ranks together did not see each of the {n} train "
            f"samples exactly once (count, id sum, id square sum mod {ID_MODULUS} = {got}, "
            f"expected {expected})"
        )
