"""Clean: parse every source with an explicit schema, refuse what cannot be used, join
the lookups onto the main source, and account for every row.

Every input row ends in exactly one place: <run-dir>/clean (main source, joined) or
<run-dir>/rejects with its source, file, raw fields and a reason code. quality.json
reconciles rows in = clean + rejected per source, and the job fails if it does not.

Reason codes, first match wins:
  unclosed_quote      a CSV quote never closed, so the lines after it were read as one
                      record (the stage then refuses the source)
  wrong_field_count   a CSV line with more or fewer fields than the header
  malformed_record    the reader could not parse the record otherwise (bad quoting, bad JSON)
  invalid_encoding    a field holds bytes that are not valid in the file's encoding
  unparseable_value   a field does not parse as its configured type (`column` names it)
  non_finite_value    NaN or +-Infinity in a double or float column
  out_of_range        outside the column's configured min/max or allowed values
  missing_label       a column the label needs is null, or the label evaluates to null
  invalid_label       a label outside its task's values (binary 0/1, multiclass classes,
                      regression finite)
  missing_value       a column with `nullable: false` is null (`column` names it)
  duplicate_row       an exact repeat of an earlier row (the first is kept)
  duplicate_key       rows sharing the source's key but differing elsewhere (all rejected)
"""

from __future__ import annotations

import bz2
import csv
import glob
import gzip
import logging
import re
import shutil
from pathlib import Path
from typing import TextIO

import pyarrow as pa
import pyarrow.parquet as pq
from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from sparknet.config import ColumnConfig, Config, LabelConfig, SourceConfig
from sparknet.errors import DataError, row_error_class, spark_error_summary
from sparknet.quality import clean_column_types, column_profile, log_clean_quality
from sparknet.run_dir import RunDir, spark_path, write_json

log = logging.getLogger(__name__)

CORRUPT = "_corrupt_record"
SOURCE_FILE = "_source_file"
REASON = "_reason"
REASON_COLUMN = "_reason_column"

SPARK_TYPES = {
    "int": T.IntegerType(),
    "long": T.LongType(),
    "double": T.DoubleType(),
    "float": T.FloatType(),
    "string": T.StringType(),
    "boolean": T.BooleanType(),
    "date": T.DateType(),
    "timestamp": T.TimestampType(),
}

REJECTS_SCHEMA = ["source", "source_file", "raw_record", "reason", "column"]


def source_path(src: SourceConfig, run_dir: RunDir) -> str:
    path = Path(src.path)
    return str(path if path.is_absolute() else run_dir.raw / path)


def read_raw(spark: SparkSession, name: str, src: SourceConfig, path: str) -> DataFrame:
    """Reads every configured column as a string, so that a bad value is seen as bad
    instead of becoming a silent null, plus the reader's corrupt-record text and the file.
    Columns come out under their pipeline names."""
    _check_header(name, src, path)
    if src.format == "parquet":
        _check_parquet_files(name, src, path)
        return _read_parquet(spark, name, src, path)
    # CSV maps fields to the schema by position (the header was checked above), JSON by
    # field name; the schema uses the names in the file so that Spark agrees with both.
    schema = T.StructType(
        [T.StructField(name, T.StringType()) for name in src.names_in_file]
        + [T.StructField(CORRUPT, T.StringType())]
    )
    options = dict(src.options)
    if src.format == "csv":
        # RFC 4180 escapes a quote inside a quoted field by doubling it; Spark's default
        # escape is a backslash, which would keep `""` in the value. Line by line, Spark
        # reads a quoted field holding a line break as a clean row with the value cut at
        # the break: only whole-record parsing keeps it (config refuses multiLine false).
        options = {"escape": '"', **options, "multiLine": "true"}
    reader = (
        spark.read.schema(schema)
        .options(**options)
        .option("mode", "PERMISSIVE")
        .option("columnNameOfCorruptRecord", CORRUPT)
    )
    df = reader.csv(spark_path(path)) if src.format == "csv" else reader.json(spark_path(path))
    return df.select(
        *[F.col(f"`{spec.name_in_file(c)}`").alias(c) for c, spec in src.columns.items()],
        CORRUPT,
        F.input_file_name().alias(SOURCE_FILE),
    )


