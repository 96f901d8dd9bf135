"""PCA on the train split's standardised feature vectors: our own passes over the rows in
Spark, a small eigendecomposition on the driver, and Spark ML's own `PCAModel` as the
saved projection.

Spark ML's `PCA` is not used to fit: it builds the d×d covariance through a formula that
loses accuracy when rows are mostly zeros, refuses more than 65,535 columns, scans its
input several times, and leaves each component's sign to the SVD. Here:

- standard path (d <= pca.wide_threshold): one pass for the column means (and a check
  that every value is finite), one pass for the centred Gram matrix X_cᵀX_c (d×d),
  `numpy.linalg.eigh` on the driver. The whole spectrum, exact to rounding.
- wide path (d > pca.wide_threshold): a randomized range finder. Each product
  X_cᵀX_c·Q with a d×l block Q (l = k + oversampling) is one pass; the driver only
  orthonormalises d×l blocks and eigendecomposes the l×l matrix Qᵀ X_cᵀX_c Q, so it
  holds O(d·l) numbers, never d².

Both paths fix each component's sign by SIGN_RULE, so a refit on the same rows in
another order or partitioning projects identically. The kept components become a
`pyspark.ml.feature.PCAModel`, which projects x -> Vᵀx (no centring: the scaler before
it has already centred on the train split's means).

Shapes: rows (n × d, float64) -> components V (d × m, unit columns, by variance
descending; m = d on the standard path, l on the wide one) -> k of them in the stage.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
from pyspark import SparkContext
from pyspark.ml.common import _py2java
from pyspark.ml.feature import PCAModel
from pyspark.ml.linalg import DenseMatrix, DenseVector
from pyspark.sql import DataFrame

from sparknet.config import PcaConfig
from sparknet.errors import DataError

log = logging.getLogger(__name__)

# A component whose share of the total variance is at most this carries no variance: it
# spans a direction the train rows do not vary in (a column that is the sum of others,
# one-hot slots summing to one, more columns than rows), and its direction is arbitrary.
NEGLIGIBLE_SHARE = 1e-10
# Rounding in summed shares; a target is reached when the cumulative share is this close.
SHARE_TOLERANCE = 1e-12
# Loadings closer than this to a component's largest |loading| count as tied with it, so
# that rounding differences between two fits cannot move the sign decision to another entry.
SIGN_TIE = 1e-6
SIGN_RULE = (
    "each component's first entry (by input column) whose |loading| is within 1e-6 of its "
    "largest |loading| is positive"
)
# Doubles per binary value sent back from a partition: well below Arrow's 2 GiB limit for
# one binary value, whatever d×l is.
CHUNK = 1 << 24
# Rows per numpy step inside a partition: bounds the centred copy to about 64 MiB.
STEP_BYTES = 1 << 26


@dataclasses.dataclass(frozen=True)
class PcaFit:
    """A fitted PCA: the computed spectrum, and k with how it was chosen."""

    method: str  # "covariance" (standard path) or "randomized" (wide path)
    n_rows: int
    feature_names: list[str]
    components: np.ndarray  # (d, m) unit columns, signs fixed, by variance descending
    explained_variance: np.ndarray  # (m,) variance along each, denominator n - 1
    total_variance: float  # sum of the d column variances
    column_variance: np.ndarray  # (d,)
    k: int
    k_from: str  # "variance" (the fewest reaching the target) or "k" (fixed)
    variance_target: float | None
    variance_target_reached: bool | None  # None when k is fixed
    randomized: dict | None  # the wide path's settings
    warnings: list[str]

    @property
    def n_features(self) -> int:
        return self.components.shape[0]

    @property
    def explained_variance_ratio(self) -> np.ndarray:
        return self.explained_variance / self.total_variance

    @property
    def kept_components(self) -> np.ndarray:
        return self.components[:, : self.k]

    @property
    def variance_kept(self) -> float:
        return float(np.sum(self.explained_variance_ratio[: self.k]))

    @property
    def components_with_variance(self) -> int:
        return int(np.count_nonzero(self.explained_variance_ratio > NEGLIGIBLE_SHARE))

    @property
    def zero_variance_features(self) -> list[str]:
        # Relative to the average column, so that the scale of the input does not matter;
        # a constant column leaves only rounding after centring.
        limit = 1e-12 * self.total_variance / self.n_features
        return [self.feature_names[i] for i in np.nonzero(self.column_variance <= limit)[0]]

    def report(self) -> dict:
        ratios = self.explained_variance_ratio
        k = self.k
        return {
            "method": self.method,
            "k": k,
            "k_from": self.k_from,
            "variance_target": self.variance_target,
            "variance_target_reached": self.variance_target_reached,
            "variance_kept": self.variance_kept,
            "n_features_in": self.n_features,
            "feature_names": self.feature_names,
            "explained_variance_ratio": [float(r) for r in ratios[:k]],
            "cumulative_explained_variance": [float(c) for c in np.cumsum(ratios[:k])],
            "explained_variance": [float(v) for v in self.explained_variance[:k]],
            "explained_variance_ratio_all": [float(r) for r in ratios],
            "n_components_computed": len(ratios),
            "components_with_variance": self.components_with_variance,
            "total_variance": self.total_variance,
            "zero_variance_features": self.zero_variance_features,
            "sign_rule": SIGN_RULE,
            "randomized": self.randomized,
            "warnings": self.warnings,
        }


# --- pure numerics: no Spark -------------------------------------------------------------


def fix_signs(components: np.ndarray) -> np.ndarray:
    """Flips columns of `components` (d × m) so SIGN_RULE holds. An eigensolver may return
    v or -v for the same component; which one depends on rounding, so without a rule two
    fits on the same rows could project with opposite signs."""
    magnitude = np.abs(components)
    near_largest = magnitude >= magnitude.max(axis=0) - SIGN_TIE
    lead = np.argmax(near_largest, axis=0)  # the first True in each column
    signs = np.sign(components[lead, np.arange(components.shape[1])])
    signs[signs == 0] = 1.0
    return components * signs


def choose_k(explained_variance_ratio: np.ndarray, target: float) -> int:
    """The fewest leading components whose explained variance reaches `target`, counting
    only components that carry variance (share above NEGLIGIBLE_SHARE). A target of 1.0,
    or one the shares never reach, keeps every component that carries variance."""
    ratios = np.asarray(explained_variance_ratio, dtype=float)
    carrying = max(1, int(np.count_nonzero(ratios > NEGLIGIBLE_SHARE)))
    if target >= 1.0:
        return carrying
    cumulative = np.cumsum(ratios[:carrying])
    reached = np.nonzero(cumulative >= target - SHARE_TOLERANCE)[0]
    return int(reached[0]) + 1 if reached.size else carrying


def descending_eigh(symmetric: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (clipped at 0: a covariance has none below, only rounding does) and
    unit eigenvectors as columns, largest eigenvalue first."""
    values, vectors = np.linalg.eigh(symmetric)
    return np.clip(values[::-1], 0.0, None), vectors[:, ::-1]


