"""One benchmark measurement in a fresh process: `python -m sparknet.benchmark.child
SPEC.json OUT.json`, started by measure.run_child. SPEC holds the kind and its
parameters; OUT gets the result, including the peak resident memory of every process
the measurement started (this one, its JVM, Python workers, training ranks, torchrun).
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()

import copy  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from sparknet.benchmark.measure import PeakMemory  # noqa: E402
from sparknet.config import config_from_dict, read_yaml  # noqa: E402
from sparknet.logs import set_stage, setup_logging  # noqa: E402
from sparknet.run_dir import RunDir, read_json  # noqa: E402

log = logging.getLogger("sparknet.benchmark")


def merged(base: dict, overrides: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load(params: dict):
    data = merged(read_yaml(params["config"]), params.get("overrides", {}))
    return config_from_dict(data, where=params["config"])


def link_shards(source: Path, target: Path) -> RunDir:
    """A run directory of its own whose shards are `source`'s (symlinked, not copied),
    so that every measurement trains on the same files and writes its own outputs."""
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    (target / "shards").symlink_to(Path(source) / "shards", target_is_directory=True)
    shutil.copyfile(Path(source) / "shards.json", target / "shards.json")
    return RunDir.at(target)


def shard_columns(source: Path) -> list[str]:
    return read_json(Path(source) / "shards.json")["columns"]


def read_split(source: Path, split: str, columns: list[str]) -> tuple[np.ndarray, np.ndarray]:
    import pyarrow.parquet as pq
    import pyarrow_hotfix  # noqa: F401

    table = pq.read_table(Path(source) / "shards" / split, columns=["label", *columns])
    x = np.stack([table.column(c).to_numpy() for c in columns], axis=1).astype(np.float32)
    return x, table.column("label").to_numpy().astype(np.float32)


def ranks_summary(run_dir: RunDir) -> dict:
    lines = [json.loads(line) for line in (run_dir.train_dir / "metrics.jsonl").open()]
    return next(line for line in lines if line.get("type") == "ranks")


# ---------------------------------------------------------------------------------------


def reader_alone(run_dir: RunDir, config, workers: int) -> dict:
    """Rank 0's reader for one epoch with no training behind it (in this process, as
    the rank would read: one Arrow thread, the configured read-ahead): how long the
    first batch takes (paid at every epoch start) and the steady rate after it."""
    from sparknet.train.data import iterate_rank
    from sparknet.train.plan import ShardPlan

    plan = ShardPlan.from_json(read_json(run_dir.shard_plan)["train"])
    columns = read_json(run_dir.shards_manifest)["columns"]
    epochs = []
    for epoch in range(2):
        started = time.perf_counter()
        batches = iterate_rank(
            plan, 0, epoch, config.train.seed, columns,
            prefetch_row_groups=config.train.prefetch_row_groups, reader_threads=1,
        )  # fmt: skip
        first = next(batches)
        first_s = time.perf_counter() - started
        rows = len(first[0]) + sum(len(ids) for ids, _, _ in batches)
        total_s = time.perf_counter() - started
        epochs.append(
            {
                "first_batch_s": first_s,
                "epoch_s": total_s,
                "rows": rows,
                "rows_per_s": rows / total_s,
                "rows_per_s_after_first_batch": (rows - len(first[0])) / (total_s - first_s),
            }
        )
    return {"world_size": workers, "epochs": epochs}


def train_kind(params: dict) -> dict:
    """sparknet's train stage (and optionally evaluate), once per entry of `runs`, in
    one Spark; each run in its own run directory over the same shards."""
    from sparknet.evaluate import evaluate
    from sparknet.session import spark_session
    from sparknet.train.launcher import train

    source = Path(params["shards_from"])
    work = Path(params["work_dir"])
    runs = params["runs"]
    ranks_files = [work / run["name"] / "train" / "ranks.json" for run in runs]
    with PeakMemory(ranks_files=ranks_files) as memory:
        base_overrides = params.get("overrides", {})
        config = load({**params, "overrides": base_overrides})
        spark = spark_session(config)
        spark_ready = time.perf_counter() - STARTED
        results = []
        for run in runs:
            config = load(
                {
                    **params,
                    "overrides": merged(
                        base_overrides,
                        {"train": {"workers": run["workers"], "epochs": run["epochs"]}},
                    ),
                }
            )
            run_dir = link_shards(source, work / run["name"])
            set_stage(f"train {run['name']}")
            profiler = None
            if run.get("profile"):
                from sparknet.benchmark.profile import RankProfiler

                profiler = RankProfiler(
                    run_dir.train_dir / "ranks.json", work / "profiles" / run["name"]
                )
                profiler.__enter__()
            started = time.perf_counter()
            try:
                report = train(spark, config, run_dir, feed=run.get("feed", "stream"))
            finally:
                if profiler is not None:
                    profiler.__exit__(None, None, None)
            train_s = time.perf_counter() - started
            summary = ranks_summary(run_dir)
            ranks = summary["ranks"]
            rows = sum(r["rows"] for r in ranks)
            busy = max(r["seconds"] for r in ranks)
            result = {
                "name": run["name"],
                "workers": run["workers"],
                "threads": int(spark.sparkContext.getConf().get("spark.task.cpus", "1")),
                "feed": run.get("feed", "stream"),
                "epochs": len(report["epochs"]),
                "train_stage_s": train_s,
                # Optimizer steps only (validation and checkpoints excluded): rows
                # trained over the slowest rank's training seconds.
                "samples_per_s": rows / busy,
                "data_wait_share": max(r["data_wait_share"] or 0.0 for r in ranks),
                "ranks": ranks,
                "weights_digest": report["weights_digest"],
                "validation_auc": [e.get("validation_auc") for e in report["epochs"]],
                "train_rows": report["train_rows"],
            }
            if profiler is not None:
                result["profile"] = profiler.report()
                if result["feed"] == "stream":
                    result["profile"]["reader_alone"] = reader_alone(
                        run_dir, config, run["workers"]
                    )
            if params.get("evaluate"):
                started = time.perf_counter()
                metrics = evaluate(spark, config, run_dir)
                result["evaluate_s"] = time.perf_counter() - started
                result["test_roc_auc"] = metrics["model"].get("roc_auc")
            results.append(result)
            if not params.get("keep_outputs"):
                shutil.rmtree(run_dir.root, ignore_errors=True)
        spark.stop()
    return {
        "runs": results,
        "spark_ready_s": spark_ready,
        "end_to_end_s": time.perf_counter() - STARTED,
        "memory": memory.report(),
    }


def distributor_kind(params: dict) -> dict:
    """TorchDistributor(local_mode=False, use_gpu=False) on the train shards, loaded the
    usual way: Spark DataFrame -> toPandas on the driver -> the function's argument."""
    from pyspark.ml.torch.distributor import TorchDistributor

    from sparknet.benchmark.baselines import distributor_train
    from sparknet.session import spark_session

    config = load(params)
    source = Path(params["shards_from"])
    t = config.train
    spec = params["model"]  # built by the parent (Benchmark.model_spec)
    with PeakMemory() as memory:
        spark = spark_session(config)
        spark_ready = time.perf_counter() - STARTED
        started = time.perf_counter()
        pdf = spark.read.parquet(str(source / "shards" / "train")).toPandas()
        to_pandas_s = time.perf_counter() - started
        distributor = TorchDistributor(num_processes=t.workers, local_mode=False, use_gpu=False)
        out = distributor.run(
            distributor_train, pdf, spec, t.epochs, t.batch_size, t.learning_rate, t.seed
        )
        total_s = time.perf_counter() - started
        spark.stop()
    return {
        "rows": len(pdf),
        "epochs": t.epochs,
        "workers": t.workers,
        "spark_ready_s": spark_ready,
        "to_pandas_s": to_pandas_s,
        "train_s": out["train_seconds"] if out else None,
        "after_spark_s": total_s,
        "end_to_end_s": time.perf_counter() - STARTED,
        "memory": memory.report(),
    }


