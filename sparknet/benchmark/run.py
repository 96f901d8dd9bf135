"""The benchmark: every comparison of docs/benchmarks.md, on the same data, written as
JSON and a Markdown table.

    python jobs/benchmark.py --out runs/benchmark [--smoke] [--scales 1,10,30]

Sections (issue 9): machine; a reader overhead; b scaling; c TorchDistributor;
d other learners; e preprocessing against pandas; f scale; g the physical limit.
Every measurement runs in a fresh process (measure.run_child); variants are
interleaved round by round (measure.interleave).
"""

from __future__ import annotations

import datetime
import json
import logging
import operator
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sparknet.benchmark import machine
from sparknet.benchmark.child import load, merged, shard_columns
from sparknet.benchmark.generate import generate
from sparknet.benchmark.measure import interleave, ratios, run_child, spread
from sparknet.benchmark.report import markdown
from sparknet.config import read_yaml
from sparknet.ingest import package_files
from sparknet.logs import set_stage
from sparknet.run_dir import read_json, write_json

log = logging.getLogger("sparknet.benchmark")


@dataclass(frozen=True)
class Sizes:
    """How much of everything a run does. The full run took 49 minutes of sections on 2
    quiet cores with --scales 1,10,30, 31 of them in f (docs/benchmarks.md)."""

    # Scale of the data that sections a-e use: None is the real flights (ingested);
    # a number is generated data of that multiple (smoke).
    base_scale: float | None = None
    train_rounds: int = 5  # a, b: rounds of every variant
    train_epochs: int = 2
    distributor_rounds: int = 5  # c: a pair takes under a minute at 1x, so at least 5
    distributor_epochs: int = 2
    preprocess_rounds: int = 2  # e at the base size
    # d: L-BFGS iterations; each is a pass over the train split (~10 s here at 1x)
    spark_mlp_max_iter: int = 25
    learner_epochs: int | None = None  # d: sparknet and sklearn's MLP (None: the config's)
    scales: tuple[float, ...] = (1.0, 10.0)  # f
    rows_per_row_group: int | None = None
    # e, f and c: pandas + scikit-learn and TorchDistributor + toPandas are stopped above
    # this much memory (all their processes together), and count as not finished.
    pandas_memory_cap_mb: float = 12_000
    timeout_s: float = 3600
    distributor_timeout_s: float = 900  # c: one TorchDistributor run (see distributor())
    plain_ddp_samples: int = 300_000  # b's plain PyTorch yardstick: samples per measurement
    profile: bool = True  # py-spy on the ranks of a and b (docs/benchmarks.md)
    hgb_max_iter: int = 100  # d: HistGradientBoostingClassifier's boosting rounds (its default)
    spark_conf: dict = field(default_factory=lambda: {"spark.ui.enabled": "false"})


FULL = Sizes()
SMOKE = Sizes(
    base_scale=0.02,
    train_rounds=1,
    train_epochs=1,
    distributor_rounds=1,
    distributor_epochs=1,
    preprocess_rounds=1,
    spark_mlp_max_iter=3,
    learner_epochs=1,
    scales=(0.01, 0.02),
    rows_per_row_group=1024,
    timeout_s=600,
    profile=False,
    hgb_max_iter=10,
    spark_conf={"spark.ui.enabled": "false", "spark.sql.shuffle.partitions": "2"},
    plain_ddp_samples=20_000,
)


