"""Target encoding against an independent pandas computation, on a small table with one
informative categorical (`cat`, 40 categories) and one of pure noise (`noise`, ~2,000
categories of a few rows each)."""

import copy
import math

import numpy as np
import pandas as pd
import pytest
from pyspark.ml import PipelineModel
from pyspark.sql import functions as F
from sklearn.metrics import roc_auc_score

from conftest import mark_clean_finished, synthetic_config_dict
from sparknet.config import config_from_dict
from sparknet.errors import ConfigError
from sparknet.features import fit_and_project, split_column
from sparknet.run_dir import RunDir, read_json
from sparknet.target_encoding import fit_target_encoding, fold_column

N_ROWS = 8_000
STRENGTH = 4.0
FOLDS = 3


def encoded_config_dict(label=None) -> dict:
    data = synthetic_config_dict(label=label)
    data["sources"]["rows"]["columns"] = {
        "id": "long",
        "x1": "double",
        "cat": "string",
        "noise": "string",
        "y_raw": "double",
    }
    data["features"] = {
        "numeric": ["x1"],
        "target_encoded": ["cat", "noise"],
        "target_encoding": {"strength": STRENGTH, "folds": FOLDS, "pca": True},
    }
    data["split"]["seed"] = 5
    return data


def encoded_rows(n=N_ROWS, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    effect = rng.normal(scale=1.5, size=40)
    cat_index = rng.integers(0, 40, size=n)
    x1 = rng.normal(size=n)
    y = (rng.random(n) < 1 / (1 + np.exp(-(x1 + effect[cat_index] - 1.0)))).astype(float)
    cat = np.array([f"c{i:02d}" for i in cat_index], dtype=object)
    cat[::50] = None  # missing: encoded with the prior
    return pd.DataFrame(
        {
            "id": np.arange(n, dtype=np.int64),
            "x1": x1,
            "cat": cat,
            "noise": [f"n{i}" for i in rng.integers(0, 2_000, size=n)],
            "y_raw": y,
            "y": y,
        }
    )


def to_spark(spark, rows: pd.DataFrame):
    schema = "id long, x1 double, cat string, noise string, y_raw double, y double"
    columns = ["id", "x1", "cat", "noise", "y_raw", "y"]
    return spark.createDataFrame(rows[columns], schema)


def with_split_and_fold(spark, rows: pd.DataFrame, config) -> pd.DataFrame:
    """The rows with Spark's split and fold assignment: the only inputs taken from the
    code under test."""
    df = to_spark(spark, rows)
    df = df.withColumn("split", split_column(config.split)).withColumn("fold", fold_column(config))
    return df.toPandas()


def pandas_m_estimate(train: pd.DataFrame, column: str, target: str, m: float):
    """(category -> encoding, prior) from `train` alone."""
    prior = train[target].mean()
    grouped = train.dropna(subset=[column]).groupby(column)[target].agg(["sum", "count"])
    table = (grouped["sum"] + m * prior) / (grouped["count"] + m)
    return table.to_dict(), prior


def pandas_out_of_fold(train: pd.DataFrame, column: str, target: str, m: float) -> pd.Series:
    """Each train row encoded from the rows of the other folds only."""
    out = pd.Series(np.nan, index=train.index)
    for fold in sorted(train["fold"].unique()):
        inside = train["fold"] == fold
        table, prior = pandas_m_estimate(train[~inside], column, target, m)
        out[inside] = train.loc[inside, column].map(table).fillna(prior)
    return out


@pytest.fixture(scope="module")
def encoded_run(spark, tmp_path_factory):
    """One features stage on the encoded table: (run dir, config, rows with split/fold)."""
    run_dir = RunDir.at(tmp_path_factory.mktemp("encoded"))
    rows = encoded_rows()
    to_spark(spark, rows).write.parquet(str(run_dir.clean))
    mark_clean_finished(run_dir.clean)
    config = config_from_dict(encoded_config_dict())
    fit_and_project(spark, config, run_dir)
    return run_dir, config, with_split_and_fold(spark, rows, config)


def test_train_rows_get_the_out_of_fold_encoding(spark, encoded_run):
    _, config, rows = encoded_run
    train = rows[rows["split"] == "train"].copy()
    # Folds are a hash of the key: near-equal, and not the split's buckets again.
    sizes = train["fold"].value_counts()
    assert sorted(sizes.index) == list(range(FOLDS))
    assert sizes.min() > 0.9 * len(train) / FOLDS

    train_df = to_spark(spark, rows[rows["split"] == "train"])
    _, encoded = fit_target_encoding(spark, train_df, ["cat", "noise"], config)
    got = encoded.select("id", "cat__te", "noise__te").toPandas().set_index("id")

    train = train.set_index("id")
    for column in ("cat", "noise"):
        expected = pandas_out_of_fold(train, column, "y", STRENGTH)
        np.testing.assert_allclose(
            got.loc[train.index, f"{column}__te"], expected, rtol=1e-12, atol=1e-12
        )
    # Out of fold is not the full-train encoding (which would include the row's own label).
    table, _ = pandas_m_estimate(train, "cat", "y", STRENGTH)
    assert not np.allclose(got.loc[train.index, "cat__te"], train["cat"].map(table).fillna(0))


def test_scoring_rows_get_the_full_train_encoding_and_unseen_the_prior(spark, encoded_run):
    run_dir, _, rows = encoded_run
    train = rows[rows["split"] == "train"]
    model = PipelineModel.load(str(run_dir.feature_pipeline))
    encode = model.stages[0]

    scored = rows[rows["split"] != "train"]
    df = to_spark(spark, scored)
    got = encode.transform(df).select("id", "cat__te", "noise__te").toPandas().set_index("id")
    for column in ("cat", "noise"):
        table, prior = pandas_m_estimate(train, column, "y", STRENGTH)
        expected = scored.set_index("id")[column].map(table).fillna(prior)
        np.testing.assert_allclose(got[f"{column}__te"], expected.loc[got.index], rtol=1e-12)

    # With ~2,000 noise categories, some validation/test values were never seen in train.
    unseen = ~scored["noise"].isin(set(train["noise"]))
    assert unseen.sum() > 10
    _, noise_prior = pandas_m_estimate(train, "noise", "y", STRENGTH)
    ids = scored.loc[unseen, "id"]
    np.testing.assert_allclose(got.loc[ids, "noise__te"], noise_prior, rtol=1e-12)

    report = read_json(run_dir.feature_quality)["columns"]
    assert report["noise"]["kind"] == "target"
    assert report["noise"]["encoding"]["scored_with_prior"] == {
        "missing": 0,
        "unseen": int(unseen.sum()),
    }
    assert report["cat"]["encoding"]["scored_with_prior"]["missing"] == int(
        scored["cat"].isna().sum()
    )
    assert report["cat"]["encoding"]["strength"] == STRENGTH
    assert report["cat"]["encoding"]["folds"] == FOLDS
    assert report["cat"]["fill"] == pytest.approx(train["y"].mean(), rel=1e-12)


def test_the_saved_pipeline_reproduces_the_encoding_on_new_rows(spark, encoded_run):
    run_dir, _, rows = encoded_run
    train = rows[rows["split"] == "train"]
    table, prior = pandas_m_estimate(train, "cat", "y", STRENGTH)
    model = PipelineModel.load(str(run_dir.feature_pipeline))
    new = spark.createDataFrame(
        [(0.5, "c03", "n7"), (None, "never-seen", None), (1.0, None, "n1")],
        "x1 double, cat string, noise string",
    )
    out = model.transform(new).select("cat__te", "pca").collect()
    assert [r["cat__te"] for r in out] == pytest.approx([table["c03"], prior, prior], rel=1e-12)
    assert all(np.isfinite(r["pca"].toArray()).all() for r in out)

    # features/ holds exactly what the saved pipeline gives validation and test rows.
    features = spark.read.parquet(str(run_dir.features))
    validation = features.filter(F.col("split") == "validation").orderBy("id").toPandas()
    clean = spark.read.parquet(str(run_dir.clean))
    rescored = (
        model.transform(clean.filter(F.col("id").isin(validation["id"].tolist())))
        .orderBy("id")
        .toPandas()
    )
    np.testing.assert_allclose(
        np.stack([v.toArray() for v in validation["pca"]]),
        np.stack([v.toArray() for v in rescored["pca"]]),
        rtol=1e-12,
        atol=1e-12,
    )
    pca = read_json(run_dir.pca)
    assert {"x1", "cat__te", "noise__te"} <= set(pca["feature_names"])


def test_pure_noise_categories_do_not_look_predictive(spark, encoded_run):
    """The leak out-of-fold encoding exists for: ~4 train rows per noise category, so an
    encoding that includes the row's own label separates the train labels, and a model
    fitted on it would trust a column that says nothing on validation."""
    run_dir, config, rows = encoded_run
    train = rows[rows["split"] == "train"]
    validation = rows[rows["split"] == "validation"]
    encode = PipelineModel.load(str(run_dir.feature_pipeline)).stages[0]

    train_df = to_spark(spark, train)
    _, oof = fit_target_encoding(spark, train_df, ["noise"], config)
    oof = oof.select("y", "noise__te").toPandas()
    in_sample = encode.transform(train_df).select("y", "noise__te").toPandas()
    scored = encode.transform(to_spark(spark, validation))
    scored = scored.select("y", "noise__te").toPandas()

    leaky_auc = roc_auc_score(in_sample["y"], in_sample["noise__te"])
    assert leaky_auc > 0.7  # what the network would see without out-of-fold encoding
    assert roc_auc_score(oof["y"], oof["noise__te"]) == pytest.approx(0.5, abs=0.04)
    assert roc_auc_score(scored["y"], scored["noise__te"]) == pytest.approx(0.5, abs=0.06)
    # The informative column still informs on validation.
    cat = encode.transform(to_spark(spark, validation))
    cat = cat.select("y", "cat__te").toPandas()
    assert roc_auc_score(cat["y"], cat["cat__te"]) > 0.7


def test_encodings_can_skip_pca_and_follow_the_components(spark, tmp_path):
    run_dir = RunDir.at(tmp_path)
    rows = encoded_rows(n=2_000)
    to_spark(spark, rows).write.parquet(str(run_dir.clean))
    mark_clean_finished(run_dir.clean)
    data = encoded_config_dict()
    data["features"]["categorical"] = ["noise"]
    data["features"]["target_encoded"] = ["cat"]
    del data["features"]["target_encoding"]["pca"]  # the default: false
    report = fit_and_project(spark, config_from_dict(data), run_dir)

    assert "cat__te" not in report["feature_names"]
    assert report["appended_features"] == ["cat__te"]
    assert report["n_features_out"] == report["k"] + 1
    model = PipelineModel.load(str(run_dir.feature_pipeline))
    train = with_split_and_fold(spark, rows, config_from_dict(data))
    train = train[train["split"] == "train"]
    features = spark.read.parquet(str(run_dir.features)).filter(F.col("split") == "train")
    last = np.array([r["pca"].toArray()[-1] for r in features.select("pca").collect()])
    assert len(features.first()["pca"]) == report["k"] + 1
    # The appended value is the out-of-fold encoding standardised on the train split.
    assert last.mean() == pytest.approx(0.0, abs=1e-9)
    assert last.std(ddof=1) == pytest.approx(1.0, rel=1e-9)
    expected = pandas_out_of_fold(train, "cat", "y", STRENGTH)
    scored = features.select("id", "pca").toPandas().set_index("id").loc[train["id"]]
    got = np.array([v.toArray()[-1] for v in scored["pca"]])
    assert np.corrcoef(got, expected.to_numpy())[0, 1] == pytest.approx(1.0, abs=1e-12)
    new = spark.createDataFrame([(0.5, "c03", "n7")], "x1 double, cat string, noise string")
    assert len(model.transform(new).first()["pca"]) == report["k"] + 1


@pytest.mark.parametrize(
    "label, targets",
    [
        ({"task": "regression"}, ["y"]),
        ({"task": "multiclass", "classes": ["a", "b", "c"]}, ["is_0", "is_1", "is_2"]),
    ],
)
def test_regression_means_and_one_column_per_class(spark, label, targets):
    rng = np.random.default_rng(3)
    n = 1_500
    cat = rng.integers(0, 12, size=n)
    y = (cat % 3).astype(float) if label["task"] == "multiclass" else cat * 2.0 + rng.normal(size=n)
    if label["task"] == "multiclass":
        y = np.where(rng.random(n) < 0.3, rng.integers(0, 3, size=n), y).astype(float)
    rows = pd.DataFrame(
        {
            "id": np.arange(n, dtype=np.int64),
            "x1": rng.normal(size=n),
            "cat": [f"c{i}" for i in cat],
            "noise": "n",
            "y_raw": y,
            "y": y,
        }
    )
    config = config_from_dict(encoded_config_dict(label))
    rows = with_split_and_fold(spark, rows, config)
    for i in range(3):
        rows[f"is_{i}"] = (rows["y"] == i).astype(float)
    train = rows[rows["split"] == "train"].set_index("id")

    train_df = to_spark(spark, train.reset_index())
    encodings, encoded = fit_target_encoding(spark, train_df, ["cat"], config)
    (enc,) = encodings
    assert len(enc.outputs) == len(targets)
    got = encoded.toPandas().set_index("id")
    for out, target in zip(enc.outputs, targets, strict=True):
        table, prior = pandas_m_estimate(train, "cat", target, STRENGTH)
        assert enc.table["c5"][enc.outputs.index(out)] == pytest.approx(table["c5"], rel=1e-12)
        expected = pandas_out_of_fold(train, "cat", target, STRENGTH)
        np.testing.assert_allclose(got.loc[train.index, out], expected, rtol=1e-12)
    if len(targets) > 1:
        # Each row's class shares, like the priors, sum to one.
        assert np.allclose(got[enc.outputs].sum(axis=1), 1.0)
        assert math.isclose(sum(enc.prior), 1.0)


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda f: f["target_encoded"].append("nope"),
            "features.target_encoded: 'nope' is neither a cleaned",
        ),
        (
            lambda f: f.update(categorical=["cat"]),
            r"features.target_encoded: \['cat'\] also listed in features.categorical",
        ),
        (
            lambda f: f["target_encoded"].append("x1"),
            r"features.target_encoded: \['x1'\] also listed in features.numeric",
        ),
        (
            lambda f: f["target_encoded"].append("cat"),
            r"features.target_encoded: \['cat'\] listed more than once",
        ),
        (
            lambda f: f["target_encoding"].update(strength=-1),
            "features.target_encoding.strength: must be a finite number >= 0",
        ),
        (
            lambda f: f["target_encoding"].update(strength=float("nan")),
            "features.target_encoding.strength: must be a finite number >= 0",
        ),
        (
            lambda f: f["target_encoding"].update(folds=1),
            r"features.target_encoding.folds: must be in \[2, 100\]",
        ),
        (
            lambda f: f["target_encoding"].update(fold=3),
            "features.target_encoding: unknown key",
        ),
        (
            lambda f: f.update(impute_columns={"cat": "mode"}),
            "features.impute_columns.cat: 'cat' is target-encoded",
        ),
        (
            lambda f: f.update(numeric=[], target_encoding={}),
            "features.target_encoding.pca: false needs a numeric or categorical feature",
        ),
        (
            lambda f: f["target_encoded"].append("y"),
            "features: 'y' is the label",
        ),
    ],
)
def test_bad_target_encoding_settings_name_the_key(edit, message):
    data = copy.deepcopy(encoded_config_dict())
    edit(data["features"])
    with pytest.raises(ConfigError, match=message):
        config_from_dict(data)
