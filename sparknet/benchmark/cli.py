"""`jobs/benchmark.py --config FILE --out DIR [--smoke] [--scales 1,10,30] [--docs FILE]`;
`jobs/benchmark.py --from-json OUT/benchmark.json --docs docs/benchmarks.md` only
rewrites the generated part of the document."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from sparknet.logs import setup_logging

log = logging.getLogger("sparknet.benchmark")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="sparknet benchmark: writes OUT/benchmark.json and OUT/benchmark.md"
    )
    parser.add_argument("--config", default="conf/flights.yaml", help="dataset YAML")
    parser.add_argument("--out", help="folder for the results and scratch data")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the sections that an interrupted run with the same sizes saved in --out",
    )
    parser.add_argument("--docs", help="also write the results into this document's generated part")
    parser.add_argument("--from-json", help="run nothing: render this benchmark.json into --docs")
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
    from sparknet.benchmark.report import update_doc

    if args.from_json:
        if not args.docs:
            log.error("--from-json needs --docs, the document to write into")
            return 2
        update_doc(Path(args.docs), json.loads(Path(args.from_json).read_text()))
        log.info("wrote the results of %s into %s", args.from_json, args.docs)
        return 0
    if not args.out:
        log.error("--out is required: the folder for the results and scratch data")
        return 2
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
        report = run_benchmark(args.config, args.out, args.smoke, scales, args.resume)
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130
    log.info(
        "benchmark finished in %.1f min: %s/benchmark.json, benchmark.md",
        report["wall_s"] / 60,
        args.out,
    )
    if args.docs:
        update_doc(Path(args.docs), report)
    return 0