class Benchmark:
    def __init__(self, config_path: str, out: Path, sizes: Sizes) -> None:
        self.config_path = str(config_path)
        self.out = Path(out).resolve()
        self.sizes = sizes
        self.work = self.out / "work"
        self.data = self.out / "data"
        self.config = read_yaml(config_path)
        self.results: dict = {}
        self.scale_dirs: list[Path] = []

    # -- helpers -------------------------------------------------------------------------

    def overrides(self, more: dict | None = None) -> dict:
        base: dict = {"spark": {"conf": dict(self.sizes.spark_conf)}}
        if self.sizes.rows_per_row_group:
            base["shard"] = {"rows_per_row_group": self.sizes.rows_per_row_group}
        return merged(base, more or {})

    def model_spec(self, shards: Path) -> dict:
        """The train stage's network (its own build_model_spec) on these shards' columns,
        as ModelSpec's fields: what the plain-PyTorch yardsticks build (b's plain DDP, c's
        TorchDistributor). Built here, not in the child, whose imports count in c's time.
        No train-split label statistics: the benchmark compares binary classifiers (ROC
        AUC), whose network needs none."""
        from sparknet.train.launcher import build_model_spec

        config = load({"config": self.config_path, "overrides": self.overrides()})
        spec = build_model_spec(config, shard_columns(shards), train_labels={})
        return asdict(spec)

    def child(self, kind: str, params: dict, timeout_s: float | None = None, **kwargs) -> dict:
        params = {"config": self.config_path, **params}
        params["overrides"] = self.overrides(params.get("overrides"))
        timeout_s = min(timeout_s or self.sizes.timeout_s, self.sizes.timeout_s)
        result = run_child(kind, params, self.work, timeout_s, **kwargs)
        if not result.get("ok") and kind not in ("pandas_preprocess", "distributor"):
            raise RuntimeError(f"benchmark child {kind} failed: {result.get('log_tail')}")
        return result

    def raw_overrides(self, generated: bool) -> dict:
        """Generated raw data is a folder of CSV files (generate.py)."""
        return {"sources": {self.config["main"]: {"path": "flights"}}} if generated else {}

    def prepare_raw(self, name: str, scale: float | None) -> tuple[Path, int]:
        """raw/ for a run directory: the real files (scale None) or generated ones."""
        root = self.data / name
        raw = root / "raw"
        if raw.exists():
            shutil.rmtree(raw)
        raw.mkdir(parents=True)
        if scale is None:
            files = package_files(self.config["ingest"]["package"])
            for inside, target in self.config["ingest"]["files"].items():
                source = files[inside]
                if source.suffix == ".zip":
                    import zipfile

                    with zipfile.ZipFile(source) as archive:
                        (raw / target).write_bytes(archive.read(archive.namelist()[0]))
                else:
                    shutil.copyfile(source, raw / target)
            with open(raw / "flights.csv") as f:
                rows = sum(1 for _ in f) - 1
        else:
            rows = generate(raw, scale)
        return raw, rows

    # -- sections ------------------------------------------------------------------------

    def base_data(self) -> None:
        """e at the base size: sparknet's clean + features + shard against pandas +
        scikit-learn, interleaved; the first sparknet round's shards feed a-d."""
        set_stage("e preprocessing")
        generated = self.sizes.base_scale is not None
        raw, rows = self.prepare_raw("base", self.sizes.base_scale)
        overrides = self.raw_overrides(generated)
        runs = []

        def spark_variant(r: int) -> dict:
            target = self.data / ("base" if r == 0 else f"base-{r}")
            if r:
                shutil.rmtree(target, ignore_errors=True)
                target.mkdir(parents=True)
                (target / "raw").symlink_to(raw, target_is_directory=True)
            result = self.child("preprocess", {"run_dir": str(target), "overrides": overrides})
            if r:
                shutil.rmtree(target, ignore_errors=True)
            runs.append(result)
            return result

        def pandas_variant(r: int) -> dict:
            return self.child(
                "pandas_preprocess",
                {"raw": str(raw), "out": str(self.work / "pandas-shards"), "overrides": overrides},
                memory_cap_mb=self.sizes.pandas_memory_cap_mb,
            )

        results = interleave(
            {"sparknet": spark_variant, "pandas": pandas_variant},
            self.sizes.preprocess_rounds,
            "e",
        )
        self.results["e"] = {
            "rows_in": rows,
            "data": "real flights" if not generated else f"generated {self.sizes.base_scale}x",
            "sparknet": results["sparknet"],
            "pandas": results["pandas"],
            "sparknet_over_pandas_time": ratios(
                [r["preprocess_s"] for r in results["sparknet"]],
                [r.get("preprocess_s", float("nan")) for r in results["pandas"]],
            ),
            "by_scale": [],
        }

    def model_shape(self) -> dict:
        manifest = read_json(self.base / "shards.json")
        hidden = list(self.config["train"]["hidden"])
        widths = [len(manifest["columns"]), *hidden, 1]
        parameters = sum(i * o + o for i, o in zip(widths[:-1], widths[1:], strict=True))
        return {
            "n_inputs": widths[0],
            "hidden": hidden,
            "parameters": parameters,
            "batch_size": self.config["train"]["batch_size"],
            "train_rows": manifest["splits"]["train"]["rows"],
        }

    def machine_section(self) -> None:
        set_stage("machine")
        self.results["machine"] = machine.probe()

    def model_section(self) -> None:
        """The model the base data gives (PCA fixes its inputs) and the allreduce of its
        gradient."""
        set_stage("machine")
        shape = self.model_shape()
        self.results["machine"]["model"] = shape
        machine.add_gradient(self.results["machine"], shape["parameters"])

    def reader_and_scaling(self) -> None:
        """a and b: one child per round runs the 1-thread variants in one Spark
        (spark.task.cpus=1), another the 1 worker x 2 threads variant (task.cpus=2)."""
        set_stage("a+b reader, scaling")
        epochs = self.sizes.train_epochs
        one_thread = [
            {"name": "stream_1w", "workers": 1, "feed": "stream", "epochs": epochs},
            {"name": "memory_1w", "workers": 1, "feed": "memory", "epochs": epochs},
            {"name": "stream_2w", "workers": 2, "feed": "stream", "epochs": epochs},
            {"name": "memory_2w", "workers": 2, "feed": "memory", "epochs": epochs},
        ]
        two_threads = [{"name": "stream_1w_2t", "workers": 1, "feed": "stream", "epochs": epochs}]
        collected: dict[str, list[dict]] = {}

        def series(runs: list[dict], task_cpus: int):
            def variant(r: int) -> dict:
                # Within the child too, each round starts at another variant.
                shift = r % len(runs)
                ordered = runs[shift:] + runs[:shift]
                result = self.child(
                    "train",
                    {
                        "shards_from": str(self.base),
                        "work_dir": str(self.work / f"train-{task_cpus}t-{r}"),
                        "runs": ordered,
                        "overrides": {"spark": {"conf": {"spark.task.cpus": str(task_cpus)}}},
                    },
                )
                for run in result["runs"]:
                    collected.setdefault(run["name"], []).append(run)
                return result

            return variant

        interleave(
            {
                "1 thread per task": series(one_thread, 1),
                "2 threads per task": series(two_threads, 2),
            },
            self.sizes.train_rounds,
            "a+b",
        )
        sps = {name: [run["samples_per_s"] for run in runs] for name, runs in collected.items()}
        same_weights = all(
            s["weights_digest"] == m["weights_digest"]
            for w in ("1w", "2w")
            for s, m in zip(collected[f"stream_{w}"], collected[f"memory_{w}"], strict=True)
        )
        self.results["a"] = {
            "samples_per_s": {name: spread(values) for name, values in sps.items()},
            "stream_over_memory_1w": ratios(sps["stream_1w"], sps["memory_1w"]),
            "stream_over_memory_2w": ratios(sps["stream_2w"], sps["memory_2w"]),
            "data_wait_share": {
                name: spread([run["data_wait_share"] for run in runs])
                for name, runs in collected.items()
            },
            "same_weights_streamed_and_in_memory": same_weights,
            "runs": collected,
        }
        # b: the prediction from the machine's numbers. One step on one thread takes
        # batch / (1 worker's samples/s); with 2 workers each step also waits for DDP's
        # gradient allreduce, the only collective of a step (worker.py).
        m = self.results["machine"]
        batch = m["model"]["batch_size"]
        step_s = batch / spread(sps["stream_1w"])["median"]
        communicate_s = m["gloo_allreduce_gradient_s"]
        efficiency = [
            two / (2 * one) for two, one in zip(sps["stream_2w"], sps["stream_1w"], strict=True)
        ]
        self.results["b"] = {
            "two_workers_over_one": ratios(sps["stream_2w"], sps["stream_1w"]),
            "two_threads_over_one": ratios(sps["stream_1w_2t"], sps["stream_1w"]),
            "two_workers_over_two_threads": ratios(sps["stream_2w"], sps["stream_1w_2t"]),
            "efficiency": {"per_round": efficiency, **spread(efficiency)},
            "efficiency_in_memory": spread(
                [t / (2 * o) for t, o in zip(sps["memory_2w"], sps["memory_1w"], strict=True)]
            ),
            "predicted_efficiency": step_s / (step_s + communicate_s),
            "prediction": {
                "step_s_1_thread": step_s,
                "allreduce_gradient_s": m["gloo_allreduce_gradient_s"],
            },
        }

    def plain_ddp(self) -> None:
        """b's yardstick: the same MLP in plain PyTorch DDP processes on in-memory
        tensors, no Spark: 1 process, 2 processes, and 2 independent processes at once
        (no allreduce), at the config's batch size and at 4 times it; interleaved."""
        set_stage("b plain DDP")
        m = self.results["machine"]["model"]
        spec = self.model_spec(self.base)
        out: dict = {}
        for batch in (m["batch_size"], 4 * m["batch_size"]):
            steps = max(20, self.sizes.plain_ddp_samples // batch)

            def run(processes: int, independent: bool = False, batch=batch, steps=steps):
                return lambda r: {
                    "samples_per_s": machine.plain_ddp_samples_per_s(
                        spec, batch, processes, steps, independent
                    )
                }

            runs = interleave(
                {"one": run(1), "two": run(2), "two_independent": run(2, True)},
                self.sizes.train_rounds,
                f"b plain DDP, batch {batch}",
            )
            sps = {name: [r["samples_per_s"] for r in rs] for name, rs in runs.items()}
            efficiency = [t / (2 * o) for t, o in zip(sps["two"], sps["one"], strict=True)]
            independent = [
                t / (2 * o) for t, o in zip(sps["two_independent"], sps["one"], strict=True)
            ]
            out[str(batch)] = {
                "samples_per_s": {name: spread(values) for name, values in sps.items()},
                "efficiency": {"per_round": efficiency, **spread(efficiency)},
                "independent_efficiency": {"per_round": independent, **spread(independent)},
            }
        self.results["b"]["plain_ddp"] = {"model": spec, "by_batch": out}

    def profiles(self) -> None:
        """py-spy on every rank of one streamed and one in-memory run with 1 worker and
        one streamed run with 2: where the time of a and b goes (profile.py)."""
        set_stage("profiles")
        from sparknet.benchmark.profile import RankProfiler

        if not RankProfiler.available():
            self.results["profile"] = {"skipped": "py-spy is not installed"}
            return
        epochs = self.sizes.train_epochs
        runs = [
            {"name": name, "workers": workers, "feed": feed, "epochs": epochs, "profile": True}
            for name, workers, feed in (
                ("stream_1w", 1, "stream"),
                ("memory_1w", 1, "memory"),
                ("stream_2w", 2, "stream"),
            )
        ]
        result = self.child(
            "train",
            {"shards_from": str(self.base), "work_dir": str(self.work / "profiles"), "runs": runs},
        )
        self.results["profile"] = {
            run["name"]: {"samples_per_s": run["samples_per_s"], **run.get("profile", {})}
            for run in result["runs"]
        }

    def distributor(self, base: Path, epochs: int, rounds: int, label: str) -> dict:
        """c: sparknet's train stage against TorchDistributor fed by toPandas, both from
        a fresh process (JVM start included), the same model, batch size and epochs."""
        set_stage(f"c distributor {label}")
        model = self.model_spec(base)

        def sparknet(r: int) -> dict:
            return self.child(
                "train",
                {
                    "shards_from": str(base),
                    "work_dir": str(self.work / f"c-{label}-{r}"),
                    "runs": [{"name": "sparknet", "workers": 2, "epochs": epochs}],
                },
            )

        def torch_distributor(r: int) -> dict:
            return self.child(
                "distributor",
                {
                    "shards_from": str(base),
                    "model": model,
                    "overrides": {"train": {"epochs": epochs}},
                },
                # toPandas of the largest scale would not fit in this machine's memory
                # beside the OS: stopped at the cap, it counts as not finished. A rank
                # that dies can leave TorchDistributor's barrier stage waiting for good:
                # that ends at its own timeout.
                memory_cap_mb=self.sizes.pandas_memory_cap_mb,
                timeout_s=self.sizes.distributor_timeout_s,
            )

        results = interleave(
            {"sparknet": sparknet, "torch_distributor": torch_distributor}, rounds, f"c {label}"
        )
        # Ratios pair the rounds TorchDistributor finished; the others are listed with
        # their error (a crash, a timeout, the memory cap), not dropped.
        pairs = [
            (ours, theirs)
            for ours, theirs in zip(results["sparknet"], results["torch_distributor"], strict=True)
            if theirs.get("ok")
        ]
        summary = {
            "epochs": epochs,
            "sparknet": results["sparknet"],
            "torch_distributor": results["torch_distributor"],
            "torch_distributor_finished": bool(pairs),
            "torch_distributor_rounds_finished": f"{len(pairs)} of {rounds}",
            "torch_distributor_failures": [
                {"round": r, "error": theirs.get("error"), "log_tail": theirs.get("log_tail")}
                for r, theirs in enumerate(results["torch_distributor"])
                if not theirs.get("ok")
            ],
        }
        if pairs:
            summary["sparknet_over_distributor_time"] = ratios(
                [ours["process_wall_s"] for ours, _ in pairs],
                [theirs["process_wall_s"] for _, theirs in pairs],
            )
            summary[LARGEST_PROCESS_RATIO] = ratios(
                [ours["memory"]["largest_process_mb"] for ours, _ in pairs],
                [theirs["memory"]["largest_process_mb"] for _, theirs in pairs],
            )
        return summary

    def learners(self) -> None:
        """d: test ROC AUC and the time to reach it, on the same shards."""
        set_stage("d learners")
        epochs = self.sizes.learner_epochs
        train_override = {"train": {"epochs": epochs}} if epochs else {}
        sparknet = self.child(
            "train",
            {
                "shards_from": str(self.base),
                "work_dir": str(self.work / "d"),
                "runs": [
                    {
                        "name": "sparknet",
                        "workers": 2,
                        "epochs": epochs or self.config["train"]["epochs"],
                    }
                ],
                "evaluate": True,
            },
        )
        run = sparknet["runs"][0]
        spark_mlp = self.child(
            "spark_mlp",
            {"shards_from": str(self.base), "max_iter": self.sizes.spark_mlp_max_iter},
        )
        mlp = self.child(
            "sklearn", {"shards_from": str(self.base), "model": "mlp", "overrides": train_override}
        )
        hgb = self.child(
            "sklearn",
            {"shards_from": str(self.base), "model": "hgb", "max_iter": self.sizes.hgb_max_iter},
        )
        self.results["d"] = {
            "learners": {
                "sparknet": {
                    "test_roc_auc": run["test_roc_auc"],
                    "seconds": run["train_stage_s"],
                    "what_seconds_count": "the train stage: plans, launch, every epoch with its "
                    "validation, model saved",
                    "epochs": run["epochs"],
                },
                "spark_ml_mlp": {
                    "test_roc_auc": spark_mlp["test_roc_auc"],
                    "seconds": spark_mlp["fit_s"],
                    "what_seconds_count": "MultilayerPerceptronClassifier.fit (L-BFGS, "
                    f"maxIter {spark_mlp['max_iter']}) on a cached DataFrame",
                },
                "sklearn_mlp": {
                    "test_roc_auc": mlp["test_roc_auc"],
                    "seconds": mlp["fit_s"],
                    "what_seconds_count": "MLPClassifier.fit (Adam, the same epochs, batch size "
                    "and learning rate)",
                },
                "sklearn_hist_gradient_boosting": {
                    "test_roc_auc": hgb["test_roc_auc"],
                    "seconds": hgb["fit_s"],
                    "what_seconds_count": "HistGradientBoostingClassifier.fit (defaults)",
                },
            },
            "children": {
                "sparknet": sparknet,
                "spark_ml_mlp": spark_mlp,
                "sklearn_mlp": mlp,
                "sklearn_hgb": hgb,
            },
        }

    def scale(self) -> None:
        """f (and e at each size): generated data at each scale; sparknet's
        preprocessing, pandas + scikit-learn's, and one epoch of training."""
        rows_per_scale = []
        for scale in self.sizes.scales:
            set_stage(f"f scale {scale:g}x")
            name = f"scale-{scale:g}x"
            if scale == self.sizes.base_scale:
                # The base data is this scale already (smoke): measured in e.
                e = self.results["e"]
                run_dir, rows = self.base, e["rows_in"]
                spark, pandas = e["sparknet"][0], e["pandas"][0]
            else:
                raw, rows = self.prepare_raw(name, scale)
                overrides = self.raw_overrides(True)
                run_dir = self.data / name
                spark = self.child("preprocess", {"run_dir": str(run_dir), "overrides": overrides})
                pandas = self.child(
                    "pandas_preprocess",
                    {"raw": str(raw), "out": str(self.work / "pandas-shards"),
                     "overrides": overrides},
                    memory_cap_mb=self.sizes.pandas_memory_cap_mb,
                )  # fmt: skip
            self.scale_dirs.append(run_dir)
            epoch = self.child(
                "train",
                {
                    "shards_from": str(run_dir),
                    "work_dir": str(self.work / f"f-{name}"),
                    "runs": [{"name": "one_epoch", "workers": 2, "epochs": 1}],
                },
            )
            run = epoch["runs"][0]
            by_role = spark["memory"]["by_role_mb"]
            rank_peaks = [
                p["peak_rss_mb"]
                for p in epoch["memory"]["processes"]
                if p["role"].startswith("training rank")
            ]
            rows_per_scale.append(
                {
                    "scale": scale,
                    "rows_in": rows,
                    "train_rows": run["train_rows"],
                    "preprocess_s": spark["preprocess_s"],
                    "preprocess_stage_s": spark["seconds"],
                    "preprocess_us_per_row": spark["preprocess_s"] / rows * 1e6,
                    "epoch_train_s": run["train_stage_s"],
                    "epoch_us_per_row": run["train_stage_s"] / run["train_rows"] * 1e6,
                    "samples_per_s": run["samples_per_s"],
                    "jvm_peak_mb": by_role.get("jvm (driver + executor)"),
                    "python_worker_peak_mb": by_role.get("python worker"),
                    "driver_python_peak_mb": by_role.get("driver (python)"),
                    "training_rank_peak_mb": rank_peaks,
                    "training_jvm_peak_mb": epoch["memory"]["by_role_mb"].get(
                        "jvm (driver + executor)"
                    ),
                    "pandas_finished": bool(pandas.get("ok")),
                    "pandas_s": pandas.get("preprocess_s"),
                    "pandas_peak_mb": (pandas.get("memory") or {}).get("largest_process_mb"),
                    "pandas_error": pandas.get("error"),
                    "children": {"preprocess": spark, "pandas": pandas, "epoch": epoch},
                }
            )
            self.results["e"]["by_scale"].append(
                {
                    "scale": scale,
                    "sparknet_s": spark["preprocess_s"],
                    "pandas_s": pandas.get("preprocess_s"),
                    "pandas_finished": bool(pandas.get("ok")),
                    "pandas_error": pandas.get("error"),
                }
            )
            # Only the largest size's shards are kept (c compares memory there).
            for earlier in self.scale_dirs[:-1]:
                if earlier != self.base:
                    shutil.rmtree(earlier, ignore_errors=True)
        self.results["f"] = {"scales": rows_per_scale}
        self.largest = self.scale_dirs[-1]

    def physical_limit(self) -> None:
        """g: achieved FLOP/s (6 x parameters per sample) against torch's matmul FLOP/s
        on the same GEMM shapes, one thread per rank."""
        set_stage("g physical limit")
        m = self.results["machine"]["model"]
        shapes = machine.mlp_step_shapes(m["n_inputs"], m["hidden"], 1, m["batch_size"])
        peak_1 = machine.torch_matmul_gflops(shapes, 1)
        flop_per_sample = 6 * m["parameters"]
        a = self.results["a"]["samples_per_s"]
        rows = {}
        for name, threads in (
            ("stream_1w", 1),
            ("memory_1w", 1),
            ("stream_2w", 2),
            ("memory_2w", 2),
            ("stream_1w_2t", 2),
        ):
            achieved = flop_per_sample * a[name]["median"] / 1e9
            # 2 workers x 1 thread each: twice one thread's matmul rate.
            ceiling = peak_1 * threads if name.endswith("2w") else None
            if ceiling is None:
                ceiling = peak_1 if threads == 1 else machine.torch_matmul_gflops(shapes, 2)
            rows[name] = {
                "achieved_gflops": achieved,
                "matmul_gflops_same_shapes": ceiling,
                "share": achieved / ceiling,
            }
        self.results["g"] = {
            "flop_per_sample": flop_per_sample,
            "gemm_shapes": shapes,
            "matmul_gflops_1_thread_same_shapes": peak_1,
            "variants": rows,
        }

    # -- the run -------------------------------------------------------------------------

    def c_base(self) -> None:
        s = self.sizes
        self.results["c"] = {
            "base": self.distributor(self.base, s.distributor_epochs, s.distributor_rounds, "base")
        }

    def c_largest(self) -> None:
        if self.largest == self.base:
            # Smoke: the largest scale is the base data, compared in c already.
            largest = dict(self.results["c"]["base"])
        else:
            largest = self.distributor(self.largest, 1, 1, "largest")
        largest["scale"] = self.sizes.scales[-1]
        self.results["c_largest"] = largest

    @property
    def partial_path(self) -> Path:
        return self.out / "benchmark.partial.json"

    def run(self, resume: bool = False) -> dict:
        """Runs every section in order, saving the results after each; with `resume`,
        sections that a previous run of the same sizes saved are not run again."""
        started = time.perf_counter()
        self.out.mkdir(parents=True, exist_ok=True)
        done: dict = {}
        if resume and self.partial_path.exists():
            saved = read_json(self.partial_path)
            wanted = json.loads(json.dumps(asdict(self.sizes)))
            same_but_scales = {**saved.get("sizes", {}), "scales": wanted["scales"]} == wanted
            if same_but_scales:
                done = saved["sections"]
                self.results = saved["results"]
                if saved["sizes"]["scales"] != wanted["scales"]:
                    # Other scales: the scale section and the comparison at the largest
                    # one run again; the rest stands.
                    for name in ("f", "c largest"):
                        done.pop(name, None)
                    self.results.pop("c_largest", None)
                    self.results["e"]["by_scale"] = []
                log.info("resuming: %s already measured", ", ".join(done))
            else:
                log.warning("%s holds another size of run; starting over", self.partial_path)
        self.base = self.data / "base"
        sections = [
            ("machine", self.machine_section),
            ("e", self.base_data),
            ("model", self.model_section),
            ("a+b", self.reader_and_scaling),
            ("g", self.physical_limit),
            ("b plain DDP", self.plain_ddp),
            ("profile", self.profiles if self.sizes.profile else None),
            ("c", self.c_base),
            ("d", self.learners),
            ("f", self.scale),
            ("c largest", self.c_largest),
        ]
        for name, section in sections:
            if section is None:
                continue
            if name in done:
                if name == "f":
                    self.largest = Path(done[name]["largest"])
                continue
            section_started = time.perf_counter()
            section()
            done[name] = {"seconds": time.perf_counter() - section_started}
            if name == "f":
                done[name]["largest"] = str(self.largest)
            write_json(
                self.partial_path,
                {"sizes": asdict(self.sizes), "sections": done, "results": self.results},
            )
        self.results["c"]["largest"] = self.results.pop("c_largest")
        report = {
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "config": self.config_path,
            "sizes": asdict(self.sizes),
            "wall_s": sum(d["seconds"] for d in done.values()),
            "section_s": {name: d["seconds"] for name, d in done.items()},
            **{key: self.results[key] for key in ("machine", "a", "b", "c", "d", "e", "f", "g")},
            "profile": self.results.get("profile"),
        }
        report["targets"] = targets(report)
        write_json(self.out / "benchmark.json", report)
        (self.out / "benchmark.md").write_text(markdown(report))
        shutil.rmtree(self.work, ignore_errors=True)
        self.partial_path.unlink()
        log.info("this invocation: %.1f min", (time.perf_counter() - started) / 60)
        return report


LARGEST_PROCESS_RATIO = "sparknet_over_distributor_largest_process_memory"
OPERATORS = {">=": operator.ge, "<=": operator.le, "<": operator.lt}


def targets(report: dict) -> list[dict]:
    """Each target of issue 9 with the measured value and whether it is met."""
    a, b, c, d, f = (report[k] for k in "abcdf")
    out = []

    def check(section: str, what: str, value, op: str, bound: float, note: str = "") -> None:
        met = None if value is None else OPERATORS[op](float(value), bound)
        out.append(
            {
                "section": section,
                "target": what,
                "value": value,
                "goal": f"{op} {bound:g}",
                "met": met,
                "note": note,
            }
        )

    check(
        "a",
        "streaming / in-memory samples/s, 1 worker",
        a["stream_over_memory_1w"]["median"],
        ">=",
        0.90,
    )
    check("b", "2-worker efficiency", b["efficiency"]["median"], ">=", 0.80)
    for key, what, ratio_key in (
        ("base", "end-to-end time", "sparknet_over_distributor_time"),
        ("largest", "largest process peak memory", LARGEST_PROCESS_RATIO),
    ):
        part = c[key]
        label = f"sparknet / TorchDistributor {what}, " + (
            "base data" if key == "base" else f"{part['scale']:g}x"
        )
        if part["torch_distributor_finished"]:
            check("c", label, part[ratio_key]["median"], "<", 1)
        else:
            # Nothing to divide by: sparknet finished, TorchDistributor did not.
            out.append(
                {
                    "section": "c",
                    "target": label,
                    "value": None,
                    "goal": "< 1",
                    "met": True,
                    "note": "TorchDistributor did not finish",
                }
            )
    ours, spark_ml = d["learners"]["sparknet"], d["learners"]["spark_ml_mlp"]
    check(
        "d",
        "test ROC AUC: sparknet - Spark ML MLP",
        ours["test_roc_auc"] - spark_ml["test_roc_auc"],
        ">=",
        0,
    )
    check("d", "seconds: sparknet / Spark ML MLP", ours["seconds"] / spark_ml["seconds"], "<", 1)
    scales = f["scales"]
    if len(scales) >= 2:
        big, small = scales[-1], scales[-2]
        label = f"{big['scale']:g}x / {small['scale']:g}x"
        for what, key in (
            ("preprocessing cost per row", "preprocess_us_per_row"),
            ("training epoch cost per row", "epoch_us_per_row"),
        ):
            check("f", f"{what}, {label}", big[key] / small[key], "<=", 1.2)
        memory = max(big["training_rank_peak_mb"]) / max(small["training_rank_peak_mb"])
        check("f", f"peak memory per training rank, {label}", memory, "<=", 1.2)
        if big["scale"] < 30:
            out.append(
                {
                    "section": "f",
                    "target": "the 30x scale",
                    "value": None,
                    "goal": "measured",
                    "met": False,
                    "note": f"the largest scale run was {big['scale']:g}x (--scales)",
                }
            )
    return out


def run_benchmark(
    config_path: str, out: str, smoke: bool, scales: list[float] | None, resume: bool = False
) -> dict:
    sizes = SMOKE if smoke else FULL
    if scales:
        sizes = Sizes(**{**asdict(sizes), "scales": tuple(scales)})
    return Benchmark(config_path, Path(out), sizes).run(resume)


def load_report(path: Path) -> dict:
    return json.loads(Path(path).read_text())


__all__ = ["run_benchmark", "load_report", "write_json"]