def _read_parquet(spark: SparkSession, name: str, src: SourceConfig, path: str) -> DataFrame:
    df = spark.read.parquet(spark_path(path))
    present = set(df.columns)
    missing = [m for m in src.names_in_file if m not in present]
    if missing:
        raise DataError(
            f"sources.{name}: {path} has no column(s) {missing}; it has {sorted(present)}"
        )
    # Typed Parquet values go through the same string parsing as text, so NaN, ranges
    # and types are checked alike.
    return df.select(
        *[
            F.col(f"`{spec.name_in_file(c)}`").cast("string").alias(c)
            for c, spec in src.columns.items()
        ],
        F.lit(None).cast("string").alias(CORRUPT),
        F.input_file_name().alias(SOURCE_FILE),
    )


def _spans_lines(classified: DataFrame, src: SourceConfig) -> bool:
    """Whether any record of the source spans lines (a quoted line break)."""
    spans = F.col("_raw_record").contains("\n")
    for c, spec in src.columns.items():
        if spec.type == "string":
            spans = spans | F.coalesce(F.col(c).contains("\n"), F.lit(False))
    return bool(classified.filter(spans).limit(1).count())


def _check_quotes_close(name: str, src: SourceConfig, path: str) -> None:
    """A quote that never closes takes every line after it into one value, which Spark
    keeps as a clean row when it is the last field. Records spanning lines are rare, so
    when there are some, every local file is parsed strictly once more."""
    sep, quote = _separator(src), src.option("quote", '"')
    if len(sep) != 1 or len(quote) != 1:
        return
    for file in local_input_files(path) or []:
        with _open_text(file, _encoding(src)) as fh:
            reader = csv.reader(fh, delimiter=sep, quotechar=quote, strict=True)
            start = 1
            try:
                for _ in reader:
                    start = reader.line_num + 1
            except csv.Error as exc:
                raise DataError(
                    f"sources.{name}: {file}: the record starting at line {start} does not "
                    f"parse ({exc}): a quote that is never closed takes every line after it "
                    "into one value; fix the file's quoting"
                ) from None


def _check_parquet_files(name: str, src: SourceConfig, path: str) -> None:
    """Spark takes one file's schema for a folder and reads a column missing from another
    file as nulls: check every local file's footer."""
    for file in local_input_files(path) or []:
        try:
            present = set(pq.read_schema(file).names)
        except (OSError, pa.ArrowException) as exc:
            raise DataError(
                f"sources.{name}: {file} is not a readable Parquet file: {exc}"
            ) from None
        missing = [m for m in src.names_in_file if m not in present]
        if missing:
            raise DataError(
                f"sources.{name}: {file} has no column(s) {missing}; it has {sorted(present)}"
            )


def _check_json_fields(
    spark: SparkSession, name: str, src: SourceConfig, path: str
) -> dict[str, int]:
    """Spark reads a field that no record has as nulls, so a misspelt or renamed field
    would pass as missing values: every configured field must occur in every file.
    Returns the fields that are not configured, with how many records hold them: their
    values are not read, so they are reported (a misspelling in a few records shows here)."""
    if src.option("multiLine", "false").lower() == "true":
        return {}  # whole-file JSON documents are not one record per line
    counts = (
        spark.read.text(spark_path(path))
        .select(
            F.input_file_name().alias("file"),
            F.explode(F.json_object_keys("value")).alias("key"),
        )
        .groupBy("file", "key")
        .count()
        .collect()
    )
    keys: dict[str, set[str]] = {}
    unconfigured: dict[str, int] = {}
    expected = src.names_in_file
    for row in counts:
        keys.setdefault(row["file"], set()).add(row["key"])
        if row["key"] not in expected:
            unconfigured[row["key"]] = unconfigured.get(row["key"], 0) + row["count"]
    if unconfigured:
        log.warning(
            "sources.%s: fields not in the config, not read (records holding each): %s",
            name,
            dict(sorted(unconfigured.items())),
        )
    for file, found in sorted(keys.items()):
        missing = [k for k in expected if k not in found]
        if missing:
            raise DataError(
                f"sources.{name}: no record of {file} has the field(s) {missing}; "
                f"its records have {sorted(found)} (field names are case-sensitive; "
                "raw_name maps a different spelling)"
            )
    return dict(sorted(unconfigured.items()))


