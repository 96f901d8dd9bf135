"""`jobs/benchmark.py --config FILE --out DIR [--smoke] [--scales 1,10,30]`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from sparknet.logs import setup_logging

log = logging.getLogger("sparknet.benchmark")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="sparknet benchmark: writes OUT/benchmark.json and OUT/benchmark.md"
    )
    parser.add_argument("--config", default="conf/flights.yaml", help="dataset YAML")
    parser.add_argument("--out", required=True, help="folder for the results and scratch data")
    parser.add_argument(
        "--smoke", action="store_true", help="every comparison, tiny and fast (CI); no timing"
    )
    parser.add_argument(
        "--scales",
        help="comma-separated multiples of the real data for the scale section, e.g. 1,10,30 "
        "(default 1,10; smoke 0.01,0.02)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    # Loopback only, and every Spark this starts runs this interpreter.
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    from sparknet.benchmark.run import run_benchmark

    scales = None
    if args.scales:
        try:
            scales = [float(s) for s in args.scales.split(",")]
        except ValueError:
            log.error("--scales: expected numbers separated by commas, got %r", args.scales)
            return 2
        if any(s <= 0 for s in scales):
            log.error("--scales: every scale must be > 0, got %r", args.scales)
            return 2
    try:
        report = run_benchmark(args.config, args.out, args.smoke, scales)
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130
    log.info(
        "benchmark finished in %.1f min: %s/benchmark.json, benchmark.md",
        report["wall_s"] / 60,
        args.out,
    )
    return 0
