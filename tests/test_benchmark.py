"""The benchmark's smoke run (jobs/benchmark.py --smoke): every section runs, tiny, and
writes well-formed JSON and Markdown. Nothing here is about speed: the numbers of a
smoke run on a shared CI machine mean nothing; docs/benchmarks.md holds a full run."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sparknet.benchmark.measure import PeakMemory, interleave, ratios, spread

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("machine", "a", "b", "c", "d", "e", "f", "g")


def test_interleaving_rotates_the_first_variant_each_round():
    order = []

    def variant(name):
        return lambda r: order.append((r, name)) or {"round": r}

    results = interleave({n: variant(n) for n in "ABC"}, 3, "test")
    assert order == [
        (0, "A"),
        (0, "B"),
        (0, "C"),
        (1, "B"),
        (1, "C"),
        (1, "A"),
        (2, "C"),
        (2, "A"),
        (2, "B"),
    ]
    assert [r["round"] for r in results["A"]] == [0, 1, 2]


def test_ratios_pair_rounds_and_report_their_spread():
    r = ratios([2.0, 3.0, 8.0], [1.0, 2.0, 4.0])
    assert r["per_round"] == [2.0, 1.5, 2.0]
    assert (r["median"], r["min"], r["max"], r["n"]) == (2.0, 1.5, 2.0, 3)
    assert spread([])["median"] is None


def test_peak_memory_sees_a_child_process_grow():
    grow = (
        "import time; b = bytearray(200 * 2**20); b[::4096] = b'x' * len(b[::4096]); time.sleep(1)"
    )
    with PeakMemory(interval_s=0.05) as memory:
        proc = subprocess.Popen([sys.executable, "-c", grow])
        proc.wait()
        time.sleep(0.1)
    report = memory.report()
    child = [p for p in report["processes"] if p["pid"] == proc.pid]
    assert child and child[0]["peak_rss_mb"] > 190


@pytest.mark.slow
def test_smoke_run_writes_every_section(tmp_path):
    out = tmp_path / "bench"
    env = {
        **os.environ,
        "SPARK_LOCAL_IP": "127.0.0.1",
        "PYSPARK_PYTHON": sys.executable,
        "PYSPARK_DRIVER_PYTHON": sys.executable,
    }
    done = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "benchmark.py"), "--smoke", "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "benchmark.json").read_text())
    for section in SECTIONS:
        assert section in report, section
    machine = report["machine"]
    assert machine["cores"] >= 1 and machine["numpy_matmul_gflops"] > 0
    assert machine["gloo_allreduce_gradient_s"] > 0
    for name in ("stream_1w", "memory_1w", "stream_2w", "memory_2w", "stream_1w_2t"):
        assert report["a"]["samples_per_s"][name]["median"] > 0, name
    # The in-memory yardstick trains on the very batches streaming does.
    assert report["a"]["same_weights_streamed_and_in_memory"] is True
    assert 0 < report["b"]["predicted_efficiency"] <= 1
    assert report["c"]["base"]["torch_distributor_finished"] is True
    for learner in report["d"]["learners"].values():
        assert 0 <= learner["test_roc_auc"] <= 1 and learner["seconds"] > 0
    assert [s["scale"] for s in report["f"]["scales"]] == [0.01, 0.02]
    for s in report["f"]["scales"]:
        assert s["rows_in"] > 0 and s["preprocess_s"] > 0 and s["training_rank_peak_mb"]
        assert s["pandas_finished"] is True
    assert all(math.isfinite(v["share"]) for v in report["g"]["variants"].values())
    assert {t["section"] for t in report["targets"]} >= {"a", "b", "c", "d", "f"}
    text = (out / "benchmark.md").read_text()
    for heading in (
        "### Machine",
        "### Median ratios",
        "### Targets",
        "### a, b",
        "### c",
        "### d",
        "### e, f",
        "### g",
    ):
        assert heading in text, heading
    # Scratch data is removed; only the results and the kept shards remain.
    assert not (out / "work").exists()
