"""Clean on small bad inputs, one fixture per kind of damage, each with its exact fate.

Every fixture is the main source `rows` of its own config, so its clean rows are written
to <run>/clean and can be read back. Each fixture is cleaned once per module; the inputs
that only need the default CSV reader share one run over a table of cases.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sparknet.clean import clean
from sparknet.config import FeaturesConfig, config_from_dict
from sparknet.errors import ConfigError, DataError
from sparknet.features import informative_features
from sparknet.run_dir import RunDir, read_json

SOURCE = "rows"
ALWAYS_POSITIVE = {"name": "y", "expr": "1", "requires": []}


@dataclass(frozen=True)
class Fixture:
    """A raw input and the source config it is read with. `raw` is the file's text or
    bytes, or {column: values} for a Parquet file."""

    raw: str | bytes | dict[str, list]
    columns: dict[str, Any]
    source: dict[str, Any] = field(default_factory=dict)  # more sources.rows keys
    label: dict[str, Any] = field(default_factory=lambda: dict(ALWAYS_POSITIVE))
    file: str = "rows.csv"
    rows_in: int | None = None  # rows the reader should see, when the fixture succeeds


def config_of(fx: Fixture) -> Any:
    first = next(iter(fx.columns))
    source = {
        "path": fx.file,
        "columns": fx.columns,
        "options": {"header": "true"},
        "max_reject_share": 1.0,  # the fixtures are mostly bad on purpose
        **fx.source,
    }
    return config_from_dict(
        {
            "name": "bad-inputs",
            "sources": {SOURCE: source},
            "main": SOURCE,
            "label": fx.label,
            "features": {"numeric": [], "categorical": [first]},
            "split": {"key": [first]},
        }
    )


# The default CSV reader: one file, one case per id. Columns: a string, a double, a date
# with a pattern, the label's 0/1 flag, an always-empty column and a constant one.
TABLE_HEADER = "id,text,amount,day,flag,blank,const"
TABLE_COLUMNS = {
    "id": "int",
    "text": "string",
    "amount": "double",
    "day": {"type": "date", "format": "MM/dd/yy"},
    "flag": "int",
    "blank": "double",
    "const": "double",
}
TABLE_LABEL = {"name": "y", "expr": "flag", "requires": ["flag"]}


@dataclass(frozen=True)
class Case:
    name: str
    lines: list[str]  # the case's lines in the table; all start with its id
    clean: list[dict[str, Any]] = field(default_factory=list)  # values of its clean rows
    rejected: list[tuple[str, str | None]] = field(default_factory=list)  # (reason, column)

    @property
    def id(self) -> int:
        return int(self.lines[0].split(",")[0])


WRONG_COUNT = ("wrong_field_count", None)

TABLE = [
    Case(
        "plain row, MM/dd/yy date",
        ["1,plain,1.5,11/16/07,1,,7"],
        clean=[
            {
                "text": "plain",
                "amount": 1.5,
                "day": date(2007, 11, 16),
                "flag": 1,
                "blank": None,
                "const": 7.0,
                "y": 1.0,
            }
        ],
    ),
    Case("too many fields", ["2,a,1.5,11/16/07,1,,7,extra"], rejected=[WRONG_COUNT]),
    Case("too few fields", ["3,a,1.5"], rejected=[WRONG_COUNT]),
    Case("unquoted comma in text", ["4,Smith, Ann,1.5,11/16/07,1,,7"], rejected=[WRONG_COUNT]),
    Case(
        "doubled quotes",
        ['5,"say ""hi""",2.5,11/16/07,0,,7'],
        clean=[{"text": 'say "hi"', "amount": 2.5, "y": 0.0}],
    ),
    Case(
        "quoted thousands separator",
        ['6,a,"1,234",11/16/07,1,,7'],
        rejected=[("unparseable_value", "amount")],
    ),
    Case(
        "number with a unit",
        ["7,a,12 kg,11/16/07,1,,7"],
        rejected=[("unparseable_value", "amount")],
    ),
    Case("NaN", ["8,a,NaN,11/16/07,1,,7"], rejected=[("non_finite_value", "amount")]),
    # Spark's try_cast reads `inf` as Infinity, so it is non-finite rather than unparseable.
    Case("inf", ["9,a,inf,11/16/07,1,,7"], rejected=[("non_finite_value", "amount")]),
    Case("Infinity", ["10,a,Infinity,11/16/07,1,,7"], rejected=[("non_finite_value", "amount")]),
    Case("-Infinity", ["11,a,-Infinity,11/16/07,1,,7"], rejected=[("non_finite_value", "amount")]),
    Case(
        "n/a without null_values",
        ["12,a,n/a,11/16/07,1,,7"],
        rejected=[("unparseable_value", "amount")],
    ),
    Case("empty number", ["13,a,,11/16/07,1,,7"], clean=[{"amount": None, "y": 1.0}]),
    Case("null label", ["14,a,1.5,11/16/07,,,7"], rejected=[("missing_label", None)]),
    Case(
        "exact duplicate",
        ["15,twice,3.5,11/16/07,0,,7"] * 2,
        clean=[{"text": "twice", "amount": 3.5}],
        rejected=[("duplicate_row", None)],
    ),
    # Java's double parser would take these; a number must look like one.
    Case("float suffix", ["17,a,72F,11/16/07,1,,7"], rejected=[("unparseable_value", "amount")]),
    Case("hex float", ["18,a,0x1p3,11/16/07,1,,7"], rejected=[("unparseable_value", "amount")]),
    Case("binary label 2", ["19,a,1.5,11/16/07,2,,7"], rejected=[("invalid_label", "y")]),
    Case(
        "long malformed quoted field",
        ['20,"' + "x" * 20_000 + '",1.5,11/16/07,1,,7,extra'],
        rejected=[WRONG_COUNT],
    ),
    Case(
        "ISO date under MM/dd/yy",
        ["16,a,1.5,2007-11-16,1,,7"],
        rejected=[("unparseable_value", "day")],
    ),
]
TABLE_LINES = [line for case in TABLE for line in case.lines]

