"""Where a training rank's time goes: py-spy samples each rank's process (every thread,
idle ones included, so a thread waiting for data counts as waiting) while it trains;
the collapsed stacks are summed into phases of the training loop and of the prefetch
thread that streams the shards.

The phases follow the loop in sparknet/train/worker.py and the reader in
sparknet/train/data.py; a sample belongs to the first phase whose marker appears in
its stack, looked for from the innermost frame outwards."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

# (phase, markers): a marker is found anywhere in a frame ("function (file:line)").
START_UP = ["imports", "rendezvous", "DDP set-up", "teardown", "outside run_rank"]
OUTER = {"rendezvous", "DDP set-up", "teardown", "validation", "checkpoint"}
MAIN_PHASES = [
    ("imports", ["<frozen importlib", "<frozen zipimport"]),
    ("rendezvous", ["init_process_group (sparknet/train/worker.py"]),
    ("DDP set-up", ["_verify_param_shape", "DistributedDataParallel.__init__"]),
    ("teardown", ["shut_down (sparknet/train/worker.py"]),
    ("wait for data (queue)", ["Queue.get (queue.py"]),
    ("cut batches", ["_cut_batches"]),
    ("in-memory gather", ["iterate_memory", "load_groups"]),
    ("allreduce wait", ["all_reduce (sparknet/train/worker.py", "_gather_equal"]),
    ("backward (incl. DDP gradient allreduce)", ["backward (torch/", "_engine_run_backward"]),
    ("forward", ["_call_impl (torch/nn/modules/module.py", "forward (torch/", "dropout (torch"]),
    ("optimizer step", ["(torch/optim/"]),
    ("validation", ["_validate (sparknet/train/worker.py"]),
    ("checkpoint", ["_checkpoint (sparknet/train/worker.py"]),
    ("progress events", ["EventClient"]),
    ("loss, bookkeeping", ["_train (sparknet/train/worker.py"]),
]
PREFETCH_PHASES = [
    ("queue full (reader ahead)", ["Queue.put (queue.py", "put (sparknet/train/data.py"]),
    ("gather rows of a slice", ["_slice_columns (sparknet/train/data.py"]),
    ("arrow -> pandas -> numpy (petastorm)", ["to_pandas", "pandas", "_load_rows"]),
    ("parquet read + decode", ["read_row_group", "read_table", "read (pyarrow/parquet"]),
    ("petastorm reader other", ["petastorm"]),
]


def classify(frames: list[str], phases: list[tuple[str, list[str]]]) -> str:
    """The phase of the innermost frame that has a marker; main-thread samples outside
    run_rank are the Spark worker's own (before and after the task)."""
    if phases is MAIN_PHASES:
        if not any("run_rank (sparknet" in f for f in frames):
            return "outside run_rank"
        # Whole phases whose own waits and reads must not count as the loop's.
        for phase, markers in MAIN_PHASES:
            if phase in OUTER and any(m in f for f in frames for m in markers):
                return phase
    for frame in reversed(frames):
        for phase, markers in phases:
            if any(m in frame for m in markers):
                return phase
    return "other"


def summarise(raw: str) -> dict:
    """py-spy's `--format raw --threads` output -> samples per phase, per thread role,
    and the innermost frames that cost most."""
    phases: dict[str, Counter] = {"main": Counter(), "prefetch": Counter(), "other": Counter()}
    leaves: dict[str, Counter] = {"main": Counter(), "prefetch": Counter(), "other": Counter()}
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        thread = frames[0]
        frames = frames[1:]
        if "MainThread" in thread:
            role, table = "main", MAIN_PHASES
        elif "sparknet-prefetch" in thread and any("produce (sparknet" in f for f in frames):
            # (py-spy names threads by OS id, which a later thread may reuse.)
            role, table = "prefetch", PREFETCH_PHASES
        else:
            role, table = "other", []
        phases[role][classify(frames, table) if table else "other"] += int(count)
        if frames:
            leaves[role][frames[-1]] += int(count)
    out = {}
    loop = Counter({k: v for k, v in phases["main"].items() if k not in START_UP})
    if loop:
        # The main thread once it trains: start-up and teardown left out.
        total = sum(loop.values())
        out["main_training"] = {
            "samples": total,
            "phases": {k: v / total for k, v in loop.most_common()},
        }
    for role, counter in phases.items():
        total = sum(counter.values())
        if not total:
            continue
        out[role] = {
            "samples": total,
            "phases": {k: v / total for k, v in counter.most_common()},
            "top_frames": [
                {"frame": frame, "share": n / total} for frame, n in leaves[role].most_common(8)
            ],
        }
    return out


class RankProfiler:
    """Starts `py-spy record` on every rank listed in `ranks_file` once it appears, stops
    them (SIGINT: py-spy then writes its file) on exit."""

    def __init__(self, ranks_file: Path, out_dir: Path, rate: int = 200) -> None:
        self.ranks_file = ranks_file
        self.out_dir = out_dir
        self.rate = rate
        self.procs: list[tuple[int, Path, subprocess.Popen]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._attach, name="profiler", daemon=True)

    @staticmethod
    def available() -> str | None:
        return shutil.which("py-spy") or (
            str(Path(sys.executable).with_name("py-spy"))
            if Path(sys.executable).with_name("py-spy").exists()
            else None
        )

    def __enter__(self) -> RankProfiler:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._thread.start()
        return self

    def _attach(self) -> None:
        import json

        binary = self.available()
        while not self._stop.wait(0.05):
            if not self.ranks_file.exists():
                continue
            try:
                ranks = json.loads(self.ranks_file.read_text())["ranks"]
            except (OSError, ValueError, KeyError):
                continue
            for r in ranks:
                out = self.out_dir / f"rank{r['rank']}.txt"
                cmd = [
                    binary,
                    "record",
                    "--pid",
                    str(r["pid"]),
                    "--rate",
                    str(self.rate),
                    "--idle",
                    "--threads",
                    "--nonblocking",
                    "--format",
                    "raw",
                    "-o",
                    str(out),
                ]
                proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                self.procs.append((r["rank"], out, proc))
            return

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        for _, _, proc in self.procs:
            proc.send_signal(signal.SIGINT)
        for _, _, proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        time.sleep(0.1)

    def report(self) -> dict:
        out = {}
        for rank, path, _ in self.procs:
            if path.exists():
                out[f"rank {rank}"] = summarise(path.read_text())
        return out