def local_input_files(path: str) -> list[Path] | None:
    """The files Spark will read for a local path, file or folder or glob (None for URLs).
    Like Spark, names starting with '_' or '.' are skipped."""
    if "://" in path and not path.startswith("file://"):
        return None
    path = path.removeprefix("file://")
    if any(ch in path for ch in "*?["):
        candidates = [Path(p) for p in sorted(glob.glob(path))]
    elif Path(path).is_dir():
        candidates = sorted(Path(path).iterdir())
        # Spark reads neither plain subfolders nor their files: say so rather than skip.
        nested = [
            p.name
            for p in candidates
            if p.is_dir() and not p.name.startswith(("_", ".")) and "=" not in p.name
        ]
        if nested:
            raise DataError(
                f"{path} holds the folder(s) {nested}, which Spark would not read; move their "
                "files up, or point the source's path at a glob that names them"
            )
    else:
        candidates = [Path(path)] if Path(path).exists() else []
    return [p for p in candidates if p.is_file() and not p.name.startswith(("_", "."))]


def _separator(src: SourceConfig) -> str:
    sep = src.option("sep", src.option("delimiter", ","))
    # Spark reads the two characters backslash-t as a tab, as YAML's '\t' gives them.
    return "\t" if sep == "\\t" else sep


def _encoding(src: SourceConfig) -> str:
    return src.option("encoding", src.option("charset", "utf-8"))


def _open_text(file: Path, encoding: str) -> TextIO:
    """A local input file as text, decompressed as Spark would by its suffix."""
    opener = {".gz": gzip.open, ".bz2": bz2.open}.get(file.suffix, open)
    if encoding.lower().replace("-", "") == "utf8":
        encoding = "utf-8-sig"  # a byte-order mark is not part of the first column's name
    return opener(file, "rt", newline="", encoding=encoding, errors="replace")


def _first_line(file: Path, encoding: str) -> str:
    try:
        with _open_text(file, encoding) as fh:
            return fh.readline()
    except LookupError:
        raise DataError(f"{file}: unknown encoding '{encoding}' in the reader options") from None
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{file}: cannot read its first line: {exc}") from None


def _check_header(name: str, src: SourceConfig, path: str) -> None:
    """Spark maps CSV fields to the schema by position; a reordered or missing column
    would shift values silently. Compare every local file's header with the config."""
    files = local_input_files(path)
    if files is not None and not files:
        raise DataError(f"sources.{name}: input {path} does not exist or holds no files")
    if files is None or src.format != "csv":
        return
    if src.option("header", "false").lower() != "true":
        return
    sep = _separator(src)
    expected = src.names_in_file
    for file in files:
        first = _first_line(file, _encoding(src))
        if not first.strip():
            raise DataError(f"sources.{name}: {file} is empty; expected a header line")
        line = first.rstrip("\r\n")
        if len(sep) == 1:
            # A quoted name may hold the separator: `id,"Name, full"`.
            header = next(csv.reader([line], delimiter=sep, quotechar=src.option("quote", '"')))
            header = [h.strip() for h in header]
        else:
            header = [h.strip().strip('"') for h in line.split(sep)]
        if header == expected:
            continue
        missing = [c for c in expected if c not in header]
        extra = [c for c in header if c not in expected]
        found = (
            f"missing {missing}, unexpected {extra}"
            if missing or extra
            else f"same columns in another order {header}"
        )
        raise DataError(
            f"sources.{name}: {file} header does not match sources.{name}.columns: "
            f"{found}; expected the columns in this order: {expected}"
        )


