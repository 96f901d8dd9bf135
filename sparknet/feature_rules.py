"""The per-column rules that make every feature finite before it is assembled: fill
missing values and clip outliers, with values fitted on the train split.

The fitted rules become one SQLTransformer stage at the head of the feature pipeline,
so the saved PipelineModel carries them and scoring applies exactly the same numbers.
A value is missing when it is null or, for numeric features, NaN or +-infinity (a
derived expression such as `sqrt(x)` or `ln(x)` can produce those from clean data).

Output columns are `<feature>__ready`; the inputs are left as they were.
"""

from __future__ import annotations

import dataclasses
import logging
import math

from pyspark.ml.feature import SQLTransformer
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from sparknet.config import FeaturesConfig

log = logging.getLogger(__name__)

READY = "__ready"
# approxQuantile's relative error: rank within 0.01% of the exact quantile.
QUANTILE_ERROR = 1e-4


@dataclasses.dataclass(frozen=True)
class ColumnRule:
    column: str
    kind: str  # numeric or categorical
    strategy: str  # how missing values are filled (config.NUMERIC_IMPUTE / CATEGORICAL_IMPUTE)
    fill: float | str | None  # None: missing stays its own category (categorical only)
    clip: tuple[float, float] | None = None  # bounds fitted at clip_quantiles
    clip_quantiles: tuple[float, float] | None = None

    def as_report(self) -> dict:
        report = {"kind": self.kind, "impute": self.strategy, "fill": self.fill}
        if self.clip is not None:
            report["clip_quantiles"] = list(self.clip_quantiles)
            report["clip_bounds"] = list(self.clip)
        return report


def ready(column: str) -> str:
    return column + READY


def finite(column: str) -> Column:
    """The value when it is a finite number, else null."""
    c = F.col(column)
    return F.when(~F.isnan(c) & (F.abs(c) != float("inf")), c)


def column_stats(train: DataFrame, feats: FeaturesConfig) -> dict[str, dict]:
    """Per feature on the train split: finite non-null count, mean, stddev (numeric) or
    distinct non-null values (categorical and target-encoded). One pass."""
    aggs = []
    for c in feats.numeric:
        value = finite(c)
        aggs += [
            F.count(value).alias(f"{c}__n"),
            F.avg(value).alias(f"{c}__mean"),
            F.stddev_pop(value).alias(f"{c}__sd"),
        ]
    for c in feats.categorical + feats.target_encoded:
        aggs += [
            F.count(c).alias(f"{c}__n"),
            F.count_distinct(c).alias(f"{c}__distinct"),
        ]
    row = train.agg(F.count(F.lit(1)).alias("__rows"), *aggs).first().asDict()
    stats = {}
    for c in feats.numeric:
        stats[c] = {"n": row[f"{c}__n"], "mean": row[f"{c}__mean"], "sd": row[f"{c}__sd"]}
    for c in feats.categorical + feats.target_encoded:
        stats[c] = {
            "n": row[f"{c}__n"],
            "distinct": row[f"{c}__distinct"],
            "rows": row["__rows"],
        }
    return stats


def uninformative(feats: FeaturesConfig, stats: dict[str, dict]) -> dict[str, str]:
    """Features that carry nothing on the train split: all missing (nothing to fit a fill
    value on) or constant (zero variance), with the reason."""
    dropped = {}
    for c in feats.numeric:
        s = stats[c]
        if s["n"] == 0:
            dropped[c] = "all null"
        # Summation leaves a constant column a standard deviation of about 1e-16.
        elif (s["sd"] or 0.0) <= 1e-12 * max(1.0, abs(s["mean"])):
            dropped[c] = "constant"
    for c in feats.categorical + feats.target_encoded:
        # Missing values form their own category (the prior, when target-encoded), so one
        # value plus nulls still informs; one value in every row does not.
        s = stats[c]
        if s["n"] == 0:
            dropped[c] = "all null"
        elif s["distinct"] == 1 and s["n"] == s["rows"]:
            dropped[c] = "constant"
    return dropped