FIXTURES = {
    "table": Fixture(
        raw="\n".join([TABLE_HEADER, *TABLE_LINES]) + "\n",
        columns=TABLE_COLUMNS,
        label=TABLE_LABEL,
        rows_in=len(TABLE_LINES),
    ),
    # CSV is always read record by record, not line by line.
    "quoted_line_break": Fixture(
        raw='id,note\n1,plain\n2,"first\nsecond"\n3,after\n',
        columns={"id": "int", "note": "string"},
        rows_in=3,
    ),
    "null_marker": Fixture(
        raw="id,maybe,must\n1,n/a,2.5\n2,1.5, n/a\n3,1.5,2.5\n",
        columns={"id": "int", "maybe": "double", "must": {"type": "double", "nullable": False}},
        source={"null_values": ["n/a"]},
        rows_in=3,
    ),
    "latin1_read_as_utf8": Fixture(
        raw=b"id,name\n1,caf\xe9\n2,plain\n",
        columns={"id": "int", "name": "string"},
        rows_in=2,
    ),
    "latin1_declared": Fixture(
        raw=b"id,name\n1,caf\xe9\n2,plain\n",
        columns={"id": "int", "name": "string"},
        source={"options": {"header": "true", "encoding": "ISO-8859-1"}},
        rows_in=2,
    ),
    "crlf": Fixture(
        raw=b"id,name,qty\r\n1,a,5\r\n2,b,6\r\n",
        columns={"id": "int", "name": "string", "qty": "int"},
        rows_in=2,
    ),
    "duplicate_keys": Fixture(
        raw="region,code,value\nN,1,1.0\nN,1,2.0\nN,2,1.0\nS,1,1.0\nS,1,1.0\n",
        columns={"region": "string", "code": "int", "value": "double"},
        source={"key": ["region", "code"]},
        rows_in=5,
    ),
    "json_lines": Fixture(
        raw=(
            '{"id": 1, "Full Name": "Ann", "score": 1.5}\n'
            '{"id": 2, "Full Name": "Bob", "score": "2.5"}\n'
            '{"id": 3, "Full Name": "Cy", "score":}\n'
            '{"id": 4, "Full Name": "Di", "score": 4}\n'
        ),
        columns={
            "id": "int",
            "name": {"type": "string", "raw_name": "Full Name"},
            "score": "double",
        },
        source={"format": "json", "options": {}},
        file="rows.jsonl",
        rows_in=4,
    ),
}

