"""How comparisons are timed: variants interleaved round by round (so that a slow
minute on a shared machine hits every variant, not one), each run in a fresh process,
summarised as the median of per-round ratios with their spread; and the peak memory of
every process a run starts."""

from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)


def interleave(
    variants: dict[str, Callable[[int], dict]], rounds: int, what: str
) -> dict[str, list[dict]]:
    """Runs every variant once per round, `rounds` times; round r starts at variant
    r mod n, so no variant always runs first (after a cold cache) or last. Returns each
    variant's results in round order."""
    names = list(variants)
    results: dict[str, list[dict]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            started = time.perf_counter()
            result = variants[name](r)
            results[name].append(result)
            log.info(
                "%s round %d/%d: %s done in %.1f s",
                what,
                r + 1,
                rounds,
                name,
                time.perf_counter() - started,
            )
    return results


def spread(values: list[float]) -> dict:
    """median, min, max and the interquartile range of `values`."""
    ordered = sorted(values)
    if not ordered:
        return {"n": 0, "median": None, "min": None, "max": None, "q1": None, "q3": None}
    if len(ordered) >= 2:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        q1 = q3 = ordered[0]
    return {
        "n": len(ordered),
        "median": statistics.median(ordered),
        "min": ordered[0],
        "max": ordered[-1],
        "q1": q1,
        "q3": q3,
    }


def ratios(numerator: list[float], denominator: list[float]) -> dict:
    """Per-round ratios (round i of one variant over round i of the other: runs that
    were close in time) and their spread."""
    per_round = [a / b for a, b in zip(numerator, denominator, strict=True) if b]
    return {"per_round": per_round, **spread(per_round)}


# ---------------------------------------------------------------------------------------
# Peak memory


RANK_ROLE = "training rank (Spark python worker)"
YOUNG_S = 1.0


def _role(proc, ranks: set[int]) -> str:
    """What a process is, from its command line and parent: the JVM (in local mode the
    driver and the executor), PySpark's daemon and the Python workers it forks, a
    training rank, torchrun and the processes it starts."""
    try:
        cmd = " ".join(proc.cmdline())
        parent = proc.parent()
        parent_cmd = " ".join(parent.cmdline()) if parent else ""
    except Exception:  # gone between listing and asking
        return "gone"
    if proc.pid in ranks:
        return RANK_ROLE
    if "java" in proc.name() or cmd.startswith("java") or "/java " in cmd:
        return "jvm (driver + executor)"
    if "torch_run_process_wrapper" in cmd or "torch.distributed.run" in cmd or "torchrun" in cmd:
        return "torchrun launcher"
    if "torch_run_process_wrapper" in parent_cmd or "torchrun" in parent_cmd:
        return "torchrun training process"
    if "torch.distributed.run" in parent_cmd:
        return "torchrun training process"
    if "pyspark.daemon" in cmd:
        return "python worker" if "pyspark.daemon" in parent_cmd else "python daemon"
    if "pyspark.worker" in cmd:
        return "python worker"
    if proc.pid == os.getpid():
        return "driver (python)"
    return proc.name()


def _vm_hwm_bytes(pid: int) -> int | None:
    """The kernel's own peak resident size of `pid` (VmHWM), exact where sampling may
    miss a short spike."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class PeakMemory:
    """Samples the resident size of this process and all its descendants every
    `interval_s` on a background thread, keeping each process's peak (also its VmHWM,
    read while it lives). `ranks_files` (train/ranks.json) name the training ranks."""

    def __init__(self, interval_s: float = 0.2, ranks_files: list[Path] = ()) -> None:
        self.interval_s = interval_s
        self.ranks_files = list(ranks_files)
        self.peaks: dict[int, dict] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peak-memory", daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _ranks(self) -> set[int]:
        pids: set[int] = set()
        for path in self.ranks_files:
            try:
                pids |= {r["pid"] for r in json.loads(path.read_text())["ranks"]}
            except (OSError, ValueError, KeyError):
                continue
        return pids

    def _sample(self) -> None:
        import psutil

        me = psutil.Process()
        ranks = self._ranks()
        try:
            procs = [me, *me.children(recursive=True)]
        except psutil.Error:
            return
        now = time.time()
        for proc in procs:
            try:
                # A child forked moments ago shares its parent's pages until it execs
                # (and inherits its VmHWM): a JVM spawning a process would count twice.
                if now - proc.create_time() < YOUNG_S:
                    continue
                rss = proc.memory_info().rss
            except psutil.Error:
                continue
            hwm = _vm_hwm_bytes(proc.pid) or 0
            entry = self.peaks.setdefault(proc.pid, {"pid": proc.pid, "peak_rss_bytes": 0})
            if entry.get("role") in (None, "gone", "bash", "sh") or proc.pid in ranks:
                # Asked until it is known: a launcher script becomes the JVM when it
                # execs, a Python worker becomes a rank when ranks.json names it; a
                # worker orphaned when its daemon exits stays a worker.
                entry["role"] = _role(proc, ranks)
            entry["peak_rss_bytes"] = max(entry["peak_rss_bytes"], rss, hwm)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def report(self) -> dict:
        """Every process's peak in MB, the largest, and the largest per role."""
        processes = sorted(self.peaks.values(), key=lambda p: -p["peak_rss_bytes"])
        by_role: dict[str, float] = {}
        for p in processes:
            mb = p["peak_rss_bytes"] / 2**20
            by_role[p["role"]] = max(by_role.get(p["role"], 0.0), mb)
        return {
            "largest_process_mb": processes[0]["peak_rss_bytes"] / 2**20 if processes else None,
            "largest_process_role": processes[0]["role"] if processes else None,
            "by_role_mb": by_role,
            "processes": [
                {"pid": p["pid"], "role": p["role"], "peak_rss_mb": p["peak_rss_bytes"] / 2**20}
                for p in processes
            ],
        }