def classify(
    df: DataFrame,
    src: SourceConfig,
    label: LabelConfig | None = None,
) -> DataFrame:
    """Parses the raw string columns and adds the reason a row is refused (null when clean).

    Output: the typed columns (+ the label), SOURCE_FILE, a JSON of the raw fields, REASON
    and REASON_COLUMN.
    """
    raw_cols = list(src.columns)
    text = {c: _present(F.col(c), src.null_values) for c in raw_cols}
    typed = {c: _parse(text[c], spec) for c, spec in src.columns.items()}
    reason_and_column: list[tuple[Column, str, str | None]] = []
    if src.format == "csv":
        reason_and_column.append((_unclosed_quote(F.col(CORRUPT), src), "unclosed_quote", None))
        wrong_count = _field_count(F.col(CORRUPT), src) != len(raw_cols)
        reason_and_column.append(
            (F.col(CORRUPT).isNotNull() & wrong_count, "wrong_field_count", None)
        )
    reason_and_column.append((F.col(CORRUPT).isNotNull(), "malformed_record", None))
    for c in raw_cols:
        # Spark decodes undecodable bytes to U+FFFD instead of failing.
        reason_and_column.append((F.col(c).contains("\ufffd"), "invalid_encoding", c))
    for c in raw_cols:
        spec = src.columns[c]
        if spec.type != "string":
            reason_and_column.append(
                (text[c].isNotNull() & typed[c].isNull(), "unparseable_value", c)
            )
        if spec.type in ("double", "float"):
            # "NaN" and "Infinity" parse as doubles but poison means, PCA and training.
            non_finite = F.isnan(typed[c]) | (F.abs(typed[c]) == float("inf"))
            reason_and_column.append((non_finite, "non_finite_value", c))
        outside = F.lit(False)
        if spec.min is not None:
            outside = outside | (typed[c] < F.lit(spec.min))
        if spec.max is not None:
            outside = outside | (typed[c] > F.lit(spec.max))
        if spec.values:
            outside = outside | ~typed[c].isin(*spec.values)
        if spec.min is not None or spec.max is not None or spec.values:
            reason_and_column.append((outside, "out_of_range", c))

    out = df.select(
        *[typed[c].alias(c) for c in raw_cols],
        F.col(SOURCE_FILE),
        F.coalesce(F.col(CORRUPT), F.to_json(F.struct(*[F.col(c) for c in raw_cols]))).alias(
            "_raw_record"
        ),
        *[
            F.coalesce(cond, F.lit(False)).alias(f"_bad_{i}")
            for i, (cond, _, _) in enumerate(reason_and_column)
        ],
    )
    checks = [(F.col(f"_bad_{i}"), r, c) for i, (_, r, c) in enumerate(reason_and_column)]
    if label is not None:
        try:
            value, invalid = _label_value(label)
            out = out.withColumn(label.name, value).withColumn("_label_invalid", invalid)
        except Exception as exc:  # AnalysisException or ParseException
            raise DataError(
                f"label.expr: cannot evaluate '{label.expr}' on the main source's columns "
                f"{raw_cols}: {spark_error_summary(exc)}"
            ) from None
        missing = F.lit(False)
        for c in label.requires:
            missing = missing | F.col(c).isNull()
        # A bad label value is nulled, so invalid_label is judged first.
        checks.append((F.col("_label_invalid"), "invalid_label", label.name))
        checks.append((missing | F.col(label.name).isNull(), "missing_label", None))
    for c, spec in src.columns.items():
        if not spec.nullable:
            checks.append((F.col(c).isNull(), "missing_value", c))

    # The first failed check, as one flat coalesce: a when/otherwise chain nests one level
    # per check, and a few thousand columns overflow the JVM's stack analysing it.
    first_failed = F.coalesce(
        *[
            F.when(cond, F.struct(F.lit(code).alias("r"), F.lit(col).cast("string").alias("c")))
            for cond, code, col in checks
        ]
    )
    out = out.withColumn("_failed", first_failed)
    out = out.withColumn(REASON, F.col("_failed.r")).withColumn(REASON_COLUMN, F.col("_failed.c"))
    out = out.drop("_failed")
    out = _reject_repeats(out, raw_cols, list(src.key))
    return out.drop("_label_invalid", *[f"_bad_{i}" for i in range(len(reason_and_column))])


def _present(raw: Column, null_values: list[str]) -> Column:
    """The trimmed field, or null when it is empty or one of the source's null markers."""
    trimmed = F.trim(raw)
    missing = trimmed == ""
    if null_values:
        missing = missing | trimmed.isin(*null_values)
    return F.when(~missing, trimmed)


# Spark's casts are lenient: Java's double parser takes `72F`, `5d` and `0x1p3`, and a
# date cast takes `2024` or `2024-01-05 anything`. A value must first look like its type.
_LOOKS_LIKE = {
    "int": r"[+-]?\d+",
    "long": r"[+-]?\d+",
    "double": r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|(?i)[+-]?(nan|inf|infinity)",
    "date": r"\d{4}-\d{2}-\d{2}",
    "timestamp": r"\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d{1,9})?)?)?"
    r"(Z|[+-]\d{2}(:?\d{2})?)?",
}
_LOOKS_LIKE["float"] = _LOOKS_LIKE["double"]


