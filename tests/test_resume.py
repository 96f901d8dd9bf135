"""Training survives a lost rank: checkpoints, relaunch from the latest one, and a
resumed run that ends with exactly the weights of an uninterrupted one."""

import json
import os
import shutil
import signal
import threading
import time

import numpy as np
import pytest
from test_train import write_shards

from conftest import small_training_config
from sparknet.config import FaultConfig
from sparknet.run_dir import RunDir, read_json
from sparknet.train import checkpoint
from sparknet.train.data import iterate_rank
from sparknet.train.launcher import make_plans, train
from sparknet.train.worker import _inject_fault

BATCH = 64
N_TRAIN = 2 * 23 * BATCH + 3  # 24 steps per epoch on 2 ranks


@pytest.fixture()
def run_dir(tmp_path):
    run_dir = RunDir.at(tmp_path / "run")
    write_shards(run_dir, n_train=N_TRAIN, n_validation=301, files=3)
    return run_dir


def config(epochs=3, **overrides):
    settings = {
        "batch_size": BATCH,
        "optimizer": "adam",
        "dropout": 0.2,  # so that resuming must restore each rank's RNG too
        "checkpoint": {"every_steps": 5, "keep": 2},
        **overrides,
    }
    return small_training_config(workers=2, epochs=epochs, **settings)


def uninterrupted_digest(run_dir: RunDir, cfg) -> str:
    shutil.rmtree(run_dir.checkpoints, ignore_errors=True)
    return train(_spark(), cfg, run_dir)["weights_digest"]


def _spark():
    from pyspark.sql import SparkSession

    return SparkSession.getActiveSession()


def test_reading_from_a_step_is_the_tail_of_the_epoch(run_dir):
    plan, _ = make_plans(small_training_config(workers=2, batch_size=BATCH), run_dir)
    for rank in (0, 1):
        whole = [ids for ids, _, _ in iterate_rank(plan, rank, 1, 13, ["pc_000"])]
        tail = [ids for ids, _, _ in iterate_rank(plan, rank, 1, 13, ["pc_000"], start_step=7)]
        assert len(tail) == plan.steps_per_epoch - 7
        for a, b in zip(whole[7:], tail, strict=True):
            np.testing.assert_array_equal(a, b)


def test_a_lost_rank_is_relaunched_and_ends_with_the_uninterrupted_weights(spark, run_dir):
    # Global step 30 is epoch 1, step 6; checkpoints come after every 5th step, the
    # latest after global step 29: position epoch 1, step 6, so nothing is lost.
    cfg = config(fault={"kind": "exit", "rank": 1, "step": 30})
    report = train(spark, cfg, run_dir)
    assert len(report["attempts"]) == 1
    failed = report["attempts"][0]
    assert "exited without an error at epoch 1 step 6" in failed["error"]
    assert report["resumed_from"] == {"epoch": 1, "step": 6, "world_size": 2}
    assert [e["samples"] for e in report["epochs"]] == [N_TRAIN] * 3
    # The history shown and kept spans both launches, each epoch once.
    lines = (run_dir.train_dir / "metrics.jsonl").read_text().splitlines()
    epochs = [json.loads(line) for line in lines if '"type": "epoch"' in line]
    assert [e["epoch"] for e in epochs] == [0, 1, 2]
    # keep=2 plus the latest epoch-boundary one
    assert len(list(run_dir.checkpoints.iterdir())) <= 3
    assert report["weights_digest"] == uninterrupted_digest(run_dir, config())


def test_a_killed_worker_process_costs_at_most_the_steps_since_the_checkpoint(spark, run_dir):
    """A real SIGKILL to a rank's Python worker, by pid, mid-training."""
    cfg = config(epochs=6)
    outcome = {}

    def run():
        try:
            outcome["report"] = train(spark, cfg, run_dir)
        except Exception as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    ranks_file = run_dir.train_dir / "ranks.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (
        ranks_file.exists() and run_dir.checkpoints.exists() and any(run_dir.checkpoints.iterdir())
    ):
        time.sleep(0.05)
    victim = next(r for r in read_json(ranks_file)["ranks"] if r["rank"] == 1)
    os.kill(victim["pid"], signal.SIGKILL)
    thread.join(timeout=600)
    assert "error" not in outcome, outcome.get("error")
    report = outcome["report"]
    assert len(report["attempts"]) == 1
    lost_at = report["attempts"][0]["failed_at"]
    resumed = report["resumed_from"]
    steps = report["steps_per_epoch"]
    furthest = max(p["epoch"] * steps + max(p["step"], 0) for p in lost_at.values())
    assert furthest - (resumed["epoch"] * steps + resumed["step"]) <= 5 + 1
    assert report["weights_digest"] == uninterrupted_digest(run_dir, cfg)


def test_a_relaunch_with_fewer_workers_replans_from_an_epoch_boundary(spark, run_dir):
    failing = config(max_attempts=1, fault={"kind": "exit", "rank": 0, "step": 30})
    with pytest.raises(Exception, match="exited without an error"):
        train(spark, failing, run_dir)
    saved = sorted(p.name for p in run_dir.checkpoints.iterdir())
    assert "epoch0001-step000000.pt" in saved and "epoch0001-step000006.pt" in saved
    one_rank = small_training_config(
        workers=1,
        epochs=3,
        batch_size=BATCH,
        optimizer="adam",
        dropout=0.2,
        checkpoint={"every_steps": 5, "keep": 2},
    )
    report = train(spark, one_rank, run_dir)
    assert report["world_size"] == 1
    assert report["resumed_from"] == {"epoch": 1, "step": 0, "world_size": 2}
    assert [e["samples"] for e in report["epochs"]] == [N_TRAIN] * 3
    assert report["epochs"][0]["rank_samples"] != report["epochs"][2]["rank_samples"]


def test_a_fault_unless_resumed_spares_resumed_launches_only():
    once = FaultConfig(kind="raise", rank=1, step=30, unless_resumed=True)
    always = FaultConfig(kind="raise", rank=1, step=30)
    with pytest.raises(RuntimeError, match="injected fault at rank 1, global step 30"):
        _inject_fault(once, 1, 30, 0, resumed=False)
    assert _inject_fault(once, 1, 30, 0, resumed=True) is None
    with pytest.raises(RuntimeError, match="injected fault"):
        _inject_fault(always, 1, 30, 0, resumed=True)
    assert _inject_fault(once, 1, 29, 0, resumed=False) is None


def test_a_rerun_stage_resumes_past_a_fault_unless_resumed(spark, run_dir):
    """What a scheduler's retry of the train stage does: a new launch, in a new call,
    with sparknet's own relaunches off."""
    fault = {"kind": "raise", "rank": 1, "step": 30, "unless_resumed": True}
    cfg = config(epochs=2, max_attempts=1, fault=fault)
    with pytest.raises(Exception, match="injected fault at rank 1, global step 30"):
        train(spark, cfg, run_dir)
    report = train(spark, cfg, run_dir)
    # The checkpoint after global step 29 is the position (epoch 1, step 6): the step
    # whose fault the first launch hit is run again, and passes.
    assert report["resumed_from"] == {"epoch": 1, "step": 6, "world_size": 2}
    assert report["attempts"] == []
    assert [e["samples"] for e in report["epochs"]] == [N_TRAIN] * 2


def test_checkpoints_of_another_config_are_never_resumed(spark, run_dir):
    train(spark, config(epochs=1), run_dir)
    assert checkpoint.latest(str(run_dir.checkpoints), "another") is None
    report = train(spark, config(epochs=1, learning_rate=0.02), run_dir)
    assert report["resumed_from"] is None
