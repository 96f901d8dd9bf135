"""Clean on a hand-made dirty fixture where every row's fate is known in advance."""

import json

import pytest
from pyspark.sql import functions as F

from sparknet.clean import clean
from sparknet.config import config_from_dict
from sparknet.errors import DataError
from sparknet.run_dir import RunDir, read_json

TRIPS = """id,city,km,late_min,day
1,A,10.5,20,2024-01-01
2,B,3,0,2024-01-02
3,A,abc,5,2024-01-03
4,B,7,NA,2024-01-04
5,,7,3,2024-01-05
2,B,3,0,2024-01-02
6,A,1,2
7,A,1,2,2024-01-07,extra
8,C,2,30,2024-13-45
9,Z,4,1,2024-01-09
10,C,2.5,16,2024-01-10
11,A,NaN,3,2024-01-11
12,B,-Infinity,3,2024-01-12
13,B,-5,3,2024-01-13
"""

CITIES = """city,pop
A,100
B,200
A,150
C,x
"""

EXPECTED_REASONS = {
    "unparseable_value": 2,  # km=abc, day=2024-13-45
    "missing_label": 1,
    "missing_value": 1,
    "duplicate_row": 1,
    "wrong_field_count": 2,  # too few and too many fields
    "non_finite_value": 2,  # km=NaN, km=-Infinity
    "out_of_range": 1,  # km=-5 below its min of 0
}


def trips_config(**overrides) -> dict:
    data = {
        "name": "trips",
        "sources": {
            "trips": {
                "path": "trips.csv",
                "options": {"header": "true", "nullValue": "NA"},
                "columns": {
                    "id": {"type": "int", "nullable": False},
                    "city": {"type": "string", "nullable": False},
                    "km": {"type": "double", "min": 0},
                    "late_min": "double",
                    "day": "date",
                },
                "max_reject_share": 1.0,  # the fixture is mostly bad on purpose
            },
            "cities": {
                "path": "cities.csv",
                "options": {"header": "true"},
                "columns": {"city": "string", "pop": "int"},
                "key": ["city"],
                "max_reject_share": 1.0,
            },
        },
        "main": "trips",
        "joins": [{"source": "cities", "on": ["city"], "select": {"pop": "city_pop"}}],
        "label": {"name": "late", "expr": "late_min > 15", "requires": ["late_min"]},
        "features": {"numeric": ["km", "city_pop"], "categorical": ["city"]},
        "split": {"key": ["id"]},
    }
    data.update(overrides)
    return data


def write_raw(run_dir: RunDir, trips: str = TRIPS, cities: str = CITIES) -> None:
    run_dir.raw.mkdir(parents=True, exist_ok=True)
    (run_dir.raw / "trips.csv").write_text(trips)
    (run_dir.raw / "cities.csv").write_text(cities)


@pytest.fixture()
def cleaned(spark, tmp_path):
    run_dir = RunDir.at(tmp_path)
    write_raw(run_dir)
    quality = clean(spark, config_from_dict(trips_config()), run_dir)
    return run_dir, quality


def test_every_row_is_accounted_for(cleaned):
    run_dir, quality = cleaned
    assert quality == read_json(run_dir.quality)
    trips = quality["sources"]["trips"]
    assert trips["rows_in"] == 14
    assert trips["rejected_by_reason"] == EXPECTED_REASONS
    assert trips["clean"] == 4 and trips["rejected"] == 10
    assert quality["rows_in"] == quality["clean"] + quality["rejected"]
    assert quality["reconciled"] is True

    cities = quality["sources"]["cities"]
    # A appears twice with different populations: neither can be trusted.
    assert cities["rejected_by_reason"] == {"duplicate_key": 2, "unparseable_value": 1}
    assert cities["clean"] == 1


def test_clean_rows_are_typed_labelled_and_joined(spark, cleaned):
    run_dir, _ = cleaned
    rows = {r["id"]: r for r in spark.read.parquet(str(run_dir.clean)).collect()}
    assert sorted(rows) == [1, 2, 9, 10]
    assert rows[1]["late"] == 1.0 and rows[2]["late"] == 0.0 and rows[10]["late"] == 1.0
    assert rows[1]["km"] == 10.5 and str(rows[1]["day"]) == "2024-01-01"
    # A's two conflicting rows were rejected and C's was unparseable: only B joins.
    assert rows[2]["city_pop"] == 200
    assert rows[1]["city_pop"] is None and rows[9]["city_pop"] is None
    assert rows[10]["city_pop"] is None
    assert run_dir.quality.exists()
    joins = read_json(run_dir.quality)["joins"]["cities"]
    assert joins == {"on": ["city"], "matched": 1, "unmatched": 3}


def test_rejects_carry_file_raw_record_and_reason(spark, cleaned):
    run_dir, quality = cleaned
    rejects = spark.read.parquet(str(run_dir.rejects))
    assert rejects.count() == sum(s["rejected"] for s in quality["sources"].values())
    by_reason = {
        (r["source"], r["reason"], r["column"]): r
        for r in rejects.filter(F.col("source") == "trips").collect()
    }
    bad_km = by_reason[("trips", "unparseable_value", "km")]
    assert json.loads(bad_km["raw_record"])["km"] == "abc"
    assert bad_km["source_file"].endswith("trips.csv")
    assert ("trips", "unparseable_value", "day") in by_reason
    assert ("trips", "missing_value", "city") in by_reason
    malformed = rejects.filter(F.col("reason") == "wrong_field_count").collect()
    assert sorted(r["raw_record"] for r in malformed) == ["6,A,1,2", "7,A,1,2,2024-01-07,extra"]