def _parse(text: Column, spec: ColumnConfig) -> Column:
    if spec.format and spec.type == "date":
        return F.try_to_timestamp(text, F.lit(spec.format)).cast("date")
    if spec.format:
        return F.try_to_timestamp(text, F.lit(spec.format))
    value = text.try_cast(SPARK_TYPES[spec.type])
    pattern = _LOOKS_LIKE.get(spec.type)
    return F.when(text.rlike(f"^({pattern})$"), value) if pattern else value


def _field_count(record: Column, src: SourceConfig) -> Column:
    """How many fields a CSV record has: separators outside quoted sections, plus one."""
    sep = _separator(src)
    q = re.escape(src.option("quote", '"'))
    # Unrolled (`"[^"]*(""[^"]*)*"`) rather than `"([^"]|"")*"`: the alternation recurses
    # once per character in Java's regex engine and overflows the stack on long fields.
    quoted = f"{q}[^{q}]*(?:{q}{q}[^{q}]*)*{q}"
    return F.size(F.split(F.regexp_replace(record, quoted, ""), re.escape(sep), -1))


def _unclosed_quote(record: Column, src: SourceConfig) -> Column:
    """A record spanning lines with an odd number of quotes: a quote that never closes
    makes the reader take every following line into this one record."""
    quote = src.option("quote", '"')
    quotes = F.length(record) - F.length(F.replace(record, F.lit(quote), F.lit("")))
    return record.contains("\n") & (quotes % 2 == 1)


def _reject_repeats(out: DataFrame, columns: list[str], key: list[str]) -> DataFrame:
    """Among rows that are otherwise clean: an exact repeat of a row is rejected as
    duplicate_row (the first by file and raw text kept, so reruns keep the same one);
    rows that share a key but differ elsewhere are all rejected as duplicate_key."""
    clean_now = F.col(REASON).isNull()
    w = Window.partitionBy(*[F.col(c) for c in columns], clean_now).orderBy(
        SOURCE_FILE, "_raw_record"
    )
    repeat = clean_now & (F.row_number().over(w) > 1)
    out = out.withColumn(REASON, F.when(repeat, F.lit("duplicate_row")).otherwise(F.col(REASON)))
    if not key:
        return out
    clean_now = F.col(REASON).isNull()
    by_key = Window.partitionBy(*[F.col(c) for c in key], clean_now)
    conflict = clean_now & (F.count(F.lit(1)).over(by_key) > 1)
    return out.withColumn("_conflict", conflict).select(
        *[c for c in out.columns if c not in (REASON, REASON_COLUMN)],
        F.when(F.col("_conflict"), F.lit("duplicate_key")).otherwise(F.col(REASON)).alias(REASON),
        F.when(F.col("_conflict"), F.lit(",".join(key)))
        .otherwise(F.col(REASON_COLUMN))
        .alias(REASON_COLUMN),
    )


def _label_value(label: LabelConfig) -> tuple[Column, Column]:
    """The label as the double the later stages train on, and when it is invalid.

    binary: 0.0 or 1.0 (a boolean expression counts as 0/1); multiclass: the index of
    the value in label.classes; regression: any finite number.
    """
    expr = F.expr(label.expr)
    if label.task == "multiclass":
        as_text = F.trim(expr.cast("string"))
        # array_position is 1-based and 0 when absent.
        position = F.array_position(F.array(*[F.lit(c) for c in label.classes]), as_text)
        value = F.when(position > 0, (position - 1).cast("double"))
        invalid = as_text.isNotNull() & (position == 0)
    else:
        value = expr.try_cast("double")
        if label.task == "binary":
            invalid = ~value.isin(0.0, 1.0)
        else:
            invalid = F.isnan(value) | (F.abs(value) == float("inf"))
        # A bad label keeps no value: the row is rejected for it.
        value = F.when(~invalid, value)
    return value, F.coalesce(invalid, F.lit(False))


def rejects_of(classified: DataFrame, source: str) -> DataFrame:
    return classified.filter(F.col(REASON).isNotNull()).select(
        F.lit(source).alias("source"),
        F.col(SOURCE_FILE).alias("source_file"),
        F.col("_raw_record").alias("raw_record"),
        F.col(REASON).alias("reason"),
        F.col(REASON_COLUMN).alias("column"),
    )


def clean_rows_of(classified: DataFrame, columns: list[str]) -> DataFrame:
    return classified.filter(F.col(REASON).isNull()).select(*columns)


