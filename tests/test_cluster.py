"""sparknet on a real Spark standalone cluster, submitted the way a Spark user submits
it: a master and two 1-core workers on loopback, started from pyspark's own
`spark-class` (tests/standalone.py), and `spark-submit --master spark://…` shipping
sparknet as the zip `python -m sparknet.package` builds (`--py-files`).

The executors run an interpreter that has the pinned stack but not sparknet (a venv
whose site-packages point at the stack's, without the editable install): the
workers of a cluster whose image has the stack installed. They can only run sparknet
from the shipped zip, and each rank reports where it imported it from.

One pipeline run on the cluster carries two checks: its results against a local[2]
run of the same config, and recovery from an executor killed mid-training (the
relaunch resumes from a checkpoint, and a resumed training ends with bitwise the
weights of an uninterrupted one, so the comparison holds through the fault).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from sparknet.config import read_yaml
from sparknet.run_dir import RunDir, read_json
from standalone import Standalone, alive, cmdline, descendants

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

SPARK_SUBMIT = Path(sys.executable).parent / "spark-submit"
EPOCHS = 150  # long enough that the kill lands mid-training, with room to spare
SUBMIT_TIMEOUT_S = 900


def penguins_config() -> dict:
    data = read_yaml(REPO / "conf" / "penguins.yaml")
    data["train"].update(
        epochs=EPOCHS,
        checkpoint={"every_steps": 25, "keep": 2},
        timeout_s=60,
    )
    # Other Spark applications on the machine may hold port 4040.
    data["spark"] = {"conf": {"spark.ui.enabled": "false"}}
    return data


def job_env() -> dict:
    # The driver's interpreter; spark-submit itself also finds SPARK_HOME through it.
    return {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1", "PYSPARK_PYTHON": sys.executable}


def submit_args(cluster: Standalone, shipped: dict, job: str, *args: str, conf=()) -> list[str]:
    return [
        str(SPARK_SUBMIT),
        *("--master", cluster.url),
        *("--py-files", str(shipped["zip"])),
        *("--conf", f"spark.pyspark.python={shipped['python']}"),
        *("--conf", f"spark.pyspark.driver.python={sys.executable}"),
        *("--conf", "spark.driver.host=127.0.0.1"),
        *("--conf", "spark.ui.enabled=false"),
        *[item for c in conf for item in ("--conf", c)],
        str(REPO / "jobs" / job),
        *args,
    ]


def start(args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(args, cwd=REPO, env=job_env(), stdout=out, stderr=subprocess.STDOUT)


def finish(process: subprocess.Popen, timeout_s: float = SUBMIT_TIMEOUT_S) -> int:
    try:
        return process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        stop(process)
        raise


def stop(process: subprocess.Popen) -> None:
    """Kills a run and what it started (spark-submit's JVM starts the Python driver,
    which starts its own JVM in local mode)."""
    if process.poll() is not None:
        return
    tree = descendants(process.pid)
    process.kill()
    process.wait()
    for pid in tree:
        if alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def run(args: list[str], log: Path, timeout_s: float = SUBMIT_TIMEOUT_S) -> tuple[int, str]:
    return finish(start(args, log), timeout_s), log.read_text()


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cluster")


@pytest.fixture(scope="module")
def cluster(root):
    with Standalone(root / "standalone", workers=2, cores=1, memory="2g") as standalone:
        yield standalone


@pytest.fixture(scope="module")
def shipped(root) -> dict:
    """The zip built by the package command, and an interpreter without sparknet."""
    dist = root / "dist"
    built = subprocess.run(
        [sys.executable, "-m", "sparknet.package", "--dist", str(dist)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    zip_path = Path(built.stdout.strip())
    assert zip_path.parent == dist and zip_path.name.startswith("sparknet-")

    venv = root / "workers-python"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = Path(sysconfig.get_paths(vars={"base": str(venv)})["purelib"])
    # A path in a .pth file is added as it is; the .pth files inside it (the editable
    # install's hook among them) are not read.
    (site / "stack.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    python = venv / "bin" / "python"
    probe = subprocess.run(
        [str(python), "-c", "import torch, petastorm, pyspark\nimport sparknet"],
        cwd=root,
        capture_output=True,
        text=True,
    )
    assert "No module named 'sparknet'" in probe.stderr, probe.stderr
    return {"zip": zip_path, "python": python}


@pytest.fixture(scope="module")
def config_path(root) -> Path:
    path = root / "penguins-cluster.yaml"
    path.write_text(yaml.safe_dump(penguins_config(), sort_keys=False))
    return path


@pytest.fixture(scope="module")
def runs(root, cluster, shipped, config_path) -> dict:
    """The pipeline in local[2] and, at the same time, on the cluster, where one
    executor JVM is killed (SIGKILL, by pid) once training has written a checkpoint."""
    local_dir, cluster_dir = root / "local-run", root / "cluster-run"
    local = start(
        [sys.executable, "jobs/pipeline.py", "--config", str(config_path)]
        + ["--run-dir", str(local_dir), "--master", "local[2]"],
        root / "local.log",
    )
    submitted = start(
        submit_args(
            cluster,
            shipped,
            "pipeline.py",
            *("--config", str(config_path), "--run-dir", str(cluster_dir)),
        ),
        root / "cluster.log",
    )
    try:
        killed = kill_an_executor_mid_training(cluster, RunDir.at(cluster_dir), submitted)
        finish(submitted)
        finish(local)
    finally:
        stop(submitted)
        stop(local)
    return {
        "local": (local.returncode, (root / "local.log").read_text(), RunDir.at(local_dir)),
        "cluster": (
            submitted.returncode,
            (root / "cluster.log").read_text(),
            RunDir.at(cluster_dir),
        ),
        "killed": killed,
    }


def kill_an_executor_mid_training(
    cluster: Standalone, run_dir: RunDir, submitted: subprocess.Popen
) -> dict:
    """Waits for the first checkpoint, then kills the executor JVM hosting rank 1: the
    CoarseGrainedExecutorBackend that one of this cluster's workers launched and whose
    process tree holds the rank's Python worker (train/ranks.json names its pid)."""
    # While training runs, its files are in the train stage's staging folder; they move
    # into place only when the stage commits.
    training = run_dir.staged("train")
    ranks_file = training.train_dir / "ranks.json"
    deadline = time.monotonic() + SUBMIT_TIMEOUT_S
    while not (ranks_file.exists() and any(run_dir.checkpoints.glob("*.pt"))):
        assert submitted.poll() is None, "the cluster run ended before training checkpointed"
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.05)
    rank = next(r for r in read_json(ranks_file)["ranks"] if r["rank"] == 1)
    executor = cluster.executor_backend(rank["pid"])
    assert executor is not None, f"rank 1 (pid {rank['pid']}) runs under none of our workers"
    args = cmdline(executor)
    app_id = args[args.index("--app-id") + 1]
    epochs_done = len(epoch_records(training))
    os.kill(executor, signal.SIGKILL)
    return {"pid": executor, "app_id": app_id, "epochs_done": epochs_done, "rank": rank}