def test_counts_do_not_depend_on_the_columns_read(spark, cleaned):
    run_dir, quality = cleaned
    clean_df = spark.read.parquet(str(run_dir.clean))
    assert clean_df.select("id").count() == clean_df.count() == quality["clean"]


@pytest.mark.parametrize(
    "trips, message",
    [
        ("", "trips.csv is empty; expected a header line"),
        ("id,city,km,late_min,day\n", "has no data rows"),
        (
            "id,city,km,day\n1,A,2,2024-01-01\n",
            "header does not match sources.trips.columns: "
            r"missing \['late_min'\]",
        ),
        ("id,km,city,late_min,day\n1,2,A,3,2024-01-01\n", "same columns in another order"),
        (
            "id,city,km,late_min,day\nx,A,1,1,2024-01-01\n,B,1,1,2024-01-01\n",
            "all 2 rows of .*trips.csv were rejected",
        ),
    ],
)
def test_unusable_input_fails_with_the_file_and_column(spark, tmp_path, trips, message):
    run_dir = RunDir.at(tmp_path)
    write_raw(run_dir, trips=trips)
    with pytest.raises(DataError, match=message):
        clean(spark, config_from_dict(trips_config()), run_dir)


def test_missing_input_file(spark, tmp_path):
    run_dir = RunDir.at(tmp_path)
    run_dir.raw.mkdir()
    with pytest.raises(DataError, match="sources.trips: input .*trips.csv does not exist"):
        clean(spark, config_from_dict(trips_config()), run_dir)


def test_reject_share_above_the_ceiling_fails_after_writing_the_evidence(spark, tmp_path):
    run_dir = RunDir.at(tmp_path)
    write_raw(run_dir)
    data = trips_config()
    data["sources"]["trips"]["max_reject_share"] = 0.5
    with pytest.raises(
        DataError, match=r"sources.trips: 71.4% of the 14 rows .*trips.max_reject_share=0.5"
    ):
        clean(spark, config_from_dict(data), run_dir)
    assert read_json(run_dir.quality)["sources"]["trips"]["rejected"] == 10
    assert spark.read.parquet(str(run_dir.rejects)).count() == 13
    assert not run_dir.clean.exists()  # a refused output must not feed the next stage


def test_bad_label_expression_names_the_key(spark, tmp_path):
    run_dir = RunDir.at(tmp_path)
    write_raw(run_dir)
    data = trips_config()
    data["label"]["expr"] = "late_minutes > 15"
    with pytest.raises(
        DataError, match=r"label.expr: cannot evaluate 'late_minutes > 15'.*late_minutes"
    ):
        clean(spark, config_from_dict(data), run_dir)


def test_every_file_of_a_folder_source_is_checked(spark, tmp_path):
    """Spark maps fields by position: a second file with swapped columns must be refused,
    not read with its values under the wrong names."""
    run_dir = RunDir.at(tmp_path)
    write_raw(run_dir)
    folder = run_dir.raw / "trips"
    folder.mkdir()
    (folder / "part-1.csv").write_text(TRIPS)
    lines = TRIPS.splitlines()
    (folder / "part-2.csv").write_text("id,city,late_min,km,day\n" + "\n".join(lines[1:3]) + "\n")
    data = trips_config()
    data["sources"]["trips"]["path"] = "trips"
    with pytest.raises(DataError, match=r"part-2.csv header does not match .* another order"):
        clean(spark, config_from_dict(data), run_dir)


def test_gzipped_and_globbed_sources_are_read(spark, tmp_path):
    import gzip

    run_dir = RunDir.at(tmp_path)
    write_raw(run_dir)
    with gzip.open(run_dir.raw / "trips-a.csv.gz", "wt") as fh:
        fh.write(TRIPS)
    data = trips_config()
    data["sources"]["trips"]["path"] = str(run_dir.raw / "trips-*.csv.gz")
    quality = clean(spark, config_from_dict(data), run_dir)
    assert quality["sources"]["trips"]["rows_in"] == 14


def test_quality_profiles_every_clean_column(cleaned):
    _, quality = cleaned
    columns = quality["columns"]
    assert list(columns) == ["id", "city", "km", "late_min", "day", "city_pop", "late"]
    assert columns["km"] == {
        "type": "double",
        "nulls": 0,
        "min": 2.5,
        "max": 10.5,
        "mean": 5.0,
        "stddev": pytest.approx(3.22102, abs=1e-5),
    }
    assert columns["city"] == {"type": "string", "nulls": 0, "distinct": 4, "line_breaks": 0}
    assert columns["city_pop"]["nulls"] == 3 and columns["city_pop"]["min"] == 200
    assert (columns["day"]["min"], columns["day"]["max"]) == ("2024-01-01", "2024-01-10")
    assert quality["label"] == {"name": "late", "task": "binary", "positive_share": 0.5}