# Inputs that are unusable as a whole: {name: (fixture, message pattern)}; `{path}` in the
# pattern stands for the input file's path.
REFUSED = {
    "empty_file": (
        Fixture(raw=b"", columns={"id": "int", "amount": "double"}),
        r"sources\.rows: {path} is empty",
    ),
    "header_only": (
        Fixture(raw="id,amount\n", columns={"id": "int", "amount": "double"}),
        r"sources\.rows: {path} has no data rows",
    ),
    "label_column_missing": (
        Fixture(
            raw="id,amount\n1,2.5\n",
            columns={"id": "int", "amount": "double", "late": "double"},
            label={"name": "y", "expr": "late > 15", "requires": ["late"]},
        ),
        r"sources\.rows: {path} header does not match .*missing \['late'\]",
    ),
    "all_rejected": (
        Fixture(raw="id,amount\nx,1\ny,2\n", columns={"id": "int", "amount": "double"}),
        r"sources\.rows: all 2 rows of {path} were rejected",
    ),
    "share_above_ceiling": (
        Fixture(
            raw="id,amount\n1,1\n2,2\n3,x\n4,4\n",
            columns={"id": "int", "amount": "double"},
            source={"max_reject_share": 0.2},
        ),
        r"sources\.rows: 25\.0% of the 4 rows of {path} were rejected .*"
        r"sources\.rows\.max_reject_share=0\.2",
    ),
    "unclosed_quote": (
        Fixture(
            raw="id,amount\n"
            + "".join(f"{i},{i}.5\n" for i in range(1, 50))
            + '50,"oops\n'
            + "".join(f"{i},{i}.5\n" for i in range(51, 80)),
            columns={"id": "int", "amount": "string"},
        ),
        r"sources\.rows: {path}: the record starting at line 51 does not parse",
    ),
    "json_field_missing": (
        Fixture(
            raw='{"id": 1, "wieght": 2.5}\n{"id": 2, "wieght": 3.5}\n',
            columns={"id": "int", "weight": "double"},
            source={"format": "json", "options": {}},
            file="rows.jsonl",
        ),
        r"sources\.rows: no record of file://{path} has the field\(s\) \['weight'\]",
    ),
    "gzip_that_is_not": (
        Fixture(
            raw="id,amount\n1,2\n", columns={"id": "int", "amount": "double"}, file="rows.csv.gz"
        ),
        r"{path}: cannot read its first line: Not a gzipped file",
    ),
    "parquet_missing_column": (
        Fixture(
            raw={"id": [1, 2], "amount": [1.0, 2.0]},
            columns={"id": "long", "amount": "double", "late": "double"},
            source={"format": "parquet", "options": {}},
            file="rows.parquet",
        ),
        r"sources\.rows: {path} has no column\(s\) \['late'\]",
    ),
}


@dataclass(frozen=True)
class Run:
    run_dir: RunDir
    path: str  # the input file, as clean names it
    quality: dict | None  # clean's return value; None when it raised
    error: DataError | None
    clean: list[dict]  # <run>/clean, collected
    clean_count_one_column: int  # <run>/clean counted reading only its first column
    rejects: list[dict]  # <run>/rejects, collected