def preprocess_kind(params: dict) -> dict:
    """sparknet's clean, features and shard stages on the raw files in run_dir/raw."""
    from sparknet.clean import clean
    from sparknet.features import fit_and_project
    from sparknet.session import spark_session
    from sparknet.shard import shard

    config = load(params)
    run_dir = RunDir.at(params["run_dir"])
    # Each measured round recomputes from the raw files: drop the previous round's
    # outputs and commit records (the stages are called directly, not skipped).
    for name in ("clean", "features", "shard", "train", "evaluate", "export"):
        run_dir.discard(name)
    seconds = {}
    with PeakMemory() as memory:
        spark = spark_session(config)
        spark_ready = time.perf_counter() - STARTED
        for name, stage in (("clean", clean), ("features", fit_and_project), ("shard", shard)):
            set_stage(name)
            started = time.perf_counter()
            report = stage(spark, config, run_dir)
            seconds[name] = time.perf_counter() - started
            if name == "clean":
                rows_in, rows_clean = report["rows_in"], report["clean"]
        spark.stop()
    return {
        "rows_in": rows_in,
        "rows_clean": rows_clean,
        "k": report["k"],
        "seconds": seconds,
        "preprocess_s": sum(seconds.values()),
        "spark_ready_s": spark_ready,
        "end_to_end_s": time.perf_counter() - STARTED,
        "memory": memory.report(),
    }


