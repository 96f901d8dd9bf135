"""Distributed training that is provably right and never hangs, in local[2]:

- 2 ranks x batch b under DDP train exactly what 1 process x batch 2b trains on the
  same samples in the same order (SGD with momentum, and Adam);
- a short last step is weighted by rows, not averaged per rank (and the test could tell);
- a rank that raises, exits, stalls or produces NaN ends the whole job within a bound,
  and the driver says which rank, where, and why; no training process is left behind;
- two training runs at once on one machine, with port 29500 taken, both succeed;
- the rendezvous store listens on the task's own address, not on every interface.
"""

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from test_train import write_shards

from conftest import mark_committed, small_training_config, synthetic_config_dict
from sparknet.config import load_config
from sparknet.errors import TrainingError
from sparknet.run_dir import RunDir, read_json
from sparknet.train import launcher
from sparknet.train.data import iterate_rank
from sparknet.train.launcher import make_plans, preflight, process_running, train
from sparknet.train.model import build_mlp, load_model_files, model_from_bytes, task_loss
from sparknet.train.optim import make_optimizer

ROOT = Path(__file__).resolve().parents[1]
BATCH = 64
# 2 x 23 x 64 + 3 rows: 24 steps per epoch, and in the last one rank 0 holds 2 rows and
# rank 1 holds 1, where weighting by rows and averaging per rank differ the most.
N_TRAIN = 2 * 23 * BATCH + 3


def reference_weights(run_dir: RunDir, config, per_rank_mean: bool = False) -> dict:
    """One process, no DDP: each step trains on the union of the ranks' batches for that
    step, in rank order (a batch of up to 2 x BATCH), with the mean loss over its rows.
    `per_rank_mean` averages the ranks' own means instead: the mistake weighting avoids."""
    t = config.train
    train_plan, _ = make_plans(config, run_dir)
    spec, _ = load_model_files(run_dir.model)
    torch.manual_seed(t.seed)
    model = build_mlp(spec)
    optimizer = make_optimizer(t, model)
    for epoch in range(t.epochs):
        streams = [
            iterate_rank(train_plan, r, epoch, t.seed, spec.columns, shuffle=True)
            for r in range(train_plan.world_size)
        ]
        for step_batches in zip(*streams, strict=True):
            optimizer.zero_grad()
            if per_rank_mean:
                losses = [
                    task_loss(spec, model(torch.from_numpy(x)), torch.from_numpy(y))
                    for _, x, y in step_batches
                ]
                loss = sum(losses) / len(losses)
            else:
                x = np.concatenate([b[1] for b in step_batches])
                y = np.concatenate([b[2] for b in step_batches])
                loss = task_loss(spec, model(torch.from_numpy(x)), torch.from_numpy(y))
            loss.backward()
            optimizer.step()
    return {k: v.detach() for k, v in model.state_dict().items()}


def max_difference(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture()
def uneven_shards(tmp_path):
    run_dir = RunDir.at(tmp_path)
    write_shards(run_dir, n_train=N_TRAIN, n_validation=301, files=3)
    return run_dir


@pytest.mark.parametrize(
    "optimizer, learning_rate", [("sgd", 0.05), ("adam", 0.01)], ids=["sgd-momentum", "adam"]
)
def test_two_ranks_train_what_one_process_trains_on_the_same_batches(
    spark, uneven_shards, optimizer, learning_rate
):
    config = small_training_config(
        workers=2,
        epochs=2,
        batch_size=BATCH,
        optimizer=optimizer,
        learning_rate=learning_rate,
        momentum=0.9,
    )
    report = train(spark, config, uneven_shards)
    assert report["steps_per_epoch"] == 24  # 48 optimizer steps in all
    assert [e["samples"] for e in report["epochs"]] == [N_TRAIN, N_TRAIN]
    spec, state = load_model_files(uneven_shards.model)
    distributed = model_from_bytes(spec, state).state_dict()

    expected = reference_weights(uneven_shards, config)
    assert max_difference(distributed, expected) < 1e-5
    # The check has teeth: averaging the ranks' means (one row counting double in the
    # last step) ends measurably elsewhere.
    averaged = reference_weights(uneven_shards, config, per_rank_mean=True)
    assert max_difference(distributed, averaged) > 1e-4


def test_same_seed_gives_bitwise_the_same_model(spark, uneven_shards):
    config = small_training_config(workers=2, epochs=2, dropout=0.2, batch_size=BATCH)
    first = train(spark, config, uneven_shards)
    shutil.rmtree(uneven_shards.checkpoints)  # else the second run resumes the first's end
    again = train(spark, config, uneven_shards)
    assert again["resumed_from"] is None
    assert first["weights_digest"] == again["weights_digest"]
    assert [e["train_loss"] for e in first["epochs"]] == [e["train_loss"] for e in again["epochs"]]


def faulty(kind: str, rank=1, step=5, timeout_s=120.0, **fault):
    return small_training_config(
        workers=2,
        epochs=2,
        batch_size=BATCH,
        timeout_s=timeout_s,
        max_attempts=1,
        fault={"kind": kind, "rank": rank, "step": step, **fault},
    )


def assert_processes_gone(pids: list[int], within_s: float = 30.0) -> None:
    deadline = time.monotonic() + within_s
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in alive if process_running(pid)]
        time.sleep(0.2)
    assert not alive, f"training processes still running: {alive}"


