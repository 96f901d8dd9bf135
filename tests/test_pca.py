"""PCA numerics with scikit-learn as the oracle: on the standardised real flight features,
on synthetic data whose spectrum is known, and on wide low-rank data (randomized path);
the sign rule; degenerate inputs."""

import dataclasses
import os

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image
from pyspark import StorageLevel
from pyspark.ml import PipelineModel
from pyspark.ml.feature import PCAModel
from pyspark.ml.functions import vector_to_array
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from scipy.linalg import subspace_angles
from sklearn.decomposition import PCA

from conftest import flights_config_dict, small_training, synthetic_clean, synthetic_config
from sparknet.clean import clean
from sparknet.config import PcaConfig, config_from_dict
from sparknet.errors import ConfigError, DataError
from sparknet.features import SPLIT, fit_and_project, prepared_table
from sparknet.pca import NEGLIGIBLE_SHARE, choose_k, fit_pca, fix_signs
from sparknet.run_dir import RunDir, read_json

# Shares at or below this are rounding on both sides; relative error means nothing there.
RATIO_FLOOR = 1e-10


def rows_frame(spark, x: np.ndarray, partitions: int = 2):
    """A DataFrame of one array<double> column, one row per row of `x`, cached: PCA reads
    it several times."""
    rdd = spark.sparkContext.parallelize([(row.tolist(),) for row in x], partitions)
    return spark.createDataFrame(rdd, "x array<double>").persist()


def names(d: int) -> list[str]:
    return [f"c{i}" for i in range(d)]


def cosines(ours: np.ndarray, theirs: np.ndarray) -> np.ndarray:
    """|cos| between matching columns of two (d × m) matrices."""
    return np.abs(np.sum(ours * theirs, axis=0)) / (
        np.linalg.norm(ours, axis=0) * np.linalg.norm(theirs, axis=0)
    )


def relative_error(ours: np.ndarray, theirs: np.ndarray) -> float:
    mask = theirs > RATIO_FLOOR
    return float(np.max(np.abs(ours[mask] - theirs[mask]) / theirs[mask]))