def reason_counts(classified: DataFrame) -> dict[str | None, int]:
    rows = classified.groupBy(REASON).count().collect()
    return {r[REASON]: r["count"] for r in rows}


def clean(spark: SparkSession, config: Config, run_dir: RunDir) -> dict:
    """Runs the clean stage; returns the quality report (also written to quality.json)."""
    quality: dict = {"sources": {}, "joins": {}}
    cleaned: dict[str, DataFrame] = {}
    all_rejects: list[DataFrame] = []
    persisted: list[DataFrame] = []

    for name, src in config.sources.items():
        path = source_path(src, run_dir)
        raw = read_raw(spark, name, src, path)  # checks that the input exists first
        unconfigured = _check_json_fields(spark, name, src, path) if src.format == "json" else {}
        is_main = name == config.main
        # On disk only: its partitions come out of a shuffle and grow with the data (see
        # shard.with_dense_ids); cached in memory they can run the JVM out of heap.
        classified = classify(
            raw,
            src,
            label=config.label if is_main else None,
        ).persist(StorageLevel.DISK_ONLY)
        persisted.append(classified)

        try:
            counts = reason_counts(classified)
        except Exception as exc:
            if not (is_main and row_error_class(exc)):
                raise
            raise DataError(
                f"label.expr: '{config.label.expr}' failed on a row "
                f"({spark_error_summary(exc)}); Spark's ANSI mode fails the job on one bad "
                "row: use try_cast, try_divide and the like, which give null (the row is "
                "then rejected as missing_label)"
            ) from None
        rows_in = sum(counts.values())
        n_clean = counts.pop(None, 0)
        report = {
            "path": path,
            "rows_in": rows_in,
            "clean": n_clean,
            "rejected": sum(counts.values()),
            "rejected_by_reason": dict(sorted(counts.items())),
        }
        report["rejected_by_column"] = {}
        if counts:
            by_column = (
                classified.filter(F.col(REASON_COLUMN).isNotNull())
                .groupBy(REASON, REASON_COLUMN)
                .count()
                .collect()
            )
            report["rejected_by_column"] = {
                f"{r[REASON]}:{r[REASON_COLUMN]}": r["count"]
                for r in sorted(by_column, key=lambda r: (r[REASON], r[REASON_COLUMN]))
            }
        if unconfigured:
            report["unconfigured_fields"] = unconfigured
        if src.format == "csv" and _spans_lines(classified, src):
            _check_quotes_close(name, src, path)
        if "unclosed_quote" in counts:
            first = (
                classified.filter(F.col(REASON) == "unclosed_quote")
                .select(SOURCE_FILE, F.size(F.split("_raw_record", "\n")).alias("lines"))
                .orderBy(F.desc("lines"))
                .first()
            )
            report["unclosed_quote"] = {"file": first[SOURCE_FILE], "lines": first["lines"]}
        quality["sources"][name] = report
        log.info(
            "source %s: %d rows in, %d clean, %d rejected %s",
            name,
            rows_in,
            n_clean,
            report["rejected"],
            report["rejected_by_reason"],
        )
        columns = list(src.columns) + ([config.label.name] if is_main else [])
        cleaned[name] = clean_rows_of(classified, columns)
        all_rejects.append(rejects_of(classified, name))

    joined = cleaned[config.main]
    for join in config.joins:
        flag = f"_matched_{join.source}"
        lookup = cleaned[join.source].select(
            *join.on,
            *[F.col(c).alias(new) for c, new in join.select.items()],
            F.lit(True).alias(flag),
        )
        joined = joined.join(lookup, on=join.on, how="left")
    flags = [f"_matched_{j.source}" for j in config.joins]
    if flags:
        stats = joined.agg(
            F.count(F.lit(1)).alias("rows"), *[F.count(f).alias(f) for f in flags]
        ).first()
        for join, f in zip(config.joins, flags, strict=True):
            quality["joins"][join.source] = {
                "on": join.on,
                "matched": stats[f],
                "unmatched": stats["rows"] - stats[f],
            }
            log.info(
                "join %s on %s: %d matched, %d unmatched (kept, lookup columns null)",
                join.source,
                join.on,
                stats[f],
                stats["rows"] - stats[f],
            )
    joined = joined.drop(*flags)

    joined.write.mode("overwrite").parquet(spark_path(run_dir.clean))
    rejects = all_rejects[0]
    for more in all_rejects[1:]:
        rejects = rejects.unionByName(more)
    rejects.coalesce(1).write.mode("overwrite").parquet(spark_path(run_dir.rejects))

    # Reconcile from what was written, not from what was planned.
    written = spark.read.parquet(spark_path(run_dir.clean))
    written_clean, profile = column_profile(written, clean_column_types(config))
    written_rejects = {
        (r["source"]): r["count"]
        for r in spark.read.parquet(spark_path(run_dir.rejects)).groupBy("source").count().collect()
    }
    for df in persisted:
        df.unpersist()

    write_json(run_dir.quality, quality)  # also when a check below fails: it explains why
    try:
        _check_outcome(config, quality, written_clean, written_rejects, run_dir)
    except DataError:
        # A refused output must not feed the features stage.
        shutil.rmtree(run_dir.clean, ignore_errors=True)
        raise
    main = quality["sources"][config.main]
    quality.update(
        {
            "main": config.main,
            "rows_in": main["rows_in"],
            "clean": written_clean,
            "rejected": main["rejected"],
            "rejected_by_reason": main["rejected_by_reason"],
            "reconciled": main["rows_in"] == written_clean + main["rejected"],
            "label": label_distribution(config, written, profile[config.label.name]),
            "columns": profile,
        }
    )
    write_json(run_dir.quality, quality)
    log_clean_quality(quality)
    return quality


