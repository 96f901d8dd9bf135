"""Target encoding: a high-cardinality categorical becomes the train split's smoothed
mean label of its category, one numeric column (one per class for a multiclass label).

A category seen in n train rows with label sum s is encoded as the m-estimate

    (s + m * prior) / (n + m),     m = features.target_encoding.strength,

which pulls rare categories toward the prior (the train split's mean label) instead of
trusting a mean over three rows. Categories never seen in training, and missing values,
get the prior itself.

Train rows are encoded out of fold. Encoded with statistics that include its own label,
a row of a rare category sees its own answer in the feature (with one row and m = 0 the
feature *is* the label); the network learns to trust the column far more than it deserves
and validation pays for it. So the train split is cut into K folds by a hash of the split
key, and each train row gets the encoding computed from the other K - 1 folds only
(prior included). Validation, test and any later scoring rows are never part of the
statistics, so they get the encoding of the whole train split: that is what the saved
pipeline applies.

The full-train table is saved as one SQLTransformer stage holding a literal map per
output column, so the PipelineModel reloads and scores without sparknet. The map lives in
the SQL text: fine for thousands of categories, not for millions.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics

from pyspark.ml.feature import SQLTransformer
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from sparknet.config import Config
from sparknet.feature_rules import sql_double, sql_string

log = logging.getLogger(__name__)

ENCODED = "__te"
FOLD = "__te_fold"
# Mixed into the fold hash so folds do not line up with the split's own hash buckets.
FOLD_SALT = "target-encoding-folds"


@dataclasses.dataclass(frozen=True)
class ColumnEncoding:
    """One encoded column's full-train statistics. `outputs` names the numeric columns it
    becomes; `prior` and each `table` value hold one number per output."""

    column: str
    outputs: list[str]
    prior: list[float]
    table: dict[str, list[float]]
    rows_per_category: dict[str, int]
    strength: float
    folds: int

    def as_report(self) -> dict:
        counts = sorted(self.rows_per_category.values())
        return {
            "kind": "target",
            "impute": "prior",
            "fill": self.prior[0] if len(self.prior) == 1 else self.prior,
            "encoding": {
                "outputs": self.outputs,
                "prior": self.prior,
                "strength": self.strength,
                "folds": self.folds,
                "train_rows_encoded": "out of fold",
                "categories_in_train": len(counts),
                "train_rows_per_category": {
                    "min": counts[0] if counts else 0,
                    "median": statistics.median(counts) if counts else 0,
                    "max": counts[-1] if counts else 0,
                },
            },
        }


def output_columns(column: str, n_outputs: int) -> list[str]:
    if n_outputs == 1:
        return [column + ENCODED]
    return [f"{column}{ENCODED}_{i}" for i in range(n_outputs)]


def targets(config: Config) -> list[Column]:
    """What is averaged per category: the label itself (binary: its positive share;
    regression: its mean), or for multiclass one 0/1 indicator per class index."""
    label = F.col(config.label.name).cast("double")
    if config.label.task == "multiclass":
        return [
            F.when(label == float(i), 1.0).otherwise(0.0) for i in range(len(config.label.classes))
        ]
    return [label]


def fold_column(config: Config) -> Column:
    folds = config.features.target_encoding.folds
    hashed = F.xxhash64(F.lit(FOLD_SALT), F.lit(config.split.seed), *config.split.key)
    return F.pmod(hashed, F.lit(folds)).cast("int")


def m_estimate(total: list[float], n: int, prior: list[float], m: float) -> list[float]:
    return [(s + m * p) / (n + m) for s, p in zip(total, prior, strict=True)]


def fit_target_encoding(
    spark: SparkSession, train: DataFrame, columns: list[str], config: Config
) -> tuple[list[ColumnEncoding], DataFrame]:
    """Fits every column's full-train encoding and returns it with `train` plus the
    out-of-fold encoded columns (float64, one per output)."""
    settings = config.features.target_encoding
    m = settings.strength
    target_cols = targets(config)
    n_out = len(target_cols)
    with_fold = train.withColumn(FOLD, fold_column(config))
    sums = [F.sum(t).alias(f"__s{j}") for j, t in enumerate(target_cols)]

    # Per fold: rows and label sums; the fold priors come from these.
    fold_rows = with_fold.groupBy(FOLD).agg(F.count(F.lit(1)).alias("__n"), *sums).collect()
    fold_n = {r[FOLD]: r["__n"] for r in fold_rows}
    fold_s = {r[FOLD]: [float(r[f"__s{j}"]) for j in range(n_out)] for r in fold_rows}
    n_all = sum(fold_n.values())
    s_all = [sum(fold_s[f][j] for f in fold_s) for j in range(n_out)]
    prior = [s / n_all for s in s_all]
    # Each fold's rows are encoded with the other folds' statistics, prior included.
    fold_prior = {
        fold: [(s_all[j] - fold_s[fold][j]) / max(n_all - fold_n[fold], 1) for j in range(n_out)]
        for fold in fold_n
    }

    encodings = []
    encoded = with_fold
    for column in columns:
        rows = (
            with_fold.filter(F.col(column).isNotNull())
            .groupBy(FOLD, column)
            .agg(F.count(F.lit(1)).alias("__n"), *sums)
            .collect()
        )
        # category -> fold -> (rows, label sums)
        per_fold: dict[str, dict[int, tuple[int, list[float]]]] = {}
        for r in rows:
            per_fold.setdefault(r[column], {})[r[FOLD]] = (
                r["__n"],
                [float(r[f"__s{j}"]) for j in range(n_out)],
            )

        table, rows_per_category, oof_rows = {}, {}, []
        for category, folds in per_fold.items():
            n_c = sum(n for n, _ in folds.values())
            s_c = [sum(s[j] for _, s in folds.values()) for j in range(n_out)]
            table[category] = m_estimate(s_c, n_c, prior, m)
            rows_per_category[category] = n_c
            for fold in fold_n:
                n_f, s_f = folds.get(fold, (0, [0.0] * n_out))
                if n_c == n_f:
                    continue  # no rows outside this fold: the join leaves the fold prior
                s_other = [s_c[j] - s_f[j] for j in range(n_out)]
                values = m_estimate(s_other, n_c - n_f, fold_prior[fold], m)
                oof_rows.append((fold, category, *values))

        outputs = output_columns(column, n_out)
        encodings.append(
            ColumnEncoding(column, outputs, prior, table, rows_per_category, m, settings.folds)
        )
        encoded = _join_out_of_fold(spark, encoded, column, outputs, oof_rows, fold_prior)
    return encodings, encoded.drop(FOLD)


def _join_out_of_fold(
    spark: SparkSession,
    df: DataFrame,
    column: str,
    outputs: list[str],
    oof_rows: list[tuple],
    fold_prior: dict[int, list[float]],
) -> DataFrame:
    """Adds `outputs` to the train rows in `df`: the out-of-fold encoding of (fold,
    category), or the fold's out-of-fold prior for a category the other folds lack and
    for a missing value."""
    value_cols = [f"__v{j}" for j in range(len(outputs))]
    schema = f"{FOLD} int, __category string, " + ", ".join(f"{v} double" for v in value_cols)
    lookup = spark.createDataFrame(oof_rows, schema)
    # The lookup holds folds x categories rows, a few thousand: broadcast, no shuffle.
    joined = df.join(
        F.broadcast(lookup),
        (df[FOLD] == lookup[FOLD]) & (df[column] == lookup["__category"]),
        "left",
    ).drop(lookup[FOLD], lookup["__category"])
    for j, (out, value) in enumerate(zip(outputs, value_cols, strict=True)):
        prior_of_fold = F.create_map(
            *[x for fold, p in fold_prior.items() for x in (F.lit(fold), F.lit(p[j]))]
        )
        joined = joined.withColumn(
            out, F.coalesce(F.col(value), prior_of_fold[F.col(FOLD)]).cast("double")
        ).drop(value)
    return joined


def encoding_stage(encodings: list[ColumnEncoding]) -> SQLTransformer:
    """One SELECT that encodes every column with the full-train table: a literal map
    from category to value per output; unseen and missing categories get the prior."""
    outputs = []
    for enc in encodings:
        for j, out in enumerate(enc.outputs):
            pairs = ", ".join(
                f"{sql_string(category)}, {sql_double(values[j])}"
                for category, values in sorted(enc.table.items())
            )
            lookup = f"try_element_at(map({pairs}), CAST({enc.column} AS STRING))"
            if not pairs:
                lookup = "CAST(NULL AS DOUBLE)"
            outputs.append(f"COALESCE({lookup}, {sql_double(enc.prior[j])}) AS {out}")
    return SQLTransformer(statement=f"SELECT *, {', '.join(outputs)} FROM __THIS__")


def prior_counts(scored: DataFrame, encodings: list[ColumnEncoding]) -> dict[str, dict[str, int]]:
    """Per encoded column, the rows of `scored` (validation and test) that get the prior:
    missing, or a category the train split never had. One pass."""
    if not encodings:
        return {}
    aggs = []
    for enc in encodings:
        c = F.col(enc.column)
        aggs += [
            F.count_if(c.isNull()).alias(f"{enc.column}__missing"),
            F.count_if(c.isNotNull() & ~c.isin(list(enc.table))).alias(f"{enc.column}__unseen"),
        ]
    row = scored.agg(*aggs).first().asDict()
    return {
        enc.column: {
            "missing": row[f"{enc.column}__missing"],
            "unseen": row[f"{enc.column}__unseen"],
        }
        for enc in encodings
    }