def run_clean(spark, root: Path, fx: Fixture) -> Run:
    run_dir = RunDir.at(root)
    run_dir.raw.mkdir(parents=True)
    path = run_dir.raw / fx.file
    if isinstance(fx.raw, dict):
        pq.write_table(pa.table(fx.raw), path)
    else:
        path.write_bytes(fx.raw.encode() if isinstance(fx.raw, str) else fx.raw)

    try:
        quality, error = clean(spark, config_of(fx), run_dir), None
    except DataError as exc:
        quality, error = None, exc

    clean_rows, one_column = [], 0
    if run_dir.clean.exists():
        df = spark.read.parquet(str(run_dir.clean))
        clean_rows = [r.asDict() for r in df.collect()]
        one_column = df.select(df.columns[0]).count()
    rejects = []
    if run_dir.rejects.exists():
        rejects = [r.asDict() for r in spark.read.parquet(str(run_dir.rejects)).collect()]
    return Run(run_dir, str(path), quality, error, clean_rows, one_column, rejects)


@pytest.fixture(scope="module")
def cleaned(spark, tmp_path_factory):
    """cleaned(name) -> the Run of FIXTURES[name] (which must succeed) or REFUSED[name];
    each fixture is cleaned once per module."""
    runs: dict[str, Run] = {}

    def get(name: str) -> Run:
        if name not in runs:
            fx = FIXTURES[name] if name in FIXTURES else REFUSED[name][0]
            runs[name] = run_clean(spark, tmp_path_factory.mktemp(name), fx)
        run = runs[name]
        if name in FIXTURES and run.error is not None:
            pytest.fail(f"clean refused fixture {name}: {run.error}")
        return run

    return get


def record_id(raw_record: str) -> int:
    """The id of a rejected table row: its raw record is the line itself when the reader
    could not split it into the columns, else a JSON object of the raw fields."""
    if raw_record.startswith("{"):
        return int(json.loads(raw_record)["id"])
    return int(raw_record.split(",")[0])


def picked(rows: list[dict], columns: list[str]) -> list[tuple]:
    return sorted((tuple(r[c] for c in columns) for r in rows), key=repr)


# --- the default-CSV table --------------------------------------------------------------


@pytest.mark.parametrize("case", TABLE, ids=[c.name for c in TABLE])
def test_table_case_ends_where_specified(cleaned, case):
    run = cleaned("table")
    clean_rows = [r for r in run.clean if r["id"] == case.id]
    rejects = [r for r in run.rejects if record_id(r["raw_record"]) == case.id]

    got_rejected = sorted(((r["reason"], r["column"]) for r in rejects), key=repr)
    assert got_rejected == sorted(case.rejected, key=repr)
    assert len(clean_rows) == len(case.clean)
    got_clean = [
        {k: r[k] for k in expected} for r, expected in zip(clean_rows, case.clean, strict=True)
    ]
    assert got_clean == case.clean


def test_wrong_field_count_keeps_the_line_as_written(cleaned):
    run = cleaned("table")
    expected = [line for case in TABLE if WRONG_COUNT in case.rejected for line in case.lines]
    got = [r["raw_record"] for r in run.rejects if r["reason"] == "wrong_field_count"]
    assert sorted(got) == sorted(expected)
    assert all(
        r["source"] == SOURCE and r["source_file"].endswith("/rows.csv") for r in run.rejects
    )


def test_all_null_and_constant_columns_pass_clean_and_features_drops_them(spark, cleaned):
    run = cleaned("table")
    assert len(run.clean) == sum(len(case.clean) for case in TABLE)
    assert {r["blank"] for r in run.clean} == {None}
    assert {r["const"] for r in run.clean} == {7.0}

    table = spark.read.parquet(str(run.run_dir.clean))
    feats = FeaturesConfig(numeric=["amount", "blank", "const"], categorical=["text"])
    dropped = informative_features(table, feats)[1]
    assert dropped == {"blank": "all null", "const": "constant"}