def _column_sums(x: np.ndarray) -> np.ndarray:
    """[rows, Σx per column (non-finite values as 0), non-finite values per column]."""
    bad = ~np.isfinite(x)
    return np.concatenate(([len(x)], np.where(bad, 0.0, x).sum(axis=0), bad.sum(axis=0)))


def _centred_gram(x: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """(x - mean)ᵀ(x - mean), d×d, flattened."""
    xc = x - mean
    return (xc.T @ xc).ravel()


def _centred_product(x: np.ndarray, mean: np.ndarray, block: np.ndarray) -> np.ndarray:
    """(x - mean)ᵀ(x - mean)·block, d×l, flattened."""
    xc = x - mean
    return (xc.T @ (xc @ block)).ravel()


def _centred_product_and_squares(x: np.ndarray, mean: np.ndarray, block: np.ndarray) -> np.ndarray:
    """The product above, then Σ(x - mean)² per column (d): the first product pass also
    gives the column variances, whose sum is the total variance the ratios divide by."""
    xc = x - mean
    return np.concatenate(((xc.T @ (xc @ block)).ravel(), (xc * xc).sum(axis=0)))


def _projected_gram(x: np.ndarray, mean: np.ndarray, block: np.ndarray) -> np.ndarray:
    """Zᵀ Z with Z = (x - mean)·block: the l×l matrix blockᵀ X_cᵀX_c block, flattened."""
    z = (x - mean) @ block
    return (z.T @ z).ravel()


# --- passes over the rows ----------------------------------------------------------------


def _sum_over_rows(
    rows: DataFrame,
    d: int,
    size: int,
    partial: Callable[..., np.ndarray],
    *arrays: np.ndarray,
) -> np.ndarray:
    """One Spark pass: Σ partial(x, *arrays) over slices x (r × d float64) of every
    partition of `rows` (one array<double> column). Each partition sends its sum back in
    chunks; a tree of merges leaves the driver at most 4 partial sums of `size` doubles."""
    sc = rows.sparkSession.sparkContext
    shared = [sc.broadcast(a) for a in arrays]
    step = max(1, STEP_BYTES // (8 * d))
    chunk = CHUNK

    def per_partition(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        values = [b.value for b in shared]
        acc = np.zeros(size)
        for batch in batches:
            flat = batch.column(0).flatten().to_numpy(zero_copy_only=False)
            x = flat.reshape(batch.num_rows, d)
            for start in range(0, batch.num_rows, step):
                acc += partial(x[start : start + step], *values)
        for offset in range(0, size, chunk):
            data = acc[offset : offset + chunk].tobytes()
            yield pa.RecordBatch.from_arrays(
                [pa.array([offset], pa.int64()), pa.array([data], pa.binary())],
                names=["offset", "data"],
            )

    def add_chunk(acc, item):
        offset, data = item
        if acc is None:
            acc = np.zeros(size)
        part = np.frombuffer(data, dtype=np.float64)
        acc[offset : offset + len(part)] += part
        return acc

    def merge(a, b):
        if a is None or b is None:
            return b if a is None else a
        a += b
        return a

    chunks = rows.mapInArrow(per_partition, "offset long, data binary").rdd.map(
        lambda r: (r.offset, r.data)
    )
    # depth log2(partitions): Spark merges pairwise until at most 4 sums are left, which
    # then come to the driver.
    depth = max(2, math.ceil(math.log2(max(2, chunks.getNumPartitions()))))
    total = chunks.treeAggregate(None, add_chunk, merge, depth=depth)
    for b in shared:
        b.unpersist()
    return np.zeros(size) if total is None else total


# --- fitting -------------------------------------------------------------------------------


def _moments(rows: DataFrame, d: int, names: list[str]) -> tuple[int, np.ndarray]:
    """Rows and column means, refusing non-finite values with the columns that hold them."""
    sums = _sum_over_rows(rows, d, 1 + 2 * d, _column_sums)
    n = int(round(sums[0]))
    bad = sums[1 + d :]
    if bad.any():
        worst = np.argsort(-bad, kind="stable")[: min(5, int(np.count_nonzero(bad)))]
        listed = ", ".join(f"{names[i]} ({int(bad[i])})" for i in worst)
        raise DataError(
            f"PCA input: {int(bad.sum())} non-finite value(s) (NaN or ±inf) in "
            f"{int(np.count_nonzero(bad))} column(s) of the standardised feature vectors, "
            f"e.g. {listed}; PCA needs finite vectors: the feature rules (features.impute, "
            "features.clip) should have filled them, so this is a bug upstream of PCA"
        )
    if n < 2:
        raise DataError(f"PCA input: {n} row(s); PCA needs at least 2 to measure variance")
    return n, sums[1 : 1 + d] / n


def _check_fixed_k(k: int, n: int, d: int) -> None:
    if k > d:
        raise DataError(
            f"pca.k = {k} is more than the {d} columns of the standardised feature vectors "
            f"(numeric features plus one slot per category): set pca.k <= {d}, or give "
            "pca.variance instead"
        )
    if k > n - 1:
        raise DataError(
            f"pca.k = {k} but PCA is fitted on {n} train rows, and after centring at most "
            f"{n - 1} components can carry variance: set pca.k <= {n - 1}, or give "
            "pca.variance instead"
        )


def _covariance_spectrum(
    rows: DataFrame, n: int, d: int, mean: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(variances, components, column variances): the full spectrum from the d×d
    covariance of the centred rows."""
    gram = _sum_over_rows(rows, d, d * d, _centred_gram, mean).reshape(d, d)
    covariance = gram / (n - 1)
    variances, components = descending_eigh(covariance)
    return variances, components, np.diag(covariance).copy()


def _randomized_spectrum(
    rows: DataFrame, n: int, d: int, mean: np.ndarray, width: int, power_iterations: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(variances, components, column variances) of the top `width` components: a range
    finder on C = X_cᵀX_c with `power_iterations` extra multiplications by C, then
    Rayleigh-Ritz on the subspace found. Every C·block is one pass over the rows."""
    omega = np.random.default_rng(seed).standard_normal((d, width))
    size = d * width
    first = _sum_over_rows(rows, d, size + d, _centred_product_and_squares, mean, omega)
    y, squares = first[:size].reshape(d, width), first[size:]
    for _ in range(power_iterations):
        # Orthonormalising between multiplications keeps the small directions from being
        # lost to rounding next to the large ones.
        q = np.linalg.qr(y)[0]
        y = _sum_over_rows(rows, d, size, _centred_product, mean, q).reshape(d, width)
    q = np.linalg.qr(y)[0]  # d × width, orthonormal
    small = _sum_over_rows(rows, d, width * width, _projected_gram, mean, q)
    small = small.reshape(width, width)
    values, u = descending_eigh((small + small.T) / 2)
    return values / (n - 1), q @ u, squares / (n - 1)


def fit_pca(rows: DataFrame, d: int, config: PcaConfig, names: list[str]) -> PcaFit:
    """Fits PCA on `rows` (one array<double> column of length d per row, persisted by the
    caller: it is read 2 times on the standard path, power_iterations + 3 on the wide one)
    and chooses k by `config`. `names` label the d columns in messages and the report."""
    started = time.monotonic()
    if len(names) != d:
        raise ValueError(f"fit_pca: {len(names)} names for {d} columns")
    n, mean = _moments(rows, d, names)
    target = config.target
    if config.k is not None:
        _check_fixed_k(config.k, n, d)
    warnings: list[str] = []

    if d <= config.wide_threshold:
        method, randomized = "covariance", None
        variances, components, column_variance = _covariance_spectrum(rows, n, d, mean)
    else:
        method = "randomized"
        wanted = config.k if config.k is not None else min(config.max_components, d)
        width = min(wanted + config.oversampling, d)
        randomized = {
            "power_iterations": config.power_iterations,
            "oversampling": config.oversampling,
            "components_computed": width,
            "max_components": config.max_components,
            "seed": config.seed,
        }
        log.info(
            "PCA: %d columns > pca.wide_threshold %d: randomized PCA computing %d components "
            "in %d passes over %d rows",
            d,
            config.wide_threshold,
            width,
            config.power_iterations + 3,
            n,
        )
        variances, components, column_variance = _randomized_spectrum(
            rows, n, d, mean, width, config.power_iterations, config.seed
        )

    total = float(column_variance.sum())
    if total <= 0.0:
        raise DataError(
            f"PCA input: every one of the {d} columns is constant over the {n} train rows; "
            "there is no variance to keep"
        )
    components = fix_signs(components)
    ratios = variances / total

    if config.k is not None:
        k, reached = config.k, None
        if k > len(ratios):  # cannot happen: l >= k on the wide path
            raise DataError(f"pca.k = {k}: only {len(ratios)} components were computed")
        carrying = int(np.count_nonzero(ratios[:k] > NEGLIGIBLE_SHARE))
        if carrying < k:
            warnings.append(
                f"pca.k = {k} keeps {k - carrying} component(s) that carry no variance on the "
                f"train split (share <= {NEGLIGIBLE_SHARE:g}); their directions are arbitrary"
            )
    elif method == "covariance":
        k, reached = choose_k(ratios, target), True
    else:
        candidates = ratios[: min(config.max_components, len(ratios))]
        k = choose_k(candidates, target)
        kept = float(np.sum(candidates[:k]))
        reached = kept >= target - (1e-9 if target >= 1.0 else SHARE_TOLERANCE)
        if not reached:
            warnings.append(
                f"pca.variance = {target} is not reached within pca.max_components = "
                f"{config.max_components} components of the randomized PCA: k = {k} keeps "
                f"{kept:.4f}; raise pca.max_components or lower pca.variance"
            )
    for message in warnings:
        log.warning("PCA: %s", message)

    fit = PcaFit(
        method=method,
        n_rows=n,
        feature_names=list(names),
        components=components,
        explained_variance=variances,
        total_variance=total,
        column_variance=column_variance,
        k=k,
        k_from="k" if config.k is not None else "variance",
        variance_target=target,
        variance_target_reached=reached,
        randomized=randomized,
        warnings=warnings,
    )
    log.info(
        "PCA (%s) fitted in %.1f s: %d rows x %d columns, %d of %d computed components "
        "carry variance",
        method,
        time.monotonic() - started,
        n,
        d,
        fit.components_with_variance,
        len(ratios),
    )
    return fit


# --- the saved stage and the plot ---------------------------------------------------------


def projection_stage(fit: PcaFit, input_col: str, output_col: str) -> PCAModel:
    """Spark ML's own PCAModel holding the k kept components, so the saved PipelineModel
    projects and reloads without sparknet. Its Scala constructor is private[ml], which
    bytecode does not enforce; py4j calls it like any public one."""
    sc = SparkContext._active_spark_context
    if sc is None:
        raise RuntimeError("projection_stage needs an active SparkContext")
    jvm = sc._jvm
    d, k = fit.kept_components.shape
    # Spark's DenseMatrix is column-major: component j is values[j*d:(j+1)*d].
    pc = DenseMatrix(d, k, np.asfortranarray(fit.kept_components).ravel(order="F"))
    explained = DenseVector(fit.explained_variance_ratio[:k])
    uid = jvm.org.apache.spark.ml.util.Identifiable.randomUID("pca")
    java_model = jvm.org.apache.spark.ml.feature.PCAModel(
        uid, _py2java(sc, pc), _py2java(sc, explained)
    )
    model = PCAModel(java_model)
    model._set(inputCol=input_col, outputCol=output_col, k=k)
    return model


def write_scree_plot(path: Path, fit: PcaFit) -> None:
    """Per-component and cumulative explained variance, the target and the chosen k."""
    # Imported here: executors import this module and never draw.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ratios = fit.explained_variance_ratio
    shown = min(len(ratios), max(2 * fit.k, 40))
    x = np.arange(1, shown + 1)
    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)  # no display: the Agg canvas renders to the file
    ax = fig.add_subplot()
    # Two scales: with many similar components each share is a few percent, invisible
    # next to a cumulative curve that runs to 1.
    ax.bar(x, ratios[:shown], color="#4c72b0", label="per component (left)")
    ax.set_ylabel("share of variance, per component")
    cumulative_ax = ax.twinx()
    cumulative_ax.plot(
        x, np.cumsum(ratios[:shown]), color="#dd8452", marker=".", label="cumulative (right)"
    )
    if fit.variance_target is not None:
        cumulative_ax.axhline(
            fit.variance_target, color="grey", ls="--", lw=1, label=f"target {fit.variance_target}"
        )
    cumulative_ax.axvline(fit.k + 0.5, color="#55a868", ls=":", lw=1.5, label=f"k = {fit.k}")
    cumulative_ax.set_ylim(0, 1.02)
    cumulative_ax.set_ylabel("share of variance, cumulative")
    ax.set_xlim(0.4, shown + 0.6)
    ax.set_xlabel(f"component (first {shown} of {len(ratios)} computed, {fit.method})")
    ax.set_title(
        f"PCA: k = {fit.k} of {fit.n_features} columns keeps {fit.variance_kept:.1%} "
        f"of the variance ({fit.n_rows} train rows)"
    )
    handles = [*ax.get_legend_handles_labels()[0], *cumulative_ax.get_legend_handles_labels()[0]]
    cumulative_ax.legend(handles=handles, loc="center right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    fig.savefig(tmp, format="png")
    tmp.replace(path)
