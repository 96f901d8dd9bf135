"""The jobs' command line: failures are one clear line and an exit code, not a trace."""

import os
import signal
import subprocess
import sys
import time

import yaml
from test_clean import trips_config, write_raw

from conftest import REPO, sparknet_lines
from sparknet.run_dir import RunDir


def run_job(*args):
    env = {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1", "PYSPARK_PYTHON": sys.executable}
    done = subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    return done.returncode, done.stdout + done.stderr


def test_spark_runtime_failure_is_summarised(tmp_path):
    run_dir = RunDir.at(tmp_path / "run")
    write_raw(run_dir)
    data = trips_config()
    # Under ANSI mode make_date raises on month 13 at run time, inside a Spark task.
    data["features"]["derived"] = {"bad_date": "make_date(2024, 13, id)"}
    data["features"]["numeric"] = ["km", "bad_date_year"]
    data["features"]["derived"]["bad_date_year"] = "year(bad_date)"
    config = tmp_path / "trips.yaml"
    config.write_text(yaml.safe_dump(data, sort_keys=False))

    code, log = run_job("jobs/clean.py", "--config", str(config), "--run-dir", str(run_dir.root))
    assert code == 0, log[-3000:]
    code, log = run_job("jobs/features.py", "--config", str(config), "--run-dir", str(run_dir.root))
    assert code == 1
    # Spark's own executor log keeps its JVM stack; sparknet's last word is one line.
    last = sparknet_lines(log)[-1]
    assert "Spark failed: [DATETIME_FIELD_OUT_OF_BOUNDS]" in last
    assert "Traceback (most recent call last)" not in log


def test_stage_on_a_missing_run_dir_does_not_create_it(tmp_path):
    missing = tmp_path / "nope"
    code, log = run_job("jobs/shard.py", "--config", "conf/flights.yaml", "--run-dir", str(missing))
    assert code == 2
    assert f"run directory {missing} does not exist" in log
    assert not missing.exists()


def test_ctrl_c_ends_the_job_with_one_line_and_exit_130(tmp_path, flights_sample):
    raw, _ = flights_sample
    run_dir = RunDir.at(tmp_path / "run")
    run_dir.root.mkdir()
    os.symlink(raw, run_dir.raw)
    from conftest import flights_config_dict

    data = flights_config_dict()
    data["ingest"] = {}
    config = tmp_path / "flights.yaml"
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    env = {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1", "PYSPARK_PYTHON": sys.executable}
    job = subprocess.Popen(
        [sys.executable, "jobs/clean.py", "--config", str(config), "--run-dir", str(run_dir.root)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    for line in job.stdout:  # wait until Spark runs, then interrupt mid-stage
        lines.append(line)
        if "[stage=clean rank=-] sparknet.session: spark " in line:
            time.sleep(2)
            job.send_signal(signal.SIGINT)
            break
    lines.extend(job.stdout)
    assert job.wait(timeout=120) == 130, "".join(lines)[-3000:]
    log = "".join(lines)
    assert "interrupted" in sparknet_lines(log)[-1]
    # Interrupted, the stage committed nothing: no status for a later stage to trust.
    assert not run_dir.status("clean").exists()
    assert "Traceback (most recent call last)" not in log


HOLD_LOCK = """
import sys, time
from sparknet.run_dir import RunDir
RunDir.at(sys.argv[1]).lock("jobs/pipeline.py --config first.yaml")
print("held", flush=True)
time.sleep(600)
"""


def test_a_second_command_in_a_busy_run_dir_is_refused_and_the_lock_dies_with_its_holder(
    tmp_path,
):
    run_dir = RunDir.at(tmp_path / "run")
    run_dir.root.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(run_dir.root)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        code, log = run_job(
            "jobs/shard.py", "--config", "conf/flights.yaml", "--run-dir", str(run_dir.root)
        )
        assert code == 2, log[-3000:]
        last = sparknet_lines(log)[-1]
        busy = f"run directory {run_dir.root} is in use by another command (pid {holder.pid} "
        assert busy in last
        assert "jobs/pipeline.py --config first.yaml" in last
        assert "Traceback" not in log
        # Refused before anything was written: not even the effective config.
        assert sorted(p.name for p in run_dir.root.iterdir()) == ["_lock"]
    finally:
        holder.kill()  # SIGKILL: no cleanup runs, the kernel drops the flock
        holder.wait(timeout=30)
    lock = run_dir.lock("test")
    try:
        assert f"pid {os.getpid()} " in (run_dir.root / "_lock").read_text()
    finally:
        lock.stop()
