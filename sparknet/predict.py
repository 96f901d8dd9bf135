"""Predict: score raw rows with a run's artifact (sparknet/export.py), through exactly
the steps training's rows went through.

    raw rows (the main source's columns, as text or typed)
      │ input check   every required column present, each of a type that can hold it
      │ clean         the clean stage's own rules (parse, bounds, nullable, repeats):
      │               refused rows -> rejects with a reason; nothing is dropped silently
      │ join          left join of the artifact's cleaned lookup tables, as in training
      │ features      derived columns, then the saved PipelineModel -> k PCA components
      ▼ network       mapInPandas over Arrow batches; one network load per Python worker
    scores: the split key columns (the row's id), the score, the predicted label

The network is the eager one, loaded from its state_dict with weights_only=True, so a
score equals the one the evaluate stage computes for the same row.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from pyspark.ml import PipelineModel
from pyspark.ml.functions import vector_to_array
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from sparknet.clean import (
    CORRUPT,
    SOURCE_FILE,
    classify,
    clean_rows_of,
    read_raw,
    rejects_of,
)
from sparknet.config import Config, config_from_dict
from sparknet.errors import DataError, RunDirError
from sparknet.evaluate import output_column
from sparknet.export import CARD, CONFIG, required_columns, scoring_section
from sparknet.features import FEATURES, pipeline_inputs, with_derived
from sparknet.run_dir import RunDir, read_json, write_json
from sparknet.train.model import ModelSpec, load_model_files

log = logging.getLogger(__name__)

FORMATS = ("csv", "parquet", "json")
VECTOR = "_x"  # float32 (k,) per row: the PCA components the network reads
ID_PREFIX = "_id_"

# Spark types a raw column may arrive as, besides text (always accepted: it is parsed
# by the same rules as the training files).
_INTEGRAL = (T.ByteType, T.ShortType, T.IntegerType, T.LongType)
_NUMERIC = (*_INTEGRAL, T.FloatType, T.DoubleType, T.DecimalType)
ACCEPTED_TYPES = {
    "int": _INTEGRAL,
    "long": _INTEGRAL,
    "double": _NUMERIC,
    "float": _NUMERIC,
    "string": (),
    "boolean": (T.BooleanType,),
    "date": (T.DateType,),
    "timestamp": (T.TimestampType, T.TimestampNTZType, T.DateType),
}


@dataclasses.dataclass(frozen=True)
class Artifact:
    root: Path
    config: Config  # the config the run was trained with, from the artifact
    card: dict
    spec: ModelSpec
    state: bytes  # the network's state_dict, as torch.save wrote it

    @property
    def predicted_column(self) -> str:
        return f"predicted_{self.config.label.name}"


def load_artifact(run_dir: RunDir, config: Config) -> Artifact:
    """The run's artifact, refused when `config` would clean or featurise rows otherwise
    than the config it was trained with."""
    root = run_dir.require(run_dir.artifact, "export")
    card = read_json(root / CARD)
    saved = config_from_dict(read_json(root / CONFIG), where=str(root / CONFIG))
    # Against the saved config read now, not the card's digest: what counts as scoring
    # may be narrowed later, and an older artifact must still be usable.
    mine, theirs = scoring_section(config), scoring_section(saved)
    if mine != theirs:
        differ = [k for k in mine if mine[k] != theirs[k]]
        raise RunDirError(
            f"{config.path or 'the config'} differs from the one {root} was trained with in "
            f"{differ}: its rows would be cleaned or featurised differently; score with the "
            f"run's own config ({root / CONFIG} holds it) or train a new run"
        )
    spec, state = load_model_files(root / "network")
    return Artifact(root=root, config=saved, card=card, spec=spec, state=state)


def check_input(df: DataFrame, config: Config, from_files: bool = False) -> DataFrame:
    """Refuses a DataFrame lacking a required column, or holding one in a type that
    cannot hold it; returns the columns as text, shaped as clean.read_raw reads files
    (absent optional columns are missing values). The source file is recorded only
    for a DataFrame read straight from files: Spark refuses input_file_name() above a
    join or union."""
    src = config.sources[config.main]
    present = {f.name: f.dataType for f in df.schema.fields}
    required = set(required_columns(config))
    missing = [
        spec.name_in_file(c)
        for c, spec in src.columns.items()
        if c in required and spec.name_in_file(c) not in present
    ]
    if missing:
        raise DataError(
            f"predict: the input has no column(s) {missing}, which sources.{config.main} "
            f"requires for scoring; it has {sorted(present)}"
        )
    columns = []
    for c, spec in src.columns.items():
        name = spec.name_in_file(c)
        if name not in present:
            columns.append(F.lit(None).cast("string").alias(c))
            continue
        found = present[name]
        if not isinstance(found, (T.StringType, *ACCEPTED_TYPES[spec.type])):
            raise DataError(
                f"predict: input column '{name}' is {found.simpleString()}, but "
                f"sources.{config.main}.columns.{c} is {spec.type}: give it as "
                f"{spec.type} or as text"
            )
        columns.append(F.col(f"`{name}`").cast("string").alias(c))
    source_file = F.input_file_name() if from_files else F.lit(None).cast("string")
    return df.select(
        *columns, F.lit(None).cast("string").alias(CORRUPT), source_file.alias(SOURCE_FILE)
    )


def predict(
    spark: SparkSession, config: Config, run_dir: RunDir, raw_df: DataFrame
) -> tuple[DataFrame, DataFrame]:
    """Scores a DataFrame of raw main-source rows; returns (scores, rejects), both lazy."""
    artifact = load_artifact(run_dir, config)
    raw = check_input(raw_df, artifact.config)
    return score_raw(spark, artifact, raw)


def score_raw(
    spark: SparkSession, artifact: Artifact, raw: DataFrame, loads=None
) -> tuple[DataFrame, DataFrame]:
    """`raw` as clean.read_raw returns it -> (scores, rejects). `loads`, an accumulator,
    counts the network loads in Python workers."""
    config, spec = artifact.config, artifact.spec
    src = config.sources[config.main]
    classified = classify(raw, src)
    rejects = rejects_of(classified, config.main)
    joined = clean_rows_of(classified, list(src.columns))
    for join in config.joins:
        lookup = spark.read.parquet(str(artifact.root / "lookups" / join.source))
        joined = joined.join(
            lookup.select(*join.on, *[F.col(c).alias(new) for c, new in join.select.items()]),
            on=join.on,
            how="left",
        )

    key = list(config.split.key)
    ids = [F.col(c).alias(ID_PREFIX + c) for c in key]
    inputs = with_derived(joined, config).select(
        *ids, *[col.alias(name) for name, col in pipeline_inputs(config).items()]
    )
    pipeline = PipelineModel.load(str(artifact.root / "feature_pipeline"))
    # The shards hold the components as float32, and the network was trained and
    # evaluated on those: cast the same way.
    vectors = pipeline.transform(inputs).select(
        *[F.col(ID_PREFIX + c).alias(c) for c in key],
        vector_to_array(FEATURES, dtype="float32").alias(VECTOR),
    )
    id_fields = [vectors.schema[c] for c in key]
    score_name, _ = output_column(spec)
    score_type = T.ArrayType(T.DoubleType()) if spec.task == "multiclass" else T.DoubleType()
    predicted_type = {"multiclass": T.StringType(), "regression": T.DoubleType()}.get(
        spec.task, T.IntegerType()
    )
    schema = T.StructType(
        [
            *id_fields,
            T.StructField(score_name, score_type),
            T.StructField(artifact.predicted_column, predicted_type),
        ]
    )
    state_bc = spark.sparkContext.broadcast(artifact.state)
    run = score_batches(
        spec, artifact.card["config_sha256"], state_bc, key, schema.names[-2:], loads
    )
    return vectors.mapInPandas(run, schema), rejects


# Networks loaded in this Python worker, by the artifact's digest: Spark reuses its
# Python workers across tasks, so each loads a network once, not once per task or batch.
_NETWORKS: dict = {}


def network_for(spec: ModelSpec, key: str, state_bc, loads=None):
    network = _NETWORKS.get(key)
    if network is None:
        import torch

        from sparknet.train.model import model_from_bytes

        torch.set_num_threads(1)  # Spark runs one task per core already
        network = model_from_bytes(spec, state_bc.value)
        _NETWORKS[key] = network
        if loads is not None:
            loads.add(1)
    return network


def score_batches(spec: ModelSpec, key: str, state_bc, id_columns, out_columns, loads=None):
    """The function mapInPandas runs: Arrow batches of (ids, float32 vector) -> ids,
    score, predicted label."""
    score_name, predicted_name = out_columns
    classes = list(spec.classes)
    k = spec.n_inputs

    def run(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        import torch

        from sparknet.train.model import predict as read_outputs

        network = network_for(spec, key, state_bc, loads)
        for batch in batches:
            # n arrays of k float32 -> (n, k)
            x = np.stack(batch[VECTOR].to_numpy()) if len(batch) else np.zeros((0, k))
            with torch.no_grad():
                out = read_outputs(spec, network(torch.from_numpy(x.astype(np.float32))))
            out = out.numpy()
            if spec.task == "multiclass":
                scores = list(out)  # (n, C) -> n arrays of C: array<double>
                predicted = [classes[i] for i in out.argmax(axis=1)] if len(out) else []
            elif spec.task == "regression":
                scores, predicted = out, out
            else:
                scores, predicted = out, (out >= 0.5).astype(np.int32)
            yield pd.DataFrame(
                {
                    **{c: batch[c] for c in id_columns},
                    score_name: scores,
                    predicted_name: predicted,
                }
            )

    return run


def read_input(spark: SparkSession, config: Config, path: str, fmt: str | None = None) -> DataFrame:
    """Raw rows from files, read with the main source's reader options: CSV and JSON as
    text (malformed records become rejects, as in the clean stage), Parquet typed."""
    src = config.sources[config.main]
    fmt = fmt or src.format
    if fmt == "parquet":
        return check_input(spark.read.parquet(path), config, from_files=True)
    return read_raw(spark, config.main, dataclasses.replace(src, format=fmt), path)


def predict_files(
    spark: SparkSession,
    config: Config,
    run_dir: RunDir,
    input_path: str,
    output: Path,
    fmt: str | None = None,
) -> dict:
    """Scores files into <output>/scores and <output>/rejects; writes and returns
    <output>/summary.json. Fails when scored + rejected != rows in."""
    started = time.perf_counter()
    artifact = load_artifact(run_dir, config)
    raw = read_input(spark, artifact.config, input_path, fmt)
    rows_in = raw.count()
    loads = spark.sparkContext.accumulator(0)
    scores, rejects = score_raw(spark, artifact, raw, loads)
    scores.write.mode("overwrite").parquet(str(output / "scores"))
    rejects.write.mode("overwrite").parquet(str(output / "rejects"))

    # Counted from what was written, not from what was planned.
    n_scored = spark.read.parquet(str(output / "scores")).count()
    written_rejects = spark.read.parquet(str(output / "rejects"))
    by_reason = {
        r["reason"]: r["count"] for r in written_rejects.groupBy("reason").count().collect()
    }
    summary = {
        "input": input_path,
        "artifact": str(artifact.root),
        "rows_in": rows_in,
        "scored": n_scored,
        "rejected": sum(by_reason.values()),
        "rejected_by_reason": dict(sorted(by_reason.items())),
        "reconciled": rows_in == n_scored + sum(by_reason.values()),
        "network_loads": loads.value,
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_json(output / "summary.json", summary)
    log.info(
        "%d rows in: %d scored, %d rejected %s; network loaded %d time(s) in Python "
        "workers; %.1f s; outputs in %s",
        rows_in,
        n_scored,
        summary["rejected"],
        summary["rejected_by_reason"],
        summary["network_loads"],
        summary["seconds"],
        output,
    )
    if not summary["reconciled"]:
        raise DataError(
            f"predict: {rows_in} rows in but {n_scored} scored and {summary['rejected']} "
            f"rejected; see {output / 'summary.json'}"
        )
    return summary


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    from sparknet.cli import add_common_options

    parser = argparse.ArgumentParser(
        description="sparknet: score raw rows with a run's artifact (run the pipeline first)"
    )
    parser.add_argument("--config", required=True, help="the config the run was trained with")
    parser.add_argument("--run-dir", required=True, help="the run directory holding artifact/")
    parser.add_argument("--input", required=True, help="file, folder or glob of raw rows")
    parser.add_argument(
        "--format", choices=FORMATS, help="input format (default: the main source's)"
    )
    parser.add_argument(
        "--output", required=True, help="folder for scores/, rejects/ and summary.json"
    )
    add_common_options(
        parser, set_note="; keys that decide how a row is scored must match the run's"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    from sparknet.cli import guarded
    from sparknet.config import load_config
    from sparknet.logs import set_stage, setup_logging
    from sparknet.session import spark_session

    args = parse_args(argv)
    setup_logging(args.log_level)

    def body(sessions: list) -> None:
        config = load_config(args.config, args.set)
        run_dir = RunDir.at(args.run_dir)
        spark = spark_session(config, args.master)
        sessions.append(spark)
        set_stage("predict")
        predict_files(spark, config, run_dir, args.input, Path(args.output).resolve(), args.format)

    return guarded(body)
