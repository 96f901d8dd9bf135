"""Features + PCA on a synthetic cleaned table whose structure is known."""

import dataclasses

import numpy as np
import pytest
from pyspark.ml import PipelineModel
from pyspark.sql import functions as F

from conftest import synthetic_clean, synthetic_config
from sparknet.config import ColumnConfig, SplitConfig
from sparknet.features import choose_k, fit_and_project, split_column
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

    model = PipelineModel.load(str(run_dir.feature_pipeline))
    imputer = model.stages[0]
    train = (
        spark.read.parquet(str(run_dir.clean))
        .withColumn("split", split_column(synthetic_config().split))
        .filter("split = 'train'")
    )
    train_median = train.approxQuantile("x4", [0.5], 0.0)[0]
    assert imputer.surrogateDF.first()["x4"] == train_median
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
