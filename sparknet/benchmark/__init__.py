"""The benchmark of docs/benchmarks.md (issue 9): jobs/benchmark.py runs it.

machine.py measures the machine; measure.py interleaves variants, runs each
measurement in a fresh process and samples peak memory; child.py is that process;
baselines.py holds what sparknet is compared with; generate.py makes flights-like data
at any scale; run.py runs the sections and report.py writes the Markdown."""
