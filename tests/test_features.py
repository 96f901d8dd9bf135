"""Features + PCA on a synthetic cleaned table whose structure is known."""

import dataclasses

import numpy as np
import pytest
from pyspark.ml import PipelineModel
from pyspark.sql import functions as F

from conftest import mark_clean_finished, synthetic_clean, synthetic_config
from sparknet.config import ColumnConfig, ImputeConfig, SplitConfig
from sparknet.errors import DataError, RunDirError
from sparknet.features import fit_and_project, split_column
from sparknet.pca import choose_k
from sparknet.run_dir import RunDir, read_json


@pytest.mark.parametrize("target, k", [(0.5, 1), (0.8, 2), (0.95, 3), (0.951, 4), (1.0, 4)])
def test_choose_k_is_the_fewest_components_reaching_the_target(target, k):
    assert choose_k(np.array([0.5, 0.3, 0.15, 0.05]), target) == k


def test_split_is_a_stable_hash_of_the_key(spark):
    df = spark.range(20_000).withColumnRenamed("id", "key")
    split = SplitConfig(key=["key"], validation=0.1, test=0.2, seed=3)
    first = {r["key"]: r["split"] for r in df.withColumn("split", split_column(split)).collect()}
    again = {
        r["key"]: r["split"]
        for r in df.repartition(7).withColumn("split", split_column(split)).collect()
    }
    assert first == again
    shares = {
        s: sum(v == s for v in first.values()) / 20_000 for s in ("train", "validation", "test")
    }
    assert shares["train"] == pytest.approx(0.7, abs=0.02)
    assert shares["validation"] == pytest.approx(0.1, abs=0.01)
    assert shares["test"] == pytest.approx(0.2, abs=0.015)
    other_seed = SplitConfig(key=["key"], validation=0.1, test=0.2, seed=4)
    moved = df.withColumn("split", split_column(other_seed)).collect()
    assert sum(first[r["key"]] != r["split"] for r in moved) > 1_000


def test_pca_keeps_the_target_variance_and_is_fit_on_train_only(spark, tmp_path):
    run_dir = RunDir.at(tmp_path)
    synthetic_clean(spark, run_dir.clean)
    report = fit_and_project(spark, synthetic_config(), run_dir)

    assert report == read_json(run_dir.pca)
    ratios = np.array(report["explained_variance_ratio_all"])
    assert report["n_features_in"] == 4 + 3  # 4 numeric + one slot per training category
    assert ratios.sum() == pytest.approx(1.0, abs=1e-9)
    assert report["k"] == choose_k(ratios, 0.95)
    assert report["variance_kept"] >= 0.95
    assert report["k"] < report["n_features_in"]
    # x3 = x1 + x2 adds no dimension: the last component explains nothing.
    assert ratios[-1] < 1e-9
    assert any(name.startswith("cat") for name in report["feature_names"])

    train = (
        spark.read.parquet(str(run_dir.clean))
        .withColumn("split", split_column(synthetic_config().split))
        .filter("split = 'train'")
    )
    # The fill value is the train split's median (exact at this size), saved in the
    # pipeline's first stage and reported.
    train_median = train.approxQuantile("x4", [0.5], 0.0)[0]
    x4 = read_json(run_dir.feature_quality)["columns"]["x4"]
    assert x4["impute"] == "median" and x4["fill"] == train_median
    assert x4["missing_in_train"] == train.filter("x4 IS NULL").count()
    model = PipelineModel.load(str(run_dir.feature_pipeline))
    assert f"CAST('{train_median!r}' AS DOUBLE)" in model.stages[0].getStatement()
    assert report["fitted_on"]["rows"] == train.count()

    features = spark.read.parquet(str(run_dir.features))
    assert features.count() == 3_000
    assert {r["split"] for r in features.select("split").distinct().collect()} == {
        "train",
        "validation",
        "test",
    }
    first = features.select("pca").first()["pca"]
    assert len(first) == report["k"] and np.all(np.isfinite(first.toArray()))