def fit_rules(train: DataFrame, feats: FeaturesConfig) -> list[ColumnRule]:
    """Fits each feature's fill value and clip bounds on `train` (finite values only)."""
    numeric = list(feats.numeric)
    probs = sorted({0.5} | {q for c in numeric for q in feats.clip.get(c, ())})
    quantiles: dict[str, dict[float, float]] = {}
    if numeric:
        sanitized = train.select(*[finite(c).alias(c) for c in numeric])
        values = sanitized.approxQuantile(numeric, probs, QUANTILE_ERROR)
        quantiles = {
            c: dict(zip(probs, v, strict=True)) for c, v in zip(numeric, values, strict=True)
        }

    clips = {}
    for c in numeric:
        if c in feats.clip:
            low, high = feats.clip[c]
            clips[c] = (quantiles[c][low], quantiles[c][high])

    means = {}
    mean_cols = [c for c in numeric if feats.impute_for(c).strategy == "mean"]
    if mean_cols:
        # The mean of the values as the network will see them: after clipping.
        row = train.agg(
            *[F.avg(_clipped(finite(c), clips.get(c))).alias(c) for c in mean_cols]
        ).first()
        means = {c: row[c] for c in mean_cols}

    rules = []
    for c in numeric:
        policy = feats.impute_for(c)
        if policy.strategy == "median":
            fill = quantiles[c][0.5]
        elif policy.strategy == "mean":
            fill = means[c]
        elif policy.strategy == "mode":
            fill = _mode(train, finite(c))
        else:
            fill = float(policy.value)
        rules.append(
            ColumnRule(
                c,
                "numeric",
                policy.strategy,
                float(fill),
                clips.get(c),
                tuple(feats.clip[c]) if c in feats.clip else None,
            )
        )
    for c in feats.categorical:
        policy = feats.impute_for(c)
        if policy.strategy == "mode":
            fill = _mode(train, F.col(c))
        elif policy.strategy == "constant":
            fill = str(policy.value)
        else:
            fill = None
        rules.append(ColumnRule(c, "categorical", policy.strategy, fill))
    return rules


def _mode(train: DataFrame, value: Column) -> float | str:
    """The most frequent non-missing value; ties go to the smallest, so refits agree."""
    row = (
        train.select(value.alias("v"))
        .filter(F.col("v").isNotNull())
        .groupBy("v")
        .count()
        .orderBy(F.desc("count"), F.asc("v"))
        .first()
    )
    return row["v"]


def _clipped(value: Column, bounds: tuple[float, float] | None) -> Column:
    if bounds is None:
        return value
    return F.least(F.greatest(value, F.lit(bounds[0])), F.lit(bounds[1]))


def rules_stage(rules: list[ColumnRule]) -> SQLTransformer:
    """One SELECT that fills and clips every feature into `<feature>__ready`."""
    outputs = []
    for rule in rules:
        # Config checks keep column names plain identifiers, so they need no quoting.
        c = rule.column
        target = ready(rule.column)
        if rule.kind == "numeric":
            value = f"CAST({c} AS DOUBLE)"
            if rule.clip is not None:
                low, high = (sql_double(bound) for bound in rule.clip)
                value = f"LEAST(GREATEST({value}, {low}), {high})"
            missing = f"{c} IS NULL OR isnan({c}) OR abs({c}) = double('inf')"
            outputs.append(
                f"CASE WHEN {missing} THEN {sql_double(rule.fill)} ELSE {value} END AS {target}"
            )
        elif rule.fill is None:
            outputs.append(f"CAST({c} AS STRING) AS {target}")
        else:
            outputs.append(f"COALESCE(CAST({c} AS STRING), {sql_string(rule.fill)}) AS {target}")
    return SQLTransformer(statement=f"SELECT *, {', '.join(outputs)} FROM __THIS__")


def sql_double(value: float) -> str:
    if not math.isfinite(value):
        raise ValueError(f"a fitted fill or clip value is not finite: {value}")
    # repr round-trips a float exactly.
    return f"CAST('{value!r}' AS DOUBLE)"


def sql_string(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def applied_counts(df: DataFrame, rules: list[ColumnRule]) -> dict[str, dict[str, int]]:
    """How many values of `df` each rule fills and clips. One pass."""
    aggs = []
    for rule in rules:
        c = F.col(rule.column)
        if rule.kind == "numeric":
            value = finite(rule.column)
            aggs.append(F.count_if(value.isNull()).alias(f"{rule.column}__filled"))
            if rule.clip is not None:
                outside = (value < F.lit(rule.clip[0])) | (value > F.lit(rule.clip[1]))
                aggs.append(F.count_if(outside).alias(f"{rule.column}__clipped"))
        else:
            aggs.append(F.count_if(c.isNull()).alias(f"{rule.column}__filled"))
    row = df.agg(*aggs).first().asDict() if aggs else {}
    counts = {}
    for rule in rules:
        counts[rule.column] = {"missing": row[f"{rule.column}__filled"]}
        if rule.clip is not None:
            counts[rule.column]["clipped"] = row[f"{rule.column}__clipped"]
    return counts