def aligned(projection: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """`projection` with each column's sign flipped to agree with `reference`."""
    return projection * np.sign(np.sum(projection * reference, axis=0))


@dataclasses.dataclass
class Flights:
    run_dir: RunDir
    report: dict
    model: PipelineModel
    rows: DataFrame  # the train split's standardised vectors, array<double>, cached
    scaled: np.ndarray  # the same, (n, d)
    projected: np.ndarray  # their saved projection, (n, k)
    oracle: PCA  # scikit-learn's full-SVD PCA on `scaled`


# --- the real flights --------------------------------------------------------------------


@pytest.fixture(scope="module")
def flights(spark, tmp_path_factory, flights_sample):
    """Clean + features on the flights sample once; the train split's standardised vectors
    (also as a cached DataFrame for refits) and their saved projection, row by row."""
    raw, _ = flights_sample
    run_dir = RunDir.at(tmp_path_factory.mktemp("pca_flights"))
    os.symlink(raw, run_dir.raw)
    data = small_training(flights_config_dict())
    data["ingest"] = {}
    # These checks are of the PCA stage alone, the pipeline's last; target encodings are
    # appended after it (tests/test_target_encoding.py covers them).
    data["features"].pop("target_encoded", None)
    data["features"].pop("target_encoding", None)
    config = config_from_dict(data, where="flights-sample")
    clean(spark, config, run_dir)
    report = fit_and_project(spark, config, run_dir)

    model = PipelineModel.load(str(run_dir.feature_pipeline))
    train = prepared_table(spark, config, run_dir).filter(F.col(SPLIT) == "train")
    vectors = (
        model.transform(train)
        .select(vector_to_array("scaled").alias("x"), vector_to_array("pca").alias("p"))
        .persist()
    )
    table = vectors.toPandas()
    scaled, projected = np.stack(table["x"]), np.stack(table["p"])
    oracle = PCA(svd_solver="full").fit(scaled)
    yield Flights(run_dir, report, model, vectors.select("x"), scaled, projected, oracle)
    vectors.unpersist()


def test_flights_explained_variance_matches_sklearn(flights):
    report, scaled, oracle = flights.report, flights.scaled, flights.oracle
    ours = np.array(report["explained_variance_ratio_all"])
    theirs = oracle.explained_variance_ratio_
    assert len(ours) == len(theirs) == scaled.shape[1] == report["n_features_in"]
    err = relative_error(ours, theirs)
    print(f"flights: max relative error of explained-variance ratios {err:.2e}")
    assert err < 1e-6
    # The components without variance (one-hot slots summing to 1, ...) agree as ~0.
    assert np.all(np.abs(ours[theirs <= RATIO_FLOOR]) < 1e-12)
    assert report["components_with_variance"] == np.count_nonzero(theirs > NEGLIGIBLE_SHARE)
    assert report["explained_variance"] == pytest.approx(oracle.explained_variance_[: report["k"]])
    print(
        f"flights: k = {report['k']} of {report['n_features_in']}, kept {report['variance_kept']}"
    )


def test_flights_saved_components_match_sklearn_up_to_sign(flights):
    report, oracle = flights.report, flights.oracle
    stage = flights.model.stages[-1]
    assert isinstance(stage, PCAModel) and stage.getK() == report["k"]
    components = stage.pc.toArray()  # (d, k), as saved and reloaded
    cos = cosines(components, oracle.components_[: report["k"]].T)
    print(f"flights: min |cosine| of the {report['k']} kept components {cos.min():.12f}")
    assert cos.min() >= 0.9999
    np.testing.assert_allclose(
        stage.explainedVariance.toArray(), report["explained_variance_ratio"], rtol=1e-12
    )


def test_flights_every_component_with_variance_matches_sklearn(flights):
    report, oracle = flights.report, flights.oracle
    fit = fit_pca(flights.rows, report["n_features_in"], PcaConfig(), report["feature_names"])
    carrying = fit.components_with_variance
    cos = cosines(fit.components[:, :carrying], oracle.components_[:carrying].T)
    print(f"flights: min |cosine| over all {carrying} components with variance {cos.min():.10f}")
    assert cos.min() >= 0.9999


def test_flights_projection_matches_sklearn_up_to_sign(flights):
    theirs = flights.oracle.transform(flights.scaled)[:, : flights.report["k"]]
    diff = np.abs(aligned(flights.projected, theirs) - theirs).max()
    largest = np.abs(theirs).max()
    print(f"flights: max |projection difference| {diff:.2e}, largest |projection| {largest:.1f}")
    assert diff < 1e-10 * largest


def test_flights_run_dir_has_report_and_scree_plot(flights):
    run_dir, report = flights.run_dir, flights.report
    assert report == read_json(run_dir.pca)
    assert report["method"] == "covariance" and report["k_from"] == "variance"
    assert report["variance_target"] == 0.95 and report["variance_target_reached"]
    assert report["variance_kept"] >= 0.95 > report["cumulative_explained_variance"][-2]
    assert report["scree_plot"] == "pca_scree.png"
    with Image.open(run_dir.pca_scree) as png:
        assert png.format == "PNG" and png.size == (800, 450)


def test_refit_on_reordered_rows_gives_the_same_projection(flights):
    """The sign rule: a second fit on the same rows in another order and partitioning has
    the same components, signs included, so it projects identically."""
    report, scaled = flights.report, flights.scaled
    shuffled = flights.rows.orderBy(F.rand(seed=5)).repartition(5).persist()
    again = fit_pca(shuffled, report["n_features_in"], PcaConfig(), report["feature_names"])
    shuffled.unpersist()
    saved = flights.model.stages[-1].pc.toArray()
    assert again.k == report["k"]
    np.testing.assert_allclose(again.kept_components, saved, atol=1e-10)
    np.testing.assert_allclose(scaled @ again.kept_components, flights.projected, atol=1e-9)


def test_sign_rule_is_stable_against_rounding_ties():
    v = np.array([[0.6, 0.5], [-0.6 - 1e-9, 0.5], [0.52915, 0.70711]])
    fixed = fix_signs(v)
    # Column 0: rows 0 and 1 tie within 1e-6; the first of them is made positive.
    assert fixed[0, 0] > 0 and fixed[1, 0] < 0
    assert np.array_equal(fix_signs(-v), fixed)
    assert fixed[2, 1] > 0


# --- synthetic data with a known spectrum ------------------------------------------------


def known_spectrum(n=2_000, d=12, seed=3):
    """Rows whose centred covariance has exactly eigenvalues `variances` along `basis`."""
    rng = np.random.default_rng(seed)
    variances = 4.0 * 0.5 ** np.arange(d)
    basis = np.linalg.qr(rng.standard_normal((d, d)))[0]
    scores = rng.standard_normal((n, d))
    scores -= scores.mean(axis=0)
    scores = np.linalg.qr(scores)[0] * np.sqrt((n - 1) * variances)  # orthogonal, centred
    x = scores @ basis.T + rng.normal(size=d) * 10  # an offset PCA must centre away
    return x, variances, basis


def test_known_spectrum_matches_truth_and_sklearn(spark):
    x, variances, basis = known_spectrum()
    d = x.shape[1]
    fit = fit_pca(rows_frame(spark, x, 3), d, PcaConfig(variance=1.0), names(d))
    oracle = PCA(svd_solver="full").fit(x)
    truth = variances / variances.sum()

    ours = fit.explained_variance_ratio
    assert relative_error(ours, truth) < 1e-6
    assert relative_error(ours, oracle.explained_variance_ratio_) < 1e-6
    np.testing.assert_allclose(fit.explained_variance, variances, rtol=1e-6)
    assert cosines(fit.components, basis).min() >= 0.9999
    assert cosines(fit.components, oracle.components_.T).min() >= 0.9999
    assert fit.k == d  # target 1.0: every component carries variance here

    centred = x - x.mean(axis=0)
    theirs = oracle.transform(x)
    assert np.abs(aligned(centred @ fit.components, theirs) - theirs).max() < 1e-8


# --- the wide path -----------------------------------------------------------------------

WIDE_ROWS, WIDE_COLUMNS, WIDE_RANK = 3_000, 5_000, 10


def wide_row_generator(basis: np.ndarray, scale: np.ndarray, offset: np.ndarray, seed: int):
    """Row i = its rank-10 signal + 0.01 noise + offset, from a generator seeded by i, so
    Spark tasks and the driver build identical rows."""

    def row(i: int) -> np.ndarray:
        rng = np.random.default_rng([seed, i])
        return (
            (rng.standard_normal(len(scale)) * scale) @ basis.T
            + 0.01 * rng.standard_normal(len(offset))
            + offset
        )

    return row


@pytest.fixture(scope="module")
def wide(spark):
    rng = np.random.default_rng(11)
    d = WIDE_COLUMNS
    basis = np.linalg.qr(rng.standard_normal((d, WIDE_RANK)))[0]
    scale = np.linspace(20.0, 5.0, WIDE_RANK)
    row = wide_row_generator(basis, scale, rng.normal(size=d), seed=7)
    x = np.stack([row(i) for i in range(WIDE_ROWS)])

    def generate(batches):
        for batch in batches:
            ids = batch.column(0).to_numpy()
            values = np.stack([row(int(i)) for i in ids]) if len(ids) else np.zeros((0, d))
            offsets = pa.array(np.arange(len(ids) + 1, dtype=np.int32) * d)
            yield pa.RecordBatch.from_arrays(
                [pa.ListArray.from_arrays(offsets, pa.array(values.ravel()))], names=["x"]
            )

    rows = (
        spark.range(0, WIDE_ROWS, numPartitions=4)
        .mapInArrow(generate, "x array<double>")
        .persist(StorageLevel.MEMORY_AND_DISK)
    )
    assert rows.count() == WIDE_ROWS
    yield rows, x, basis
    rows.unpersist()


def test_wide_randomized_pca_matches_sklearn_randomized(wide):
    rows, x, basis = wide
    config = PcaConfig(k=WIDE_RANK)
    assert WIDE_COLUMNS > config.wide_threshold
    fit = fit_pca(rows, WIDE_COLUMNS, config, names(WIDE_COLUMNS))
    assert fit.method == "randomized" and fit.k == WIDE_RANK
    assert fit.components.shape == (WIDE_COLUMNS, WIDE_RANK + config.oversampling)

    oracle = PCA(n_components=WIDE_RANK, svd_solver="randomized", random_state=0).fit(x)
    angle = subspace_angles(fit.kept_components, oracle.components_.T).max()
    to_truth = subspace_angles(fit.kept_components, basis).max()
    err = relative_error(fit.explained_variance_ratio[: fit.k], oracle.explained_variance_ratio_)
    cos = cosines(fit.kept_components, oracle.components_.T)
    print(
        f"wide: largest subspace angle to sklearn {angle:.2e} rad, to the true basis "
        f"{to_truth:.2e} rad; max relative error of ratios {err:.2e}; min |cosine| {cos.min():.8f}"
    )
    assert angle < 1e-3
    assert err < 1e-6
    assert fit.report()["randomized"]["power_iterations"] == config.power_iterations


def test_wide_variance_target_not_reached_within_the_cap_is_reported(spark, caplog):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((200, 30))  # white: every component holds ~1/30
    config = PcaConfig(
        variance=0.9, wide_threshold=20, max_components=4, oversampling=2, power_iterations=1
    )
    fit = fit_pca(rows_frame(spark, x), 30, config, names(30))
    assert fit.method == "randomized" and fit.k == 4
    assert not fit.variance_target_reached
    assert "not reached within pca.max_components = 4" in fit.report()["warnings"][0]
    assert "not reached within pca.max_components" in caplog.text


def test_wide_path_in_the_pipeline_equals_the_standard_path(spark, tmp_path):
    """With width >= columns the randomized path computes every component, so its saved
    stage must hold the standard path's components, signs included. Also a fixed pca.k."""
    run_dir = RunDir.at(tmp_path)
    synthetic_clean(spark, run_dir.clean)
    config = dataclasses.replace(synthetic_config(), pca=PcaConfig(k=3, wide_threshold=4))
    report = fit_and_project(spark, config, run_dir)
    assert report["method"] == "randomized" and report["k"] == 3 and report["k_from"] == "k"
    assert report["variance_target"] is None and report["variance_target_reached"] is None

    model = PipelineModel.load(str(run_dir.feature_pipeline))
    train = prepared_table(spark, config, run_dir).filter(F.col(SPLIT) == "train")
    rows = model.transform(train).select(vector_to_array("scaled")).persist()
    d = report["n_features_in"]
    standard = fit_pca(rows, d, dataclasses.replace(config.pca, wide_threshold=2048), names(d))
    rows.unpersist()
    assert standard.method == "covariance" and standard.k == 3
    np.testing.assert_allclose(model.stages[-1].pc.toArray(), standard.kept_components, atol=1e-8)
    np.testing.assert_allclose(
        report["explained_variance_ratio_all"], standard.explained_variance_ratio, atol=1e-12
    )


# --- degenerate inputs -------------------------------------------------------------------


@pytest.mark.parametrize("wide_threshold", [2048, 4])
def test_fewer_rows_than_columns_keeps_at_most_rows_minus_one(spark, wide_threshold):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((6, 10))
    rows = rows_frame(spark, x)
    config = PcaConfig(variance=1.0, wide_threshold=wide_threshold, power_iterations=1)
    fit = fit_pca(rows, 10, config, names(10))
    assert fit.components_with_variance == 5 and fit.k == 5
    assert fit.variance_kept == pytest.approx(1.0, abs=1e-12)
    oracle = PCA(n_components=5, svd_solver="full").fit(x)
    assert relative_error(fit.explained_variance_ratio[:5], oracle.explained_variance_ratio_) < 1e-6
    with pytest.raises(DataError, match=r"pca.k = 6 but PCA is fitted on 6 train rows.*<= 5"):
        fit_pca(rows, 10, PcaConfig(k=6, wide_threshold=wide_threshold), names(10))


def test_k_larger_than_the_columns_is_refused(spark):
    rows = rows_frame(spark, np.random.default_rng(5).standard_normal((50, 10)))
    with pytest.raises(DataError, match=r"pca.k = 11 is more than the 10 columns"):
        fit_pca(rows, 10, PcaConfig(k=11), names(10))


def test_constant_column_gets_no_loading_and_is_reported(spark):
    rng = np.random.default_rng(6)
    x = rng.standard_normal((300, 4)) @ rng.standard_normal((4, 4))
    with_constant = np.insert(x, 2, 3.7, axis=1)  # column c2 is constant
    without = fit_pca(rows_frame(spark, x), 4, PcaConfig(), names(4))
    fit = fit_pca(rows_frame(spark, with_constant), 5, PcaConfig(), names(5))
    assert fit.zero_variance_features == ["c2"]
    assert fit.k == without.k and fit.components_with_variance == 4
    assert np.abs(fit.components[2, :4]).max() < 1e-9
    np.testing.assert_allclose(fit.explained_variance_ratio[:4], without.explained_variance_ratio)


def test_only_constant_columns_are_refused(spark):
    with pytest.raises(DataError, match="every one of the 3 columns is constant"):
        fit_pca(rows_frame(spark, np.full((20, 3), 2.5)), 3, PcaConfig(), names(3))


def test_target_one_keeps_every_component_with_variance(spark):
    rng = np.random.default_rng(8)
    x = rng.standard_normal((400, 3)) @ rng.standard_normal((3, 6))  # rank 3 in 6 columns
    fit = fit_pca(rows_frame(spark, x), 6, PcaConfig(variance=1.0), names(6))
    assert fit.components_with_variance == 3 and fit.k == 3
    assert np.all(fit.explained_variance_ratio[3:] <= NEGLIGIBLE_SHARE)
    assert choose_k(np.array([0.7, 0.3, 1e-17]), 1.0) == 2


def test_non_finite_values_are_refused_naming_the_column(spark):
    x = np.random.default_rng(9).standard_normal((30, 3))
    x[4, 1], x[7, 1], x[9, 2] = np.nan, np.inf, -np.inf
    with pytest.raises(DataError, match=r"3 non-finite value\(s\).*e\.g\. b \(2\), c \(1\)"):
        fit_pca(rows_frame(spark, x), 3, PcaConfig(), ["a", "b", "c"])


@pytest.mark.parametrize(
    "pca, message",
    [
        ({"variance": 0.9, "k": 3}, "pca: give variance (a share of variance to keep, 0.9) or k"),
        ({"k": 0}, "pca.k: must be > 0"),
        ({"k": 2.5}, "pca.k: expected an integer"),
        ({"variance": 0}, "pca.variance: must be in (0, 1]"),
        ({"wide_threshold": 0}, "pca.wide_threshold: must be > 0"),
        ({"power_iterations": -1}, "pca.power_iterations: must be >= 0"),
        ({"max_components": 0}, "pca.max_components: must be > 0"),
    ],
)
def test_bad_pca_config_names_the_key(pca, message):
    data = flights_config_dict()
    data["pca"] = pca
    with pytest.raises(ConfigError) as info:
        config_from_dict(data, where="test.yaml")
    assert message in str(info.value)


def test_pca_k_or_variance_and_the_default():
    data = flights_config_dict()
    data["pca"] = {"k": 5}
    assert config_from_dict(data).pca.target is None
    data["pca"] = {}
    assert config_from_dict(data).pca.target == 0.95
