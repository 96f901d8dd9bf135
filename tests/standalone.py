"""A Spark standalone cluster on loopback for tests: one master and N workers started
from pyspark's own `spark-class`, every process tracked by pid and stopped by pid."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pyspark

SPARK_HOME = Path(pyspark.__file__).resolve().parent
SPARK_CLASS = SPARK_HOME / "bin" / "spark-class"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children(pid: int) -> list[int]:
    """Direct children of `pid`, from /proc (no `ps` parsing)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name in parentheses may hold spaces; the fields after it do not.
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def descendants(pid: int) -> list[int]:
    found, queue = [], [pid]
    while queue:
        for child in children(queue.pop()):
            found.append(child)
            queue.append(child)
    return found


def parent(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return raw.decode(errors="replace").split("\0")


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def cluster_env() -> dict:
    env = {
        key: value
        for key, value in os.environ.items()
        # A Python driver's gateway variables would make spark-class attach to it.
        if not key.startswith("PYSPARK_GATEWAY")
    }
    env.update(SPARK_LOCAL_IP="127.0.0.1", SPARK_HOME=str(SPARK_HOME))
    return env


class Standalone:
    """Master + `workers` workers of `cores` cores each, all on 127.0.0.1, in `root`."""

    def __init__(self, root: Path, workers: int = 2, cores: int = 1, memory: str = "2g"):
        self.root = Path(root)
        self.cores, self.memory = cores, memory
        self.port, self.ui_port = free_port(), free_port()
        self.url = f"spark://127.0.0.1:{self.port}"
        self.master: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen | None] = [None] * workers
        self.started: list[int] = []  # every pid this object launched, for the final sweep

    def _launch(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "ab")  # noqa: SIM115 (the process owns it)
        process = subprocess.Popen(
            [str(SPARK_CLASS), *args],
            env=cluster_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=self.root,
        )
        log.close()
        self.started.append(process.pid)
        return process

    def work_dir(self, index: int) -> Path:
        return self.root / f"worker-{index}"

    def start(self, timeout_s: float = 90) -> Standalone:
        self.root.mkdir(parents=True, exist_ok=True)
        self.master = self._launch(
            "master",
            [
                "org.apache.spark.deploy.master.Master",
                *("--host", "127.0.0.1", "--port", str(self.port)),
                *("--webui-port", str(self.ui_port)),
            ],
        )
        self.wait(lambda state: state is not None, timeout_s, "the master to start")
        for index in range(len(self.workers)):
            self.start_worker(index, wait_s=0)
        self.wait_for_workers(len(self.workers), timeout_s)
        return self

    def start_worker(self, index: int, wait_s: float = 60) -> None:
        work_dir = self.work_dir(index)
        work_dir.mkdir(exist_ok=True)
        self.workers[index] = self._launch(
            f"worker-{index}",
            [
                "org.apache.spark.deploy.worker.Worker",
                self.url,
                *("--host", "127.0.0.1", "--webui-port", str(free_port())),
                *("--cores", str(self.cores), "--memory", self.memory),
                *("--work-dir", str(work_dir)),
            ],
        )
        if wait_s:
            self.wait_for_workers(self.alive_workers() + 1, wait_s)

    def stop_worker(self, index: int, timeout_s: float = 30) -> None:
        """Stops a worker (and with it its executors) and waits until the master has
        dropped it."""
        process = self.workers[index]
        before = self.alive_workers()
        self._stop(process)
        self.workers[index] = None
        self.wait(
            lambda state: state and state["aliveworkers"] < before,
            timeout_s,
            "the master to drop the stopped worker",
        )

    def state(self) -> dict | None:
        """The master's JSON status, or None while it is not answering."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ui_port}/json/", timeout=2) as r:
                return json.load(r)
        except OSError:
            return None

    def alive_workers(self) -> int:
        state = self.state()
        return state["aliveworkers"] if state else 0

    def wait_for_workers(self, n: int, timeout_s: float) -> None:
        self.wait(
            lambda state: state and state["aliveworkers"] >= n,
            timeout_s,
            f"{n} workers to register",
        )

    def wait(self, predicate, timeout_s: float, what: str) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.master is not None and self.master.poll() is not None:
                raise RuntimeError(f"the master exited; see {self.root / 'master.log'}")
            state = self.state()
            if predicate(state):
                return state
            time.sleep(0.25)
        raise TimeoutError(f"waited {timeout_s} s for {what}; logs in {self.root}")

    def executor_backend(self, pid: int) -> int | None:
        """The executor JVM (CoarseGrainedExecutorBackend) that `pid` runs under, when
        that JVM was launched by one of this cluster's workers."""
        workers = {w.pid for w in self.workers if w is not None}
        while pid:
            up = parent(pid)
            if up in workers:
                args = cmdline(pid)
                return pid if any("CoarseGrainedExecutorBackend" in a for a in args) else None
            pid = up
        return None

    def _stop(self, process: subprocess.Popen | None, grace_s: float = 15) -> None:
        """SIGTERM, then SIGKILL after `grace_s`; then whatever the process had launched
        (a worker's executors and their Python workers) and left running."""
        if process is None or process.poll() is not None:
            return
        tree = descendants(process.pid)
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        for pid in tree:
            if alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def stop(self) -> None:
        """Stops the workers, then the master."""
        for process in [*self.workers, self.master]:
            self._stop(process)

    def __enter__(self) -> Standalone:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