def test_unseen_category_and_missing_values_score(spark, tmp_path):
    run_dir = RunDir.at(tmp_path)
    synthetic_clean(spark, run_dir.clean)
    fit_and_project(spark, synthetic_config(), run_dir)
    model = PipelineModel.load(str(run_dir.feature_pipeline))
    new = spark.createDataFrame(
        [(1.0, 2.0, None, None, "never-seen"), (None, None, None, None, None)],
        "x1 double, x2 double, x3 double, x4 double, cat string",
    )
    out = model.transform(new).select("pca").collect()
    assert all(np.all(np.isfinite(r["pca"].toArray())) for r in out)


def test_all_null_and_constant_columns_are_dropped_with_the_reason(spark, tmp_path):
    run_dir = RunDir.at(tmp_path)
    base = synthetic_clean(spark, tmp_path / "base")
    base.withColumn("x_null", F.lit(None).cast("double")).withColumn(
        "x_const", F.lit(3.0)
    ).write.parquet(str(run_dir.clean))
    mark_clean_finished(run_dir.clean)
    config = synthetic_config()
    data_features = {
        "numeric": ["x1", "x2", "x3", "x4", "x_null", "x_const"],
        "categorical": ["cat"],
    }
    config = dataclasses.replace(
        config,
        sources={
            "rows": dataclasses.replace(
                config.sources["rows"],
                columns={
                    **config.sources["rows"].columns,
                    "x_null": ColumnConfig("double"),
                    "x_const": ColumnConfig("double"),
                },
            )
        },
        features=dataclasses.replace(config.features, **data_features),
    )
    report = fit_and_project(spark, config, run_dir)
    assert report["dropped_features"] == {"x_null": "all null", "x_const": "constant"}
    assert not any(name.startswith(("x_null", "x_const")) for name in report["feature_names"])
    first = spark.read.parquet(str(run_dir.features)).select("pca").first()["pca"]
    assert np.all(np.isfinite(first.toArray()))


def _projected_vectors(df, model):
    out = model.transform(df).select("assembled", "scaled", "pca").collect()
    return [np.concatenate([r[c].toArray() for c in ("assembled", "scaled", "pca")]) for r in out]


def test_nothing_non_finite_reaches_the_vectors(spark, tmp_path):
    """Derived expressions can turn clean values into NaN, inf or null; scoring rows can
    hold nulls, NaN, inf and categories never seen. None of it may reach the vectors."""
    run_dir = RunDir.at(tmp_path)
    synthetic_clean(spark, run_dir.clean)
    config = synthetic_config()
    derived = {
        # NaN for negative x1, null where x4 is null, +inf where x4 == 0.
        "root_x1": "sqrt(x1)",
        "inv_x4": "CASE WHEN x4 = 0 THEN double('inf') ELSE 1 / x4 END",
    }
    config = dataclasses.replace(
        config,
        features=dataclasses.replace(
            config.features,
            numeric=[*config.features.numeric, *derived],
            derived=derived,
        ),
    )
    fit_and_project(spark, config, run_dir)
    for split in ("train", "validation", "test"):
        projected = spark.read.parquet(str(run_dir.features)).filter(F.col("split") == split)
        vectors = np.stack([r["pca"].toArray() for r in projected.collect()])
        assert np.isfinite(vectors).all(), split

    quality = read_json(run_dir.feature_quality)["columns"]
    clean = spark.read.parquet(str(run_dir.clean))
    # Every row's NaN or inf, in every split, was counted as filled.
    assert quality["root_x1"]["filled"] == clean.filter("x1 < 0").count()
    assert quality["inv_x4"]["filled"] == clean.filter("x4 IS NULL OR x4 = 0").count()

    model = PipelineModel.load(str(run_dir.feature_pipeline))
    nasty = spark.createDataFrame(
        [
            (float("nan"), float("inf"), None, float("-inf"), "never-seen", -4.0, float("nan")),
            (None, None, None, None, None, None, None),
            (1e308, -1e308, 1e308, 0.0, "a", float("inf"), 0.0),
        ],
        "x1 double, x2 double, x3 double, x4 double, cat string, root_x1 double, inv_x4 double",
    )
    assert all(np.isfinite(v).all() for v in _projected_vectors(nasty, model))


