"""benchmark.json -> Markdown: the machine, one table of median ratios with their
spread, the targets, and a section per comparison; and that Markdown placed into
docs/benchmarks.md between its markers, next to the hand-written interpretation."""

from __future__ import annotations

from pathlib import Path

BEGIN = "<!-- benchmark: generated from benchmark.json by jobs/benchmark.py; do not edit -->"
END = "<!-- benchmark: end of the generated part -->"


def update_doc(path: Path, report: dict) -> None:
    """Replaces what stands between BEGIN and END in `path` with `markdown(report)`."""
    text = Path(path).read_text()
    if BEGIN not in text or END not in text:
        raise ValueError(f"{path} lacks the markers {BEGIN!r} and {END!r}")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    Path(path).write_text(f"{head}{BEGIN}\n{markdown(report)}{END}{tail}")


def _num(value, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def _ratio_row(what: str, r: dict | None, note: str = "") -> str:
    if not r or r.get("median") is None:
        return f"| {what} | n/a | | 0 | {note} |"
    return (
        f"| {what} | {_num(r['median'])} | {_num(r['min'])} – {_num(r['max'])} | {r['n']} "
        f"| {note} |"
    )


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += [
        "| " + " | ".join(_num(c) if not isinstance(c, str) else c for c in row) + " |"
        for row in rows
    ]
    return lines


def markdown(report: dict) -> str:
    m, a, b, c, d, e, f, g = (report[k] for k in ("machine", *"abcdefg"))
    lines = [
        f"Run {report['date']}, config `{report['config']}`, {report['wall_s'] / 60:.1f} min wall.",
        "",
        "### Machine",
        "",
        *_table(
            [
                "cpu",
                "cores",
                "threads per core",
                "memory GB",
                "numpy float32 matmul GFLOP/s",
                "torch matmul GFLOP/s (1 thread / all)",
                f"gloo allreduce µs (8 values / {m['gradient_values']:,} gradients)",
            ],
            [
                [
                    m["cpu_model"],
                    m["cores"],
                    m["threads_per_core"],
                    m["memory_gb"],
                    m["numpy_matmul_gflops"],
                    f"{m['torch_matmul_gflops_1_thread']:.3g} / "
                    f"{m['torch_matmul_gflops_all_threads']:.3g}",
                    f"{m['gloo_allreduce_small_s'] * 1e6:.0f} / "
                    f"{m['gloo_allreduce_gradient_s'] * 1e6:.0f}",
                ]
            ],
        ),
        "",
        f"Model: {m['model']['n_inputs']} inputs, hidden {m['model']['hidden']}, "
        f"{m['model']['parameters']:,} parameters, batch {m['model']['batch_size']} per rank, "
        f"{m['model']['train_rows']:,} train rows.",
        "",
        "### Median ratios",
        "",
        "Each ratio is taken per round (variants interleaved, each run in a fresh process), "
        "then the median over rounds; spread is the lowest and highest round.",
        "",
        "| comparison | median | spread | rounds | note |",
        "|---|---|---|---|---|",
        _ratio_row("a. streaming / in-memory samples/s, 1 worker", a["stream_over_memory_1w"]),
        _ratio_row("a. streaming / in-memory samples/s, 2 workers", a["stream_over_memory_2w"]),
        _ratio_row(
            "b. 2 workers × 1 thread / 1 worker × 1 thread",
            b["two_workers_over_one"],
            f"efficiency {_num(b['efficiency']['median'])}, predicted "
            f"{_num(b['predicted_efficiency'])}",
        ),
        _ratio_row("b. 1 worker × 2 threads / 1 worker × 1 thread", b["two_threads_over_one"]),
        _ratio_row(
            "b. 2 workers × 1 thread / 1 worker × 2 threads", b["two_workers_over_two_threads"]
        ),
    ]
    largest_label = f"{c['largest']['scale']:g}x" if "scale" in c["largest"] else "largest"
    for key, label in (("base", "base data"), ("largest", largest_label)):
        part = c[key]
        if part["torch_distributor_finished"]:
            lines.append(
                _ratio_row(
                    f"c. sparknet / TorchDistributor end-to-end time, {label}",
                    part["sparknet_over_distributor_time"],
                    f"{part['epochs']} epochs; TorchDistributor finished "
                    f"{part.get('torch_distributor_rounds_finished', 'every')} rounds",
                )
            )
            lines.append(
                _ratio_row(
                    f"c. sparknet / TorchDistributor largest-process peak memory, {label}",
                    part["sparknet_over_distributor_largest_process_memory"],
                )
            )
        else:
            lines.append(
                f"| c. TorchDistributor, {label} | did not finish | | | "
                f"{part['torch_distributor'][0].get('error')} |"
            )
    lines.append(
        _ratio_row(
            "e. sparknet / pandas + scikit-learn preprocessing time, base data",
            e["sparknet_over_pandas_time"],
        )
    )
    lines += ["", "### Targets", ""]
    lines += _table(
        ["section", "target", "measured", "goal", "met"],
        [
            [
                t["section"],
                t["target"] + (f" ({t['note']})" if t.get("note") else ""),
                t["value"],
                t["goal"],
                t["met"],
            ]
            for t in report["targets"]
        ],
    )

    lines += ["", "### a, b: samples/s (optimizer steps only)", ""]
    lines += _table(
        ["variant", "median", "min", "max", "rounds", "largest data-wait share (median)"],
        [
            [name, s["median"], s["min"], s["max"], s["n"], a["data_wait_share"][name]["median"]]
            for name, s in a["samples_per_s"].items()
        ],
    )
    p = b["prediction"]
    lines += [
        "",
        f"Streamed and in-memory runs ended with bitwise the same weights: "
        f"{_num(a['same_weights_streamed_and_in_memory'])}.",
        f"Predicted 2-worker efficiency = step / (step + gradient allreduce) = "
        f"{p['step_s_1_thread'] * 1e3:.2f} ms / ({p['step_s_1_thread'] * 1e3:.2f} + "
        f"{p['allreduce_gradient_s'] * 1e3:.2f}) ms = "
        f"{_num(b['predicted_efficiency'])}; measured {_num(b['efficiency']['median'])} "
        f"(in memory {_num(b['efficiency_in_memory']['median'])}).",
        *_plain_ddp_lines(b.get("plain_ddp")),
        "",
        "### c: against TorchDistributor + toPandas",
        "",
    ]
    rows = []
    for key in ("base", "largest"):
        part = c[key]
        for name in ("sparknet", "torch_distributor"):
            for r in part[name]:
                rows.append(
                    [
                        key if key == "base" else largest_label,
                        name,
                        part["epochs"],
                        r.get("process_wall_s"),
                        (r.get("memory") or {}).get("largest_process_mb"),
                        (r.get("memory") or {}).get("largest_process_role") or r.get("error"),
                    ]
                )
    lines += _table(
        ["data", "trainer", "epochs", "end-to-end s", "largest process MB", "largest process"], rows
    )

    lines += ["", "### d: learners on the flights task (test split)", ""]
    lines += _table(
        ["learner", "test ROC AUC", "seconds", "what the seconds count"],
        [
            [name, r["test_roc_auc"], r["seconds"], r["what_seconds_count"]]
            for name, r in d["learners"].items()
        ],
    )

    lines += ["", "### e, f: preprocessing and scale", ""]
    lines += _table(
        [
            "scale",
            "rows in",
            "sparknet preprocess s",
            "µs/row",
            "stages s (clean/features/shard)",
            "pandas s",
            "pandas finished",
            "pandas peak MB",
            "epoch s",
            "epoch µs/row",
            "JVM peak MB",
            "python worker peak MB",
            "training rank peak MB",
        ],
        [
            [
                f"{s['scale']:g}x",
                s["rows_in"],
                s["preprocess_s"],
                s["preprocess_us_per_row"],
                " / ".join(f"{v:.0f}" for v in s["preprocess_stage_s"].values()),
                s["pandas_s"],
                s["pandas_finished"],
                s["pandas_peak_mb"],
                s["epoch_train_s"],
                s["epoch_us_per_row"],
                s["jvm_peak_mb"],
                s["python_worker_peak_mb"],
                ", ".join(f"{v:.0f}" for v in s["training_rank_peak_mb"]),
            ]
            for s in f["scales"]
        ],
    )

    lines += ["", "### g: the physical limit", ""]
    lines += [
        f"{g['flop_per_sample']:,} FLOP per sample (6 × parameters); torch matmul on the "
        f"step's GEMM shapes, 1 thread: {g['matmul_gflops_1_thread_same_shapes']:.3g} GFLOP/s.",
        "",
    ]
    lines += _table(
        ["variant", "achieved GFLOP/s", "matmul GFLOP/s, same shapes and threads", "share"],
        [
            [name, r["achieved_gflops"], r["matmul_gflops_same_shapes"], r["share"]]
            for name, r in g["variants"].items()
        ],
    )
    profile = report.get("profile") or {}
    if profile and "skipped" not in profile:
        lines += [
            "",
            "### Profiles (py-spy, every thread, idle included)",
            "",
            "main_training: the rank's main thread once it trains (imports, rendezvous, DDP "
            "set-up and teardown left out); prefetch: the thread that streams the shards.",
            "",
        ]
        rows = []
        for run, ranks in profile.items():
            for rank, threads in ranks.items():
                if not rank.startswith("rank"):
                    continue
                for thread in ("main_training", "prefetch"):
                    if thread in threads:
                        top = ", ".join(
                            f"{k} {v:.0%}" for k, v in list(threads[thread]["phases"].items())[:6]
                        )
                        rows.append([run, rank, thread, top])
        lines += _table(["run", "rank", "thread", "share of samples by phase"], rows)
        readers = [(run, r["reader_alone"]) for run, r in profile.items() if "reader_alone" in r]
        if readers:
            lines += ["", "The reader alone (rank 0, no training behind it), per epoch:", ""]
            lines += _table(
                ["run", "world size", "epoch", "first batch s", "epoch s", "rows/s",
                 "rows/s after the first batch"],
                [[run, r["world_size"], i, e["first_batch_s"], e["epoch_s"], e["rows_per_s"],
                  e["rows_per_s_after_first_batch"]]
                 for run, r in readers for i, e in enumerate(r["epochs"])],
            )  # fmt: skip
    return "\n".join(lines) + "\n"


def _plain_ddp_lines(plain: dict | None) -> list[str]:
    """b's yardstick: plain PyTorch DDP on in-memory tensors, no Spark."""
    if not plain:
        return []
    lines = [
        "",
        "Plain PyTorch DDP, the same layers on in-memory tensors, no Spark (2 processes "
        "over 2 × 1 process; 2 independent processes at once over 2 × 1):",
        "",
    ]
    rows = []
    for batch, r in plain["by_batch"].items():
        sps = r["samples_per_s"]
        rows.append(
            [
                batch,
                sps["one"]["median"],
                sps["two"]["median"],
                sps["two_independent"]["median"],
                f"{_num(r['efficiency']['median'])} "
                f"({_num(r['efficiency']['min'])}-{_num(r['efficiency']['max'])})",
                _num(r["independent_efficiency"]["median"]),
            ]
        )
    return lines + _table(
        [
            "batch",
            "1 process samples/s",
            "2 DDP processes",
            "2 independent",
            "DDP efficiency",
            "independent",
        ],
        rows,
    )