def pandas_preprocess_kind(params: dict) -> dict:
    from sparknet.benchmark.baselines import pandas_preprocess

    config = load(params)
    out = Path(params["out"])
    if out.exists():
        shutil.rmtree(out)
    with PeakMemory() as memory:
        started = time.perf_counter()
        report = pandas_preprocess(Path(params["raw"]), out, config)
        seconds = time.perf_counter() - started
    if not params.get("keep_outputs"):
        shutil.rmtree(out, ignore_errors=True)
    return {**report, "preprocess_s": seconds, "memory": memory.report()}


def spark_mlp_kind(params: dict) -> dict:
    """Spark ML's MultilayerPerceptronClassifier on the same shards (the same columns)."""
    from pyspark.ml.classification import MultilayerPerceptronClassifier
    from pyspark.ml.feature import VectorAssembler
    from pyspark.ml.functions import vector_to_array
    from pyspark.sql import functions as F
    from sklearn.metrics import roc_auc_score

    from sparknet.session import spark_session

    config = load(params)
    source = Path(params["shards_from"])
    columns = shard_columns(source)
    with PeakMemory() as memory:
        spark = spark_session(config)
        assembler = VectorAssembler(inputCols=columns, outputCol="features")
        train = assembler.transform(spark.read.parquet(str(source / "shards" / "train")))
        train = train.select(F.col("label").cast("double"), "features").cache()
        train.count()
        classifier = MultilayerPerceptronClassifier(
            layers=[len(columns), *config.train.hidden, 2],
            maxIter=params["max_iter"],
            blockSize=params.get("block_size", 128),
            seed=config.train.seed,
        )
        started = time.perf_counter()
        model = classifier.fit(train)
        fit_s = time.perf_counter() - started
        test = assembler.transform(spark.read.parquet(str(source / "shards" / "test")))
        scored = (
            model.transform(test)
            .select("label", vector_to_array("probability")[1].alias("p"))
            .toPandas()
        )
        spark.stop()
    return {
        "fit_s": fit_s,
        "max_iter": params["max_iter"],
        "test_roc_auc": float(roc_auc_score(scored["label"], scored["p"])),
        "end_to_end_s": time.perf_counter() - STARTED,
        "memory": memory.report(),
    }


def sklearn_kind(params: dict) -> dict:
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.metrics import roc_auc_score
    from sklearn.neural_network import MLPClassifier

    config = load(params)
    source = Path(params["shards_from"])
    columns = shard_columns(source)
    t = config.train
    with PeakMemory() as memory:
        x, y = read_split(source, "train", columns)
        x_test, y_test = read_split(source, "test", columns)
        if params["model"] == "mlp":
            model = MLPClassifier(
                hidden_layer_sizes=tuple(t.hidden),
                batch_size=t.batch_size,
                learning_rate_init=t.learning_rate,
                max_iter=t.epochs,
                random_state=t.seed,
                shuffle=True,
            )
        else:
            model = HistGradientBoostingClassifier(
                max_iter=params.get("max_iter", 100), random_state=t.seed
            )
        started = time.perf_counter()
        import warnings

        with warnings.catch_warnings():
            # MLPClassifier warns that max_iter epochs did not converge: that is the budget.
            warnings.simplefilter("ignore")
            model.fit(x, y)
        fit_s = time.perf_counter() - started
        auc = float(roc_auc_score(y_test, model.predict_proba(x_test)[:, 1]))
    return {
        "model": params["model"],
        "fit_s": fit_s,
        "test_roc_auc": auc,
        "end_to_end_s": time.perf_counter() - STARTED,
        "memory": memory.report(),
    }


KINDS = {
    "train": train_kind,
    "distributor": distributor_kind,
    "preprocess": preprocess_kind,
    "pandas_preprocess": pandas_preprocess_kind,
    "spark_mlp": spark_mlp_kind,
    "sklearn": sklearn_kind,
}


def main(argv: list[str]) -> int:
    spec_path, out_path = argv
    spec = json.loads(Path(spec_path).read_text())
    setup_logging()
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    result = KINDS[spec["kind"]](spec["params"])
    Path(out_path).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