# ---------------------------------------------------------------------------------------
# One measurement in a fresh process


def _tree_rss_bytes(pid: int) -> int:
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            continue
    return total


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL to the child's session (its JVM) and to every process below it: PySpark's
    daemon puts its Python workers in a process group of their own, and what they
    start (TorchDistributor's torchrun) would outlive a kill of the session alone."""
    import psutil

    try:
        below = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        below = []
    os.killpg(proc.pid, 9)
    for child in below:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    psutil.wait_procs(below, timeout=10)


def run_child(
    kind: str, params: dict, workdir: Path, timeout_s: float, memory_cap_mb: float | None = None
) -> dict:
    """Runs `sparknet.benchmark.child` for one measurement in a fresh interpreter (its
    own Spark, its own Python workers, nothing cached from the run before) and returns
    its result; the child's log goes to a file next to it. A failure, a timeout or
    more resident memory than `memory_cap_mb` (summed over the child's processes; the
    machine is shared) is a result too (`ok: false` and why): "does it finish" is part
    of what is measured."""
    workdir.mkdir(parents=True, exist_ok=True)
    fd, spec_path = tempfile.mkstemp(prefix=f"{kind}-", suffix=".json", dir=workdir)
    os.close(fd)
    spec_path = Path(spec_path)
    out_path = spec_path.with_suffix(".out.json")
    log_path = spec_path.with_suffix(".log")
    spec_path.write_text(json.dumps({"kind": kind, "params": params}))
    env = dict(os.environ)
    env.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    env["PYSPARK_PYTHON"] = sys.executable
    env["PYSPARK_DRIVER_PYTHON"] = sys.executable
    # torchrun (TorchDistributor) must be the one next to this interpreter.
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    started = time.perf_counter()
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sparknet.benchmark.child", str(spec_path), str(out_path)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        code, why = None, None
        while code is None:
            try:
                code = proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                if time.perf_counter() - started > timeout_s:
                    why = f"timed out after {timeout_s:.0f} s"
                elif memory_cap_mb and _tree_rss_bytes(proc.pid) > memory_cap_mb * 2**20:
                    why = f"stopped above the memory cap of {memory_cap_mb:.0f} MB"
                if why:
                    _kill_tree(proc)
                    break
    wall = time.perf_counter() - started
    if code == 0 and out_path.exists():
        result = json.loads(out_path.read_text())
        result.setdefault("ok", True)
    else:
        tail = log_path.read_text(errors="replace").splitlines()[-12:]
        why = why or f"exit code {code}"
        result = {"ok": False, "error": why, "log_tail": tail}
        log.warning("%s failed (%s); log %s", kind, why, log_path)
    result["process_wall_s"] = wall
    result["log"] = str(log_path)
    return result