FAULTS = {
    # kind: (what the driver must say, extra fault settings, train.timeout_s)
    "raise": (r"rank 1 .*failed at epoch 0 step 5: RuntimeError: injected fault", {}, 120.0),
    "exit": (r"rank 1 \(pid \d+ on .*\) exited without an error at epoch 0 step 5", {}, 120.0),
    "sleep": (
        r"no progress for 8 s \(train.timeout_s\): rank 1 .* at epoch 0 step 5, phase "
        r"'forward' for \d+ s; ranks \[0\] wait for it in a collective",
        {"seconds": 3600},
        8.0,
    ),
    "nan": (
        r"the loss of rank \[1\] is not finite at epoch 0, step 5 \(global step 5\), "
        r"learning rate 0.01; all ranks stopped together",
        {},
        120.0,
    ),
    "overflow": (
        r"epoch 0: the loss of 1 step\(s\) is not finite though the gradients were; all "
        r"ranks stopped together",
        {},
        120.0,
    ),
}


@pytest.mark.parametrize("kind", list(FAULTS))
def test_a_faulty_rank_ends_the_job_fast_and_says_why(spark, uneven_shards, kind, record_property):
    pattern, extra, timeout_s = FAULTS[kind]
    started = time.monotonic()
    with pytest.raises(TrainingError, match=pattern) as failure:
        train(spark, faulty(kind, timeout_s=timeout_s, **extra), uneven_shards)
    took = time.monotonic() - started
    record_property(f"fault_{kind}_seconds", round(took, 1))
    print(f"fault {kind}: failed after {took:.1f} s: {str(failure.value).splitlines()[0]}")
    # Bounded: a few seconds for raise/exit/NaN, the no-progress bound for a stall.
    assert took < timeout_s + 45
    assert not (uneven_shards.model / "model.pt").exists()
    assert_processes_gone(failure.value.rank_pids)
    # Spark is usable afterwards: the next training runs.
    report = train(spark, small_training_config(workers=2, epochs=1), uneven_shards)
    assert report["epochs"][0]["samples"] == N_TRAIN


def test_a_late_rank_in_validation_is_named_too(spark, uneven_shards):
    """A stall after the last step (the fault at the epoch's step count) leaves the
    other rank waiting in the epoch-end allreduce, not in a backward pass."""
    with pytest.raises(TrainingError, match=r"no progress for 8 s.*rank 0 .*phase 'forward'"):
        train(spark, faulty("sleep", rank=0, step=23, timeout_s=8.0, seconds=3600), uneven_shards)


def small_job_config(path: Path) -> Path:
    """The synthetic config as a YAML file, for runs through jobs/train.py."""
    data = synthetic_config_dict(
        train={"workers": 2, "epochs": 2, "batch_size": BATCH, "hidden": [16]}
    )
    path.write_text(yaml.safe_dump(data))
    return path