def epoch_records(run_dir: RunDir) -> list[dict]:
    path = run_dir.train_dir / "metrics.jsonl"
    if not path.exists():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in lines if r.get("type") == "epoch"]


def test_the_pipeline_finishes_on_the_cluster_with_the_local_results(runs, cluster):
    local_code, local_log, local_dir = runs["local"]
    code, log, cluster_dir = runs["cluster"]
    assert local_code == 0, local_log[-4000:]
    assert code == 0, log[-4000:]
    assert f"master {cluster.url}" in log

    local_q, cluster_q = read_json(local_dir.quality), read_json(cluster_dir.quality)
    for key in ("rows_in", "clean", "rejected", "rejected_by_reason"):
        assert cluster_q[key] == local_q[key]
    assert read_json(cluster_dir.pca)["k"] == read_json(local_dir.pca)["k"]
    local_t, cluster_t = read_json(local_dir.train_report), read_json(cluster_dir.train_report)
    # Same seed, same plan, and a resume that is exact: the same network bit for bit.
    assert cluster_t["weights_digest"] == local_t["weights_digest"]
    local_m, cluster_m = read_json(local_dir.metrics), read_json(cluster_dir.metrics)
    assert cluster_m["rows"] == local_m["rows"]
    for name in ("accuracy", "macro_f1", "log_loss", "roc_auc"):
        assert cluster_m["model"][name] == pytest.approx(local_m["model"][name], rel=1e-6, abs=1e-9)
    assert cluster_m["model"]["accuracy"] > 0.9