# --- fixtures needing their own reader options -------------------------------------------


def test_quoted_line_break_stays_in_one_value(cleaned):
    run = cleaned("quoted_line_break")
    assert picked(run.clean, ["id", "note"]) == [(1, "plain"), (2, "first\nsecond"), (3, "after")]
    assert run.rejects == []


def test_reading_csv_line_by_line_is_refused():
    """Line by line, Spark keeps `2,"first` as a clean row with the value cut at the break."""
    data = {
        "name": "lines",
        "sources": {
            SOURCE: {
                "path": "rows.csv",
                "options": {"header": "true", "multiLine": "false"},
                "columns": {"id": "int", "note": "string"},
            }
        },
        "main": SOURCE,
        "label": {"name": "y", "expr": "id > 1", "requires": ["id"]},
        "features": {"numeric": ["id"]},
        "split": {"key": ["id"]},
    }
    with pytest.raises(ConfigError, match=r"sources.rows.options.multiLine: false is refused"):
        config_from_dict(data)


def test_null_marker_is_missing_after_trimming(cleaned):
    run = cleaned("null_marker")
    # n/a in a nullable column is null; in a nullable: false column the row is refused.
    assert picked(run.clean, ["id", "maybe", "must"]) == [(1, None, 2.5), (3, 1.5, 2.5)]
    assert [(json.loads(r["raw_record"])["id"], r["reason"], r["column"]) for r in run.rejects] == [
        ("2", "missing_value", "must")
    ]


@pytest.mark.parametrize(
    "name, clean_rows, rejected",
    [
        ("latin1_read_as_utf8", [(2, "plain")], [("1", "invalid_encoding", "name")]),
        ("latin1_declared", [(1, "café"), (2, "plain")], []),
    ],
    ids=["read_as_utf8", "declared"],
)
def test_latin1_bytes_are_invalid_unless_the_encoding_says_so(cleaned, name, clean_rows, rejected):
    run = cleaned(name)
    assert picked(run.clean, ["id", "name"]) == clean_rows
    got = [(json.loads(r["raw_record"])["id"], r["reason"], r["column"]) for r in run.rejects]
    assert got == rejected


def test_crlf_line_endings_leave_no_carriage_return(cleaned):
    run = cleaned("crlf")
    assert picked(run.clean, ["id", "name", "qty"]) == [(1, "a", 5), (2, "b", 6)]
    assert run.rejects == []


def test_conflicting_keys_reject_every_row_of_the_key(cleaned):
    run = cleaned("duplicate_keys")
    # The exact repeat of S,1 is a duplicate_row, not a conflict: one copy stays clean.
    assert picked(run.clean, ["region", "code", "value"]) == [("N", 2, 1.0), ("S", 1, 1.0)]
    got = sorted(
        (r["reason"], r["column"], json.loads(r["raw_record"])["value"]) for r in run.rejects
    )
    assert got == [
        ("duplicate_key", "region,code", "1.0"),
        ("duplicate_key", "region,code", "2.0"),
        ("duplicate_row", None, "1.0"),
    ]


def test_json_lines_reject_the_malformed_line_and_type_the_rest(cleaned):
    run = cleaned("json_lines")
    assert picked(run.clean, ["id", "name", "score"]) == [
        (1, "Ann", 1.5),
        (2, "Bob", 2.5),
        (4, "Di", 4.0),
    ]
    assert [(r["reason"], r["column"], r["raw_record"]) for r in run.rejects] == [
        ("malformed_record", None, '{"id": 3, "Full Name": "Cy", "score":}')
    ]


# --- every fixture that succeeds -------------------------------------------------------