def test_two_runs_at_once_with_port_29500_taken(tmp_path):
    """Each run's rank 0 binds a free port and shares it through the barrier, so neither
    the default torch port nor the other run is in the way."""
    config = small_job_config(tmp_path / "job.yaml")
    run_dirs = [RunDir.at(tmp_path / f"run{i}") for i in range(2)]
    for i, run_dir in enumerate(run_dirs):
        write_shards(run_dir, n_train=N_TRAIN, seed=i)
        mark_committed(run_dir, load_config(config))
    blocker = socket.socket()
    blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        blocker.bind(("127.0.0.1", 29500))
        blocker.listen()
    except OSError:
        pass  # someone else holds it already: the point stands
    env = {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1", "PYSPARK_PYTHON": sys.executable}
    try:
        runs = [
            subprocess.Popen(
                [
                    sys.executable,
                    str(ROOT / "jobs/train.py"),
                    "--config",
                    str(config),
                    "--run-dir",
                    str(run_dir.root),
                ],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for run_dir in run_dirs
        ]
        outputs = [run.communicate(timeout=600)[0] for run in runs]
    finally:
        blocker.close()
        for run in runs:
            if run.poll() is None:
                run.kill()
    for run, output in zip(runs, outputs, strict=True):
        assert run.returncode == 0, output[-3000:]
    digests = [read_json(r.train_report)["weights_digest"] for r in run_dirs]
    assert digests[0] != digests[1]  # different data: two real, separate trainings


def test_the_rendezvous_store_listens_only_on_the_task_address():
    """torch's TCPStore binds every interface when it opens the port itself; rank 0's
    store (worker.listening_store) listens on the address Spark reported only."""
    import datetime

    import psutil
    import torch.distributed as dist

    from sparknet.train.worker import listening_store

    timeout = datetime.timedelta(seconds=20)
    store = listening_store("127.0.0.1", 2, timeout)
    client = dist.TCPStore("127.0.0.1", store.port, 2, is_master=False, timeout=timeout)
    client.set("rank1", "here")
    assert store.get("rank1") == b"here"
    listening = [
        c.laddr.ip
        for c in psutil.Process().net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == store.port
    ]
    assert listening == ["127.0.0.1"]
    del client, store


def test_an_unresolvable_rendezvous_address_is_named():
    import datetime

    from sparknet.train.worker import listening_store

    with pytest.raises(TrainingError, match=r"'no-such-host\.invalid'.*does not resolve"):
        listening_store("no-such-host.invalid", 2, datetime.timedelta(seconds=5))


class FakeContext:
    """What preflight reads from a SparkContext, for settings a running local session
    cannot change (dynamic allocation, GPU resources, task cpus); `slots` stands for the
    task slots Spark counts (launcher.task_slots)."""

    def __init__(self, conf: dict, slots: int, master="local[4]"):
        self._conf, self.slots, self.master = conf, slots, master
        self.startTime = 0  # ms since the epoch: long started, no waiting for executors

    def getConf(self):
        return self

    def get(self, key, default=None):
        return self._conf.get(key, default)


class FakeSession:
    def __init__(self, conf: dict, slots: int):
        self.sparkContext = FakeContext(conf, slots)


@pytest.mark.parametrize(
    "conf, slots, device, message",
    [
        ({}, 1, "cpu", r"train.workers=2 needs 2 concurrent task slots, but master .* offers 1"),
        (
            {"spark.task.cpus": "2"},
            1,
            "cpu",
            r"offers 1 \(the registered executors' cores / spark.task.cpus=2\); lower",
        ),
        (
            {"spark.dynamicAllocation.enabled": "true"},
            4,
            "cpu",
            r"Spark refuses barrier stages with dynamic allocation",
        ),
        ({}, 4, "cuda", r"train.device=cuda but spark.task.resource.gpu.amount is not set"),
    ],
    ids=["slots", "task-cpus", "dynamic-allocation", "cuda-without-gpus"],
)
def test_preflight_refuses_in_one_message(monkeypatch, conf, slots, device, message):
    monkeypatch.setattr(launcher, "task_slots", lambda sc: sc.slots)
    with pytest.raises(TrainingError, match=message):
        preflight(FakeSession(conf, slots), 2, device)


def test_task_slots_are_what_the_barrier_check_counts(spark):
    # local[2] with spark.task.cpus=1: two slots, through the same Spark call a cluster uses.
    assert launcher.task_slots(spark.sparkContext) == 2


def test_batch_norm_ranks_end_with_the_same_statistics(spark, uneven_shards):
    """DDP averages gradients, not BatchNorm's running statistics: they are averaged
    across ranks each epoch, so every rank, and the saved model, hold the same."""
    config = small_training_config(workers=2, epochs=2, batch_size=BATCH, batch_norm=True)
    report = train(spark, config, uneven_shards)
    assert report["identical_weights"] is True
    spec, state = load_model_files(uneven_shards.model)
    assert spec.batch_norm is True
    assert any("running_mean" in k for k in model_from_bytes(spec, state).state_dict())


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("timeout_s", float("nan"), r"train.timeout_s: must be in \(0, 604800\]"),
        ("timeout_s", float("inf"), r"train.timeout_s"),
        ("learning_rate", float("inf"), r"train.learning_rate: must be a finite number"),
        ("momentum", 5.0, r"train.momentum: must be in \[0, 1\)"),
        ("seed", 2**70, r"train.seed: must be in \[0, 2\^32\)"),
    ],
)
def test_train_settings_that_would_fail_inside_the_tasks_are_refused(key, value, message):
    from sparknet.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        small_training_config(**{key: value})
