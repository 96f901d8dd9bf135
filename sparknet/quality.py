"""The data-quality report: quality.json in the run directory and a readable table in the
log. The clean stage writes the row accounting and a profile of every clean column; the
features stage adds how each feature was filled, clipped or dropped (key "features").
The fields are documented in the README."""

from __future__ import annotations

import logging
import math
from typing import Any

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from sparknet.config import NUMERIC_TYPES, Config
from sparknet.feature_rules import ColumnRule
from sparknet.target_encoding import ColumnEncoding

log = logging.getLogger(__name__)


def clean_column_types(config: Config) -> dict[str, str]:
    """The clean table's columns and their configured types, in table order."""
    types = {c: spec.type for c, spec in config.sources[config.main].columns.items()}
    for join in config.joins:
        lookup = config.sources[join.source].columns
        for col, new in join.select.items():
            types[new] = lookup[col].type
    types[config.label.name] = "double"
    return types


def column_profile(df: DataFrame, types: dict[str, str]) -> tuple[int, dict[str, dict[str, Any]]]:
    """Nulls for every column; distinct values and values holding a line break for
    strings; min, max, mean and population stddev for numbers; min and max for dates
    and timestamps. Returns the row count too. Two passes over `df`."""
    aggs = [F.count(F.lit(1)).alias("__rows")]
    for c, tp in types.items():
        aggs.append(F.count(c).alias(f"{c}__n"))
        if tp == "string":
            # A quoted value may span lines; many such values can also mean a stray quote
            # that swallowed the following records.
            aggs.append(F.count_if(F.col(c).contains("\n")).alias(f"{c}__line_breaks"))
        elif tp in NUMERIC_TYPES:
            aggs += [
                F.min(c).alias(f"{c}__min"),
                F.max(c).alias(f"{c}__max"),
                F.avg(c).alias(f"{c}__mean"),
                F.stddev_pop(c).alias(f"{c}__stddev"),
            ]
        elif tp in ("date", "timestamp"):
            aggs += [F.min(c).alias(f"{c}__min"), F.max(c).alias(f"{c}__max")]
    row = df.agg(*aggs).first().asDict()
    # Apart from the rest: next to distinct counts Spark copies every other aggregate's
    # input once per distinct column, which made the profile several times slower.
    distinct = [
        F.count_distinct(c).alias(f"{c}__distinct") for c, tp in types.items() if tp == "string"
    ]
    if distinct:
        row.update(df.agg(*distinct).first().asDict())
    rows = row["__rows"]
    profile = {}
    for c, tp in types.items():
        entry: dict[str, Any] = {"type": tp, "nulls": rows - row[f"{c}__n"]}
        for stat in ("distinct", "line_breaks", "min", "max", "mean", "stddev"):
            key = f"{c}__{stat}"
            if key in row:
                value = row[key]
                entry[stat] = str(value) if tp in ("date", "timestamp") and value else value
        profile[c] = entry
    return rows, profile


def features_quality(
    config: Config,
    rules: list[ColumnRule],
    encodings: list[ColumnEncoding],
    dropped: dict[str, str],
    train_stats: dict[str, dict],
    applied: dict[str, dict[str, int]],
    n_train: int,
) -> dict[str, Any]:
    """Per feature: what was fitted on the train split and how many values of the whole
    table (every split) it filled or clipped; for target-encoded columns, the encoding
    and how many validation and test values got the prior; dropped features with the
    reason."""
    columns = {}
    for rule in rules:
        entry = rule.as_report()
        entry["missing_in_train"] = n_train - train_stats[rule.column]["n"]
        entry["filled"] = applied[rule.column]["missing"] if rule.fill is not None else 0
        if "clipped" in applied[rule.column]:
            entry["clipped"] = applied[rule.column]["clipped"]
        if rule.kind == "categorical":
            entry["distinct_in_train"] = train_stats[rule.column]["distinct"]
        columns[rule.column] = entry
    for enc in encodings:
        entry = enc.as_report()
        entry["missing_in_train"] = n_train - train_stats[enc.column]["n"]
        # Train rows are encoded out of fold; these are the rows scored with the prior.
        entry["filled"] = applied[enc.column]["missing"] + applied[enc.column]["unseen"]
        entry["encoding"]["scored_with_prior"] = applied[enc.column]
        entry["distinct_in_train"] = train_stats[enc.column]["distinct"]
        columns[enc.column] = entry
    return {
        "fitted_on": {"split": "train", "rows": n_train},
        "columns": columns,
        "dropped": dropped,
        "derived": dict(config.features.derived),
    }


def format_table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    for r in cells:
        lines.append(
            "  ".join(
                v.rjust(w) if _numeric(v) else v.ljust(w) for v, w in zip(r, widths, strict=True)
            )
        )
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_cell(v) for v in value) + "]"
    return str(value)


def _numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def log_clean_quality(quality: dict) -> None:
    rows = []
    for name, report in quality["sources"].items():
        reasons = ", ".join(f"{r} {n}" for r, n in report["rejected_by_reason"].items())
        rows.append([name, report["rows_in"], report["clean"], report["rejected"], reasons])
    log.info(
        "rows by source:\n%s",
        format_table(["source", "rows in", "clean", "rejected", "rejected by reason"], rows),
    )
    by_column = []
    for name, report in quality["sources"].items():
        for key, n in report["rejected_by_column"].items():
            reason, column = key.split(":", 1)
            by_column.append([name, column, reason, n])
    if by_column:
        log.info(
            "rejects by column:\n%s",
            format_table(["source", "column", "reason", "rows"], by_column),
        )
    profile = [
        [
            c,
            p["type"],
            p["nulls"],
            p.get("distinct"),
            p.get("min"),
            p.get("max"),
            p.get("mean"),
            p.get("stddev"),
        ]
        for c, p in quality["columns"].items()
    ]
    log.info(
        "clean columns (%d rows):\n%s",
        quality["clean"],
        format_table(
            ["column", "type", "nulls", "distinct", "min", "max", "mean", "stddev"], profile
        ),
    )


def log_features_quality(report: dict) -> None:
    rows = [
        [
            c,
            e["kind"],
            e["impute"],
            e["fill"],
            e["missing_in_train"],
            e["filled"],
            e.get("clip_bounds"),
            e.get("clipped"),
        ]
        for c, e in report["columns"].items()
    ]
    rows += [
        [c, "", "dropped: " + why, None, None, None, None, None]
        for c, why in report["dropped"].items()
    ]
    log.info(
        "features, fitted on %d train rows (filled and clipped count all splits):\n%s",
        report["fitted_on"]["rows"],
        format_table(
            ["feature", "kind", "impute", "fill", "missing in train", "filled", "clip", "clipped"],
            rows,
        ),
    )