@pytest.mark.parametrize("name", list(FIXTURES))
def test_every_row_is_accounted_for(cleaned, name):
    run = cleaned(name)
    report = run.quality["sources"][SOURCE]
    if FIXTURES[name].rows_in is not None:
        assert report["rows_in"] == FIXTURES[name].rows_in
    assert report["rows_in"] == report["clean"] + report["rejected"]
    assert run.quality["reconciled"] is True
    assert run.quality == read_json(run.run_dir.quality)

    assert len(run.rejects) == report["rejected"]
    assert Counter(r["reason"] for r in run.rejects) == report["rejected_by_reason"]
    by_column = Counter(
        f"{r['reason']}:{r['column']}" for r in run.rejects if r["column"] is not None
    )
    assert by_column == report["rejected_by_column"]
    assert len(run.clean) == run.clean_count_one_column == report["clean"]


# --- inputs unusable as a whole ----------------------------------------------------------


@pytest.mark.parametrize("name", list(REFUSED))
def test_unusable_input_is_refused_naming_file_and_column(cleaned, name):
    run = cleaned(name)
    pattern = REFUSED[name][1].format(path=re.escape(run.path))
    assert run.error is not None, f"clean accepted {name}: {run.quality}"
    assert re.search(pattern, str(run.error)), str(run.error)


@pytest.mark.parametrize("name, n_rejected", [("all_rejected", 2), ("share_above_ceiling", 1)])
def test_a_refused_source_still_writes_quality_and_rejects(cleaned, name, n_rejected):
    run = cleaned(name)
    assert run.error is not None
    assert run.run_dir.quality.exists(), f"no {run.run_dir.quality} after: {run.error}"
    assert read_json(run.run_dir.quality)["sources"][SOURCE]["rejected"] == n_rejected
    assert len(run.rejects) == n_rejected


def test_a_parquet_folder_is_checked_file_by_file(spark, tmp_path):
    """Spark takes one file's schema for the folder and would read the other's missing
    column as nulls."""
    run_dir = RunDir.at(tmp_path)
    folder = run_dir.raw / "rows"
    folder.mkdir(parents=True)
    pq.write_table(pa.table({"id": [1, 2], "amount": [1.0, 2.0]}), folder / "a.parquet")
    pq.write_table(pa.table({"id": [3, 4]}), folder / "b.parquet")
    fx = Fixture(
        raw={},
        columns={"id": "long", "amount": "double"},
        source={"format": "parquet", "options": {}},
        file="rows",
    )
    with pytest.raises(DataError, match=r"b\.parquet has no column\(s\) \['amount'\]"):
        clean(spark, config_of(fx), run_dir)


def test_json_fields_outside_the_config_are_reported(spark, tmp_path):
    fx = Fixture(
        raw='{"id": 1, "score": 1.5}\n{"id": 2, "scor": 2.5}\n{"id": 3, "score": 3.5}\n',
        columns={"id": "int", "score": "double"},
        source={"format": "json", "options": {}},
        file="rows.jsonl",
    )
    run = run_clean(spark, tmp_path, fx)
    assert run.quality["sources"][SOURCE]["unconfigured_fields"] == {"scor": 1}


def test_wide_inputs_clean(spark, tmp_path):
    """Wide inputs pass the row checks (one check per column used to nest one level deeper)."""
    width = 200
    header = ",".join(["id", *[f"x{i}" for i in range(width)]])
    lines = [",".join([str(r), *[str(r * i % 7) for i in range(width)]]) for r in range(1, 6)]
    lines.append(",".join(["6", "oops", *["1"] * (width - 1)]))
    columns = {"id": "int", **{f"x{i}": "double" for i in range(width)}}
    run = run_clean(
        spark, tmp_path, Fixture(raw="\n".join([header, *lines]) + "\n", columns=columns)
    )
    assert run.quality["clean"] == 5
    assert run.quality["sources"][SOURCE]["rejected_by_column"] == {"unparseable_value:x0": 1}