def test_executors_run_sparknet_from_the_shipped_zip(runs, cluster, shipped):
    _, _, run_dir = runs["cluster"]
    ranks = read_json(run_dir.train_dir / "ranks.json")["ranks"]
    assert len(ranks) == 2
    work_dirs = [cluster.work_dir(i).resolve() for i in range(2)]
    for rank in ranks:
        assert rank["python"] == str(shipped["python"])
        # <worker work dir>/<app>/<executor>/sparknet-<version>.zip/sparknet
        location = Path(rank["sparknet"])
        assert location.name == "sparknet" and location.parent.name == shipped["zip"].name
        assert any(location.is_relative_to(d) for d in work_dirs), rank


def test_a_killed_executor_is_replaced_and_training_resumes(runs, cluster):
    code, log, run_dir = runs["cluster"]
    killed = runs["killed"]
    assert code == 0, log[-4000:]
    assert not alive(killed["pid"])

    attempts = read_json(run_dir.train_dir / "attempts.json")
    assert len(attempts) == 1 and attempts[0]["attempt"] == 0
    assert "rank 1" in attempts[0]["error"]
    report = read_json(run_dir.train_report)
    assert report["attempts"] == attempts
    resumed = report["resumed_from"]
    # Killed mid-training, resumed from a checkpoint at or after the one waited for.
    assert resumed is not None and 0 < resumed["epoch"] < EPOCHS
    assert resumed["epoch"] >= killed["epochs_done"] - 1
    assert [e["epoch"] for e in report["epochs"]] == list(range(EPOCHS))
    assert "relaunching from the latest checkpoint" in log

    # The worker that lost its executor launched another for the application.
    executor_dirs = [
        p for i in range(2) for p in (cluster.work_dir(i) / killed["app_id"]).iterdir()
    ]
    assert len(executor_dirs) == 3
    ranks = read_json(run_dir.train_dir / "ranks.json")
    assert ranks["attempt"] == 1 and len(ranks["ranks"]) == 2


def test_cluster_deploy_mode_is_refused_for_python_on_standalone(cluster, shipped, root):
    args = submit_args(cluster, shipped, "pipeline.py", "--config", "conf/penguins.yaml")
    args.insert(1, "--deploy-mode")
    args.insert(2, "cluster")
    code, log = run(args, root / "deploy-mode.log", timeout_s=120)
    assert code != 0
    assert "Cluster deploy mode is currently not supported for python applications" in log


def test_too_few_slots_fail_the_preflight_in_seconds(runs, cluster, shipped, config_path, root):
    """One worker stopped: one slot for train.workers=2. Executors register after the
    application starts, so the preflight waits for them, but only for Spark's own
    registration window (shortened here), then names what it needed and found."""
    _, _, local_dir = runs["local"]
    run_dir = root / "short-run"
    shutil.copytree(local_dir.root, run_dir)
    # Without train.json the train stage has not finished: it runs (and checks) again.
    (run_dir / "train.json").unlink()
    cluster.stop_worker(1)
    started = time.monotonic()
    code, log = run(
        submit_args(
            cluster,
            shipped,
            "train.py",
            *("--config", str(config_path), "--run-dir", str(run_dir)),
            # Shortened from 30 s, but not to nothing: the remaining worker's executor JVM
            # must register within it for the count to be 1 (5 s was too short on a
            # loaded 2-core machine: it found 0).
            conf=["spark.scheduler.maxRegisteredResourcesWaitingTime=15s"],
        ),
        root / "short.log",
    )
    seconds = time.monotonic() - started
    assert code == 2, log[-4000:]
    assert (
        f"train.workers=2 needs 2 concurrent task slots, but master {cluster.url} offers 1" in log
    )
    assert "maxRegisteredResourcesWaitingTime" in log
    assert "Traceback" not in log
    assert "barrier tasks (one torch rank each)" not in log  # never launched
    print(f"preflight refusal: spark-submit returned {code} after {seconds:.1f} s")
