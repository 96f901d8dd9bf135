"""The Airflow DAG (jobs/airflow/sparknet_dag.py) in Airflow's own venv (.venv-airflow,
made by .ci/install-airflow), which has neither sparknet nor torch: it parses, its tasks
follow sparknet's stage order, and `airflow dags test` runs it against local Spark on
the penguins table. One `airflow db migrate` per session; each DAG run gets its own
AIRFLOW_HOME with a copy of that database.

`airflow dags test` runs the tasks in its own process and writes no task log files: the
per-task logs are the sections of its output between "[DAG TEST] starting task_id=X"
and "[DAG TEST] end task", one per try; the whole output is kept in AIRFLOW_HOME.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from sparknet.config import read_yaml
from sparknet.run_dir import RunDir, read_json
from sparknet.stages import STAGES

DAG_FILE = REPO / "jobs" / "airflow" / "sparknet_dag.py"
DAG_ID = "sparknet"
AIRFLOW_VENV = REPO / ".venv-airflow"
AIRFLOW_BIN = AIRFLOW_VENV / "bin"

# The first launch of train fails at global step 9 (epoch 1, step 3 of 6); the
# checkpoint taken after global step 7 is at position (epoch 1, step 2), and rank 1
# cannot reach step 9 before rank 0 has written it (step 8's allreduce waits for it).
QUICK_JVM = "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC"
FAULT_STEP = 9
RESUME_AT = {"epoch": 1, "step": 2, "world_size": 2}


@pytest.fixture(scope="session")
def airflow_venv() -> Path:
    """Airflow's venv, installed now if missing. When it cannot be installed the tests
    are skipped with the installer's output, except in CI, where that is a failure."""
    done = subprocess.run(
        ["bash", str(REPO / ".ci" / "install-airflow")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if done.returncode != 0:
        message = (
            f"AIRFLOW TESTS NOT RUN: .ci/install-airflow failed with exit {done.returncode}:\n"
            + (done.stdout + done.stderr)[-3000:]
        )
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        print(message, file=sys.stderr)
        warnings.warn(message, stacklevel=1)
        pytest.skip(message)
    return AIRFLOW_VENV


def base_env(home: Path, database: Path, runs: Path, retries: int) -> dict[str, str]:
    """Airflow's environment: loopback Spark, the connection and the DAG's settings. The
    project venv's PYSPARK_* and bin/ are left out on purpose: the DAG must set them."""
    project_bin = str(Path(sys.executable).parent)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AIRFLOW", "PYSPARK_", "SPARKNET_"))
        and k not in ("VIRTUAL_ENV", "PYTHONPATH")
    }
    env["PATH"] = os.pathsep.join(
        p for p in env.get("PATH", os.defpath).split(os.pathsep) if p != project_bin
    )
    env.update(
        AIRFLOW_HOME=str(home),
        AIRFLOW__CORE__DAGS_FOLDER=str(DAG_FILE.parent),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{database}",
        AIRFLOW_CONN_SPARK_TEST=json.dumps({"conn_type": "spark", "host": "local[2]"}),
        SPARKNET_SPARK_CONN_ID="spark_test",
        SPARKNET_PYTHON=sys.executable,
        SPARKNET_RUNS=str(runs),
        SPARKNET_RETRIES=str(retries),
        SPARKNET_RETRY_DELAY_S="1",
        SPARKNET_DRIVER_MEMORY="2g",
        # Short jobs: the JVM's quick compiler alone cuts its start-up CPU time by a third.
        SPARKNET_SPARK_CONF=json.dumps({"spark.driver.extraJavaOptions": QUICK_JVM}),
        SPARK_LOCAL_IP="127.0.0.1",
    )
    return env


@pytest.fixture(scope="session")
def migrated_db(airflow_venv, tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("airflow-migrate")
    database = home / "airflow.db"
    env = base_env(home, database, home / "runs", retries=0)
    done = subprocess.run(
        [str(AIRFLOW_BIN / "airflow"), "db", "migrate"],
        cwd=home,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, (
        f"airflow db migrate failed:\n{(done.stdout + done.stderr)[-3000:]}"
    )
    return database


@dataclass
class DagRun:
    """One `airflow dags test` and what it left: its exit code, output and task logs,
    and every task instance's state and try number."""

    returncode: int
    output_file: Path
    logs: dict[str, list[str]]  # task id -> its log per try
    states: dict[str, tuple[str, int]]  # task id -> (state, try number)
    run_id: str

    def log(self, task: str, attempt: int = -1) -> str:
        tries = self.logs.get(task) or [""]
        return tries[attempt]

    def explain(self, *tasks: str) -> str:
        """For an assertion message: the states, then each task's sparknet and error lines."""
        parts = [
            f"dags test exit {self.returncode}; states {self.states}; output {self.output_file}"
        ]
        for task in tasks or list(self.logs):
            for i, text in enumerate(self.logs.get(task, [])):
                parts.append(f"--- {task}, try {i + 1}:\n{summary(text)}")
        return "\n".join(parts)


def summary(text: str, tail: int = 12) -> str:
    lines = [strip_airflow(line) for line in text.splitlines()]
    keep = [ln for ln in lines if "sparknet[" in ln or "Error" in ln or "Exception" in ln]
    return "\n".join(keep[-40:] + ["..."] + lines[-tail:])


def strip_airflow(line: str) -> str:
    """`2026-...Z [info     ] MESSAGE [logger] loc=file:line` -> MESSAGE."""
    line = re.sub(r"^\S+Z \[\w+\s*\] ", "", line)
    return re.sub(r"\s+\[[\w.]+\] loc=\S+.*$", "", line)


def task_logs(output: str) -> dict[str, list[str]]:
    logs: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in output.splitlines():
        started = re.search(r"\[DAG TEST\] starting task_id=(\S+)", line)
        if started:
            current = []
            logs.setdefault(started[1], []).append(current)
        elif "[DAG TEST] end task" in line:
            current = None
        elif current is not None:
            current.append(line)
    return {task: ["\n".join(lines) for lines in tries] for task, tries in logs.items()}


STATES_SCRIPT = """
import json
from sqlalchemy import select
from airflow.models.taskinstance import TaskInstance
from airflow.utils.session import create_session

with create_session() as session:
    ti = TaskInstance
    rows = session.execute(select(ti.run_id, ti.task_id, ti.state, ti.try_number)).all()
print(json.dumps([[r[0], r[1], str(getattr(r[2], "value", r[2])), r[3]] for r in rows]))
"""


def stop_group(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


class Airflow:
    """An AIRFLOW_HOME of one test, with its own copy of the migrated database."""

    def __init__(self, home: Path, migrated: Path, retries: int):
        self.home = home
        home.mkdir(parents=True, exist_ok=True)
        self.database = home / "airflow.db"
        shutil.copyfile(migrated, self.database)
        self.runs = home / "runs"
        self.env = base_env(home, self.database, self.runs, retries)
        self.tests = 0

    def dags_test(self, conf: dict, mark_success: list[str] = (), timeout: int = 1200) -> DagRun:
        self.tests += 1
        output_file = self.home / f"dags-test-{self.tests}.log"
        command = [str(AIRFLOW_BIN / "airflow"), "dags", "test", DAG_ID, "--conf", json.dumps(conf)]
        if mark_success:
            command += ["--mark-success-pattern", "|".join(mark_success)]
        with open(output_file, "w") as out:
            # Its own process group, so that spark-submit, the JVM and the Python workers
            # under it can be stopped with it.
            process = subprocess.Popen(
                command,
                cwd=self.home,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                returncode = process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                returncode = None
            finally:
                if process.poll() is None:
                    stop_group(process)
        output = output_file.read_text()
        if returncode is None:
            logs = task_logs(output)
            last = next(reversed(logs), None)
            pytest.fail(
                f"airflow dags test still running after {timeout} s ({output_file}); "
                f"last task {last}:\n{summary(logs[last][-1]) if last else ''}"
            )
        rows = json.loads(self.python(STATES_SCRIPT).splitlines()[-1])
        # Run ids are manual__<ISO time>: the latest sorts last.
        run_id = max((row[0] for row in rows), default="")
        states = {task: (state, tries) for rid, task, state, tries in rows if rid == run_id}
        return DagRun(returncode, output_file, task_logs(output), states, run_id)

    def python(self, script: str) -> str:
        done = subprocess.run(
            [str(AIRFLOW_BIN / "python"), "-c", script],
            # Not the repository: `python -c` would find sparknet/ in its working folder.
            cwd=self.home,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, f"script in Airflow's venv failed:\n{done.stderr[-3000:]}"
        return done.stdout


def penguins_config(folder: Path, name: str, **train) -> Path:
    """conf/penguins.yaml with a short training that checkpoints every 2 steps."""
    data = read_yaml(REPO / "conf" / "penguins.yaml")
    data["train"].update(
        epochs=3, timeout_s=120, max_attempts=1, checkpoint={"every_steps": 2, "keep": 2}, **train
    )
    data["spark"] = {"conf": {"spark.ui.enabled": "false", "spark.sql.shuffle.partitions": "2"}}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


BEFORE_TRAIN = list(STAGES)[: list(STAGES).index("train")]
AFTER_TRAIN = list(STAGES)[list(STAGES).index("train") + 1 :]


def copy_run_dir(source: RunDir, target: Path, first_removed: str) -> RunDir:
    """A copy of a finished run directory without the outputs of `first_removed` and the
    stages after it (and without the checkpoints when that includes train)."""
    shutil.copytree(source.root, target)
    copy = RunDir.at(target)
    order = list(STAGES)
    for stage in order[order.index(first_removed) :]:
        copy.discard(stage)
    if first_removed in BEFORE_TRAIN + ["train"]:
        shutil.rmtree(copy.checkpoints, ignore_errors=True)
    return copy


# --- the DAG as Airflow parses it -------------------------------------------------

BAD_SETTINGS = {
    "SPARKNET_SPARK_CONF": ("[1]", "expected a JSON object of Spark settings"),
    "SPARKNET_RETRIES": ("two", "invalid literal for int()"),
    "SPARKNET_RETRY_DELAY_S": ("-1", "expected seconds >= 0"),
}

DAGBAG_SCRIPT = """
import importlib.util, json, os
from airflow.dag_processing.dagbag import DagBag

folder, dag_id, bad_settings = %r, %r, %r
refused = {}
for name, value in bad_settings.items():
    good = os.environ.get(name, "")
    os.environ[name] = value
    refused[name] = "\\n".join(DagBag(dag_folder=folder).import_errors.values())
    os.environ[name] = good
bag = DagBag(dag_folder=folder)
dag = bag.dags.get(dag_id)
print(json.dumps({
    "refused": refused,
    "import_errors": {str(k): v for k, v in bag.import_errors.items()},
    "dag_ids": sorted(bag.dags),
    "tasks": [
        {
            "task_id": t.task_id,
            "upstream": sorted(t.upstream_task_ids),
            "operator": type(t).__name__,
            "retries": t.retries,
            "retry_delay_s": t.retry_delay.total_seconds(),
            "conn_id": t._conn_id,
            "application": t.application,
            "application_args": t.application_args,
            "conf": t.conf,
            "env_vars": t.env_vars,
        }
        for t in dag.topological_sort()
    ] if dag else [],
    "importable": {m: importlib.util.find_spec(m) is not None for m in ("sparknet", "torch")},
}))
"""


@pytest.fixture(scope="module")
def parsed(migrated_db, tmp_path_factory) -> dict:
    airflow = Airflow(tmp_path_factory.mktemp("airflow-parse"), migrated_db, retries=3)
    bad = {name: value for name, (value, _) in BAD_SETTINGS.items()}
    script = DAGBAG_SCRIPT % (str(DAG_FILE.parent), DAG_ID, bad)
    return json.loads(airflow.python(script).splitlines()[-1])


def test_the_dag_imports_in_airflows_venv_without_sparknet(parsed):
    assert parsed["import_errors"] == {}
    assert parsed["dag_ids"] == [DAG_ID]
    # What the DAG file may rely on: Airflow and its Spark provider, nothing of sparknet's.
    assert parsed["importable"] == {"sparknet": False, "torch": False}


def test_a_bad_setting_is_an_import_error_naming_it(parsed):
    for name, (value, reason) in BAD_SETTINGS.items():
        assert f"{name}={value!r}: {reason}" in parsed["refused"][name], parsed["refused"][name]


def test_the_dags_stage_list_is_sparknets_stage_order():
    """The DAG cannot import sparknet, so its list is a copy: this catches drift."""
    tree = ast.parse(DAG_FILE.read_text())
    found = [
        ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign)
        and [getattr(t, "id", None) for t in node.targets] == ["STAGES"]
    ]
    assert found == [tuple(STAGES)], (
        f"{DAG_FILE}: STAGES = {found} but sparknet.stages.STAGES is {list(STAGES)}"
    )


def test_each_stage_waits_for_the_one_before(parsed):
    tasks = parsed["tasks"]
    assert [t["task_id"] for t in tasks] == list(STAGES)
    assert [t["upstream"] for t in tasks] == [[]] + [[s] for s in list(STAGES)[:-1]]
    for task in tasks:
        stage = task["task_id"]
        assert task["operator"] == "SparkSubmitOperator"
        assert task["application"] == str(REPO / "jobs" / f"{stage}.py")
        assert task["application_args"][0::2] == ["--config", "--run-dir"]
        # From the environment the DAG was parsed in.
        assert (task["retries"], task["retry_delay_s"], task["conn_id"]) == (3, 1.0, "spark_test")
        assert task["conf"]["spark.pyspark.python"] == sys.executable
        assert task["conf"]["spark.driver.extraJavaOptions"] == QUICK_JVM
        assert task["env_vars"]["PYSPARK_PYTHON"] == sys.executable
        assert task["env_vars"]["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)


# --- runs against local Spark --------------------------------------------------------


@pytest.fixture(scope="module")
def retried_run(migrated_db, tmp_path_factory):
    """The whole DAG on the penguins table, with the run directory left to the DAG (one
    per DAG run), one retry allowed, and a train fault that fires only in a launch that
    did not resume: the first try of train fails after checkpoints exist, the retry
    must resume to get past it. Returns (run, config, run dir)."""
    folder = tmp_path_factory.mktemp("airflow-run")
    airflow = Airflow(folder / "home", migrated_db, retries=1)
    fault = {"kind": "raise", "rank": 1, "step": FAULT_STEP, "unless_resumed": True}
    config = penguins_config(folder, "penguins-fault-once", fault=fault)
    run = airflow.dags_test({"config": str(config)})
    run_dirs = sorted(airflow.runs.iterdir()) if airflow.runs.exists() else []
    assert len(run_dirs) == 1, (
        f"expected one run directory in {airflow.runs}: {run_dirs}\n" + run.explain()
    )
    return run, config, RunDir.at(run_dirs[0])


def test_the_dag_runs_end_to_end_on_local_spark(retried_run):
    run, _, run_dir = retried_run
    assert run.returncode == 0, run.explain()
    assert {t: s for t, (s, _) in run.states.items()} == {s: "success" for s in STAGES}, (
        run.explain()
    )
    # The run directory comes from the run id, as a plain folder name.
    assert run_dir.root.name == re.sub(r"[^A-Za-z0-9._-]+", "_", run.run_id)
    for stage in STAGES:
        for attempt, text in enumerate(run.logs[stage], 1):
            command = re.search(r"Spark-Submit cmd: (.*?)(?:\s+\[airflow|$)", text, re.M)
            assert command, f"{stage} try {attempt}: no spark-submit command\n{summary(text)}"
            assert f"--run-dir {run_dir.root}" in command[1], command[1]
            assert f"spark.pyspark.python={sys.executable}" in command[1], command[1]
            assert "--driver-memory 2g" in command[1], command[1]
            assert f"{REPO / 'jobs' / stage}.py" in command[1], command[1]
    metrics = read_json(run_dir.metrics)
    assert metrics["rows"] > 0 and metrics["split"] == "test", metrics
    assert metrics["model"]["accuracy"] > metrics["majority_baseline"]["accuracy"], metrics
    assert (run_dir.model / "model.pt").exists()
    # export's artifact: the last stage's outputs.
    card = read_json(run_dir.artifact / "model_card.json")
    assert (run_dir.artifact / "network" / "scorer.pt").exists(), card


def test_a_retried_train_task_resumes_from_its_checkpoint(retried_run):
    run, _, run_dir = retried_run
    assert run.states["train"] == ("success", 2), run.explain("train")
    first, second = run.logs["train"]
    assert f"injected fault at rank 1, global step {FAULT_STEP}" in first, run.explain("train")
    assert re.search(r"resuming from \S+ \(epoch 1, step 2\)", second), run.explain("train")
    report = read_json(run_dir.train_report)
    assert report["resumed_from"] == RESUME_AT
    # Every epoch saw each train sample once, across the two launches.
    assert [e["samples"] for e in report["epochs"]] == [report["train_rows"]] * 3
    assert all(
        state == "success" and tries == 1
        for t, (state, tries) in run.states.items()
        if t != "train"
    )


def test_a_failing_train_task_fails_and_evaluate_does_not_run(retried_run, migrated_db, tmp_path):
    _, _, finished = retried_run
    run_dir = copy_run_dir(finished, tmp_path / "run", first_removed="train")
    config = penguins_config(
        tmp_path, "penguins-fault", fault={"kind": "raise", "rank": 1, "step": 1}
    )
    airflow = Airflow(tmp_path / "home", migrated_db, retries=0)
    run = airflow.dags_test({"config": str(config), "run_dir": str(run_dir.root)}, BEFORE_TRAIN)
    assert run.returncode != 0, run.explain("train")
    assert run.states["train"] == ("failed", 1), run.explain("train")
    for stage in AFTER_TRAIN:
        assert run.states[stage][0] == "upstream_failed", run.explain("train")
        assert stage not in run.logs
    assert "injected fault at rank 1, global step 1" in run.log("train"), run.explain("train")
    assert not run_dir.train_report.exists() and not run_dir.metrics.exists()


def test_rerunning_a_finished_train_task_does_nothing(retried_run, migrated_db, tmp_path):
    _, config, finished = retried_run
    run_dir = copy_run_dir(finished, tmp_path / "run", first_removed="evaluate")
    report = run_dir.train_report.read_bytes()
    airflow = Airflow(tmp_path / "home", migrated_db, retries=0)
    others = [s for s in STAGES if s != "train"]
    run = airflow.dags_test({"config": str(config), "run_dir": str(run_dir.root)}, others)
    assert run.states["train"] == ("success", 1), run.explain("train")
    assert "skipped: up to date" in run.log("train"), run.explain("train")
    assert run_dir.train_report.read_bytes() == report