def test_fill_strategies_and_clipping_are_fitted_on_train(spark, tmp_path):
    run_dir = RunDir.at(tmp_path)
    synthetic_clean(spark, run_dir.clean)
    config = synthetic_config()
    config = dataclasses.replace(
        config,
        features=dataclasses.replace(
            config.features,
            impute="mean",
            impute_columns={
                "x4": ImputeConfig("constant", "-1"),
                "x2": ImputeConfig("mode"),
                "cat": ImputeConfig("constant", "missing"),
            },
            clip={"x1": [0.05, 0.95]},
        ),
    )
    fit_and_project(spark, config, run_dir)
    train = (
        spark.read.parquet(str(run_dir.clean))
        .withColumn("split", split_column(config.split))
        .filter("split = 'train'")
    )
    low, high = train.approxQuantile("x1", [0.05, 0.95], 0.0)
    columns = read_json(run_dir.feature_quality)["columns"]
    assert columns["x1"]["clip_bounds"] == [low, high]
    # The mean is of the values as clipped.
    clipped_mean = train.select(F.avg(F.least(F.greatest("x1", F.lit(low)), F.lit(high)))).first()[
        0
    ]
    assert columns["x1"]["fill"] == pytest.approx(clipped_mean, rel=1e-12)
    everything = spark.read.parquet(str(run_dir.clean))
    assert (
        columns["x1"]["clipped"]
        == everything.filter((F.col("x1") < low) | (F.col("x1") > high)).count()
    )
    assert columns["x4"]["fill"] == -1.0 and columns["x4"]["impute"] == "constant"
    assert columns["x3"]["impute"] == "mean"
    assert columns["cat"]["fill"] == "missing"

    model = PipelineModel.load(str(run_dir.feature_pipeline))
    rows = spark.createDataFrame(
        [(100.0, 0.0, 0.0, None, None), (-100.0, 0.0, 0.0, 2.0, "b")],
        "x1 double, x2 double, x3 double, x4 double, cat string",
    )
    ready = model.stages[0].transform(rows).collect()
    assert [r["x1__ready"] for r in ready] == [high, low]
    assert [r["x4__ready"] for r in ready] == [-1.0, 2.0]
    assert [r["cat__ready"] for r in ready] == ["missing", "b"]


def test_features_refuse_a_clean_stage_that_did_not_finish(spark, tmp_path):
    run_dir = RunDir.at(tmp_path)
    synthetic_clean(spark, run_dir.clean)
    # Killed after writing clean/ but before reconciling it: quality.json says nothing.
    run_dir.quality.write_text("{}\n")
    with pytest.raises(RunDirError, match="does not record a finished clean stage"):
        fit_and_project(spark, synthetic_config(), run_dir)


def test_a_derived_expression_failing_on_a_row_names_the_key(spark, tmp_path):
    run_dir = RunDir.at(tmp_path)
    synthetic_clean(spark, run_dir.clean)
    config = synthetic_config()
    derived = {"ratio": "x1 / (id - id)"}  # ANSI: DIVIDE_BY_ZERO on every row
    config = dataclasses.replace(
        config,
        features=dataclasses.replace(
            config.features, numeric=[*config.features.numeric, "ratio"], derived=derived
        ),
    )
    with pytest.raises(DataError, match=r"features.derived: .*DIVIDE_BY_ZERO.*try_divide"):
        fit_and_project(spark, config, run_dir)
