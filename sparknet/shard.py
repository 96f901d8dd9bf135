"""Shard: write each split as Parquet that Petastorm's make_batch_reader streams.

Layout per split (<run-dir>/shards/<split>/part-*.parquet):
  sample_id   int64    0..n-1, dense, in a seeded hash order (a deterministic shuffle)
  label       float32
  pc_000 ...  float32  one scalar column per PCA component (Petastorm reads scalar
                       columns column-wise; array columns would be read row by row)

Each file holds one row group of about n / ceil(n / `shard.rows_per_row_group`) rows;
files are contiguous sample_id ranges of near-equal size and no file is empty. How many
row groups there are does not depend on `train.workers`: training's shard plan
(sparknet/train/plan.py) splits row groups between ranks where it must. Every split
needs at least `train.workers` rows, so that every rank has some.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pyarrow.parquet as pq
from pyspark import StorageLevel
from pyspark.ml.functions import vector_to_array
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from sparknet.config import Config
from sparknet.errors import DataError
from sparknet.features import FEATURES, SPLIT
from sparknet.run_dir import SPLITS, RunDir, spark_path, write_json

log = logging.getLogger(__name__)

SAMPLE_ID = "sample_id"
LABEL = "label"
# Large enough that parquet-mr never cuts a row group inside a file: row-group size
# is set by rows per file instead.
ROW_GROUP_BYTES = str(1 << 30)


def component_columns(k: int) -> list[str]:
    return [f"pc_{i:03d}" for i in range(k)]


def with_dense_ids(df: DataFrame, order: list) -> DataFrame:
    """Adds SAMPLE_ID = 0..n-1 following `order`, without funnelling rows through one task:
    per-partition counts give each partition its offset."""
    # Persisted so that the counts and the ids come from the same partitioning: a
    # recomputed sort may be split differently (adaptive execution coalesces partitions).
    # On disk only: it is read twice, and cached in memory (serialized, as PySpark's
    # levels are) a sorted partition of the 10x benchmark data ran the 4 GB local[2]
    # JVM out of heap while its columnar batches were built.
    ordered = (
        df.orderBy(*order)
        .withColumn("_partition", F.spark_partition_id())
        .withColumn("_mono", F.monotonically_increasing_id())
        .persist(StorageLevel.DISK_ONLY)
    )
    counts = dict(ordered.groupBy("_partition").count().collect())
    offsets, running = {}, 0
    for partition in sorted(counts):
        offsets[partition] = running
        running += counts[partition]
    offset_map = F.create_map(*[x for p, o in offsets.items() for x in (F.lit(p), F.lit(o))])
    # monotonically_increasing_id puts the partition index in the upper 31 bits.
    position = F.col("_mono") - F.shiftleft(F.col("_partition").cast("long"), 33)
    return ordered.withColumn(
        SAMPLE_ID, (offset_map[F.col("_partition")] + position).cast("long")
    ).drop("_partition", "_mono")


def write_split(
    spark: SparkSession,
    df: DataFrame,
    out: Path,
    k: int,
    rows_per_group: int,
    workers: int,
    key: list[str],
    seed: int,
) -> dict:
    n = df.count()
    if n == 0:
        raise DataError(f"shard: split {out.name} has no rows; check split.validation/split.test")
    if n < workers:
        raise DataError(f"shard: split {out.name} has {n} rows, fewer than train.workers={workers}")
    groups = math.ceil(n / rows_per_group)

    shuffle_key = F.xxhash64(F.lit(seed), *[F.col(c) for c in key])
    ided = with_dense_ids(df, [shuffle_key, *[F.col(c) for c in key]])
    columns = component_columns(k)
    array = vector_to_array(F.col(FEATURES), dtype="float32")
    table = ided.select(
        F.col(SAMPLE_ID),
        F.col(LABEL).cast("float"),
        *[array[i].alias(name) for i, name in enumerate(columns)],
    )
    # Range partitioning on the dense ids gives contiguous, near-equal ranges; a larger
    # sample than Spark's default (100 per partition) keeps the sizes within a few percent.
    spark.conf.set("spark.sql.execution.rangeExchange.sampleSizePerPartition", "2000")
    (
        table.repartitionByRange(groups, SAMPLE_ID)
        .sortWithinPartitions(SAMPLE_ID)
        .write.mode("overwrite")
        .option("parquet.block.size", ROW_GROUP_BYTES)
        .option("compression", "snappy")
        .parquet(spark_path(out))
    )
    ided.unpersist()
    return describe_split(out, n)


def describe_split(out: Path, expected_rows: int) -> dict:
    """Reads the footers back: rows and row groups per file, and checks nothing is empty."""
    files = sorted(out.glob("*.parquet"))
    row_groups = []
    for file in files:
        meta = pq.ParquetFile(file).metadata
        if meta.num_rows == 0:
            raise DataError(f"shard: {file} is empty")
        row_groups.extend(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
    if sum(row_groups) != expected_rows:
        raise DataError(f"shard: {out} holds {sum(row_groups)} rows, expected {expected_rows}")
    return {
        "path": str(out),
        "rows": expected_rows,
        "files": len(files),
        "row_groups": len(row_groups),
        "rows_per_row_group": {"min": min(row_groups), "max": max(row_groups)},
    }


def shard(spark: SparkSession, config: Config, run_dir: RunDir) -> dict:
    run_dir.require(run_dir.pca, "features")  # written last: the features stage finished
    features = spark.read.parquet(spark_path(run_dir.require(run_dir.features, "features")))
    k = len(features.select(FEATURES).first()[FEATURES])
    label = F.col(config.label.name).alias(LABEL)
    manifest = {
        "k": k,
        "columns": component_columns(k),
        "label": LABEL,
        "id": SAMPLE_ID,
        "splits": {},
    }
    for split in SPLITS:
        part = features.filter(F.col(SPLIT) == split).select(*config.split.key, label, FEATURES)
        info = write_split(
            spark,
            part,
            run_dir.shard(split),
            k,
            config.shard.rows_per_row_group,
            config.train.workers,
            config.split.key,
            config.split.seed,
        )
        # Where the split stays, not where a staged run writes it.
        info["path"] = str(run_dir.committed(run_dir.shard(split)))
        manifest["splits"][split] = info
        log.info(
            "%s: %d rows in %d row groups (%d-%d rows each)",
            split,
            info["rows"],
            info["row_groups"],
            info["rows_per_row_group"]["min"],
            info["rows_per_row_group"]["max"],
        )
    write_json(run_dir.shards_manifest, manifest)
    return manifest