def label_distribution(config: Config, clean: DataFrame, profiled: dict) -> dict:
    """The label's distribution in the clean table: the positive share (binary), rows per
    class (multiclass) or mean and stddev (regression). `profiled` is the label's entry
    in the column profile, which already holds the mean and stddev."""
    label = config.label
    summary: dict = {"name": label.name, "task": label.task}
    if label.task == "binary":
        summary["positive_share"] = profiled["mean"]
    elif label.task == "multiclass":
        counts = {int(r[0]): r[1] for r in clean.groupBy(label.name).count().collect()}
        summary["rows_by_class"] = {c: counts.get(i, 0) for i, c in enumerate(label.classes)}
    else:
        summary.update(mean=profiled["mean"], stddev=profiled["stddev"])
    return summary


def _check_outcome(
    config: Config, quality: dict, written_clean: int, written_rejects: dict, run_dir: RunDir
) -> None:
    """Refuses a clean output that is empty, rejects too much or does not reconcile with
    what was written."""
    for name, report in quality["sources"].items():
        if "unclosed_quote" in report:
            where = report["unclosed_quote"]
            raise DataError(
                f"sources.{name}: {where['file']} has a quote that is never closed: "
                f"{where['lines']} lines after it were read as one record (reason "
                f"unclosed_quote in {run_dir.rejects}); fix the file's quoting"
            )
        path, rows_in = report["path"], report["rows_in"]
        if rows_in == 0:
            raise DataError(f"sources.{name}: {path} has no data rows")
        if report["clean"] == 0:
            raise DataError(
                f"sources.{name}: all {rows_in} rows of {path} were rejected "
                f"({report['rejected_by_reason']}); check sources.{name}.columns types and "
                f"options; the rows and reasons are in {run_dir.rejects}"
            )
    for name, report in quality["sources"].items():
        ceiling = config.sources[name].max_reject_share
        share = report["rejected"] / report["rows_in"]
        if share > ceiling:
            raise DataError(
                f"sources.{name}: {share:.1%} of the {report['rows_in']} rows of {report['path']} "
                f"were rejected {report['rejected_by_reason']}, above sources.{name}."
                f"max_reject_share={ceiling}; the rows and reasons are in {run_dir.rejects}: "
                "fix the columns' types, the reader options or the label, or raise the ceiling"
            )
    main = quality["sources"][config.main]
    if written_clean != main["clean"]:
        raise DataError(
            f"clean: wrote {written_clean} rows but classified {main['clean']} as clean "
            f"for sources.{config.main}; a join multiplied or dropped rows"
        )
    for name, report in quality["sources"].items():
        if written_rejects.get(name, 0) != report["rejected"]:
            raise DataError(
                f"clean: wrote {written_rejects.get(name, 0)} rejects for sources.{name} "
                f"but classified {report['rejected']}"
            )
        if report["rows_in"] != report["clean"] + report["rejected"]:
            raise DataError(f"clean: sources.{name} does not reconcile: {report}")
