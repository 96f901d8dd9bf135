"""Features + PCA: derive, split, fill and clip, encode, scale, assemble, project.

Every fitted step (fill values, clip bounds, target encodings, category indexes, scaler
moments, PCA basis) is fitted on the train split only and saved as one Spark ML
PipelineModel, so scoring applies exactly the rules training saw. The one exception is
deliberate: train rows themselves are target-encoded out of fold (sparknet.target_encoding),
so the features/ rows of the train split come from the same fitted stages with that
encoding in place of the saved full-train one.

Shapes: numeric and categorical columns -> `assembled` (dense after scaling, n_features)
-> `scaled` (centred, unit variance) -> `pca` (k components: the fewest that keep
`pca.variance` of the variance, or a fixed `pca.k`; fitted by sparknet.pca). Target-encoded
columns (one double each, or one per class) are standardised on their own and appended:
`pca` = k components + the encodings; with `target_encoding.pca: true` they are
`assembled` columns instead.
"""

from __future__ import annotations

import dataclasses
import logging
import time

from pyspark import StorageLevel
from pyspark.ml import Pipeline, PipelineModel, Transformer
from pyspark.ml.feature import (
    OneHotEncoder,
    StandardScaler,
    StringIndexer,
    VectorAssembler,
)
from pyspark.ml.functions import vector_to_array
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from sparknet.config import Config, FeaturesConfig, SplitConfig
from sparknet.errors import DataError, RunDirError, row_error_class, spark_error_summary
from sparknet.feature_rules import (
    READY,
    ColumnRule,
    applied_counts,
    column_stats,
    fit_rules,
    ready,
    rules_stage,
    uninformative,
)
from sparknet.pca import PcaFit, fit_pca, projection_stage, write_scree_plot
from sparknet.quality import features_quality, log_features_quality
from sparknet.run_dir import RunDir, read_json, spark_path, write_json
from sparknet.target_encoding import encoding_stage, fit_target_encoding, prior_counts

log = logging.getLogger(__name__)

SPLIT = "split"
FEATURES = "pca"
# Target encodings kept out of PCA: the components alone, and the encodings standardised.
COMPONENTS = "pca_components"
ENCODED_ASSEMBLED = "encoded_assembled"
ENCODED_SCALED = "encoded_scaled"
HASH_BUCKETS = 10_000


def split_column(split: SplitConfig) -> Column:
    """Assigns train/validation/test from a seeded hash of the key: stable across runs,
    independent of row order and partitioning."""
    bucket = F.pmod(
        F.xxhash64(F.lit(split.seed), *[F.col(c) for c in split.key]), F.lit(HASH_BUCKETS)
    )
    test_cut = int(round(split.test * HASH_BUCKETS))
    validation_cut = test_cut + int(round(split.validation * HASH_BUCKETS))
    return (
        F.when(bucket < test_cut, F.lit("test"))
        .when(bucket < validation_cut, F.lit("validation"))
        .otherwise(F.lit("train"))
    )


def with_derived(df: DataFrame, config: Config) -> DataFrame:
    for name, expr in config.features.derived.items():
        try:
            df = df.withColumn(name, F.expr(expr))
        except Exception as exc:  # AnalysisException and parse errors both land here
            raise DataError(
                f"features.derived.{name}: cannot evaluate '{expr}': {spark_error_summary(exc)}"
            ) from None
    return df


def informative_features(
    train: DataFrame, feats: FeaturesConfig
) -> tuple[FeaturesConfig, dict[str, str], dict[str, dict]]:
    """Drops, with a warning, the columns that carry nothing on the train split; returns
    the kept features, the dropped ones with the reason, and every feature's train stats."""
    stats = column_stats(train, feats)
    dropped = uninformative(feats, stats)
    for c, why in dropped.items():
        log.warning("feature %s dropped: %s on the train split", c, why)
    kept = dataclasses.replace(
        feats,
        numeric=[c for c in feats.numeric if c not in dropped],
        categorical=[c for c in feats.categorical if c not in dropped],
        target_encoded=[c for c in feats.target_encoded if c not in dropped],
    )
    return kept, dropped, stats


def preprocessing(feats: FeaturesConfig, rules: list[ColumnRule], encoded: list[str]) -> Pipeline:
    """Fill + clip -> index + one-hot -> assemble -> standardise; PCA is added after k is
    known. `encoded` are the target-encoded columns, already on the rows it is fitted on
    (out of fold); the saved pipeline gets the full-train encoding stage in front. They
    are standardised apart (`encoded_scaled`) to follow the components, or with
    `target_encoding.pca: true` join the PCA input."""
    through_pca = feats.target_encoding.pca
    numeric_out = [ready(c) for c in feats.numeric] + (encoded if through_pca else [])
    index_out = [f"{c}__index" for c in feats.categorical]
    onehot_out = [f"{c}__onehot" for c in feats.categorical]
    stages = [rules_stage(rules)]
    if feats.categorical:
        # "keep" gives categories unseen at fit time (and missing values left as their own
        # category) one extra, last index, so scoring never fails on a new carrier or
        # airport. The encoder's dropLast then makes that index the all-zero vector.
        stages.append(
            StringIndexer(
                inputCols=[ready(c) for c in feats.categorical],
                outputCols=index_out,
                handleInvalid="keep",
            )
        )
        stages.append(OneHotEncoder(inputCols=index_out, outputCols=onehot_out, dropLast=True))
    # "error": a non-finite value here is a bug in the rules above, never data to pass on.
    stages.append(
        VectorAssembler(
            inputCols=numeric_out + onehot_out, outputCol="assembled", handleInvalid="error"
        )
    )
    # Centred on the train split's means here, because the saved PCA stage (Spark's
    # PCAModel) projects without centring.
    stages.append(
        StandardScaler(inputCol="assembled", outputCol="scaled", withMean=True, withStd=True)
    )
    if encoded and not through_pca:
        stages.append(
            VectorAssembler(inputCols=encoded, outputCol=ENCODED_ASSEMBLED, handleInvalid="error")
        )
        stages.append(
            StandardScaler(
                inputCol=ENCODED_ASSEMBLED, outputCol=ENCODED_SCALED, withMean=True, withStd=True
            )
        )
    return Pipeline(stages=stages)


def output_stages(fit: PcaFit, encoded: list[str], through_pca: bool) -> list[Transformer]:
    """PCA into FEATURES, or, with encodings kept out of PCA, PCA then the standardised
    encodings appended: FEATURES = [k components, one value per encoded column]."""
    if not encoded or through_pca:
        return [projection_stage(fit, "scaled", FEATURES)]
    return [
        projection_stage(fit, "scaled", COMPONENTS),
        VectorAssembler(
            inputCols=[COMPONENTS, ENCODED_SCALED], outputCol=FEATURES, handleInvalid="error"
        ),
    ]


def prepared_table(spark: SparkSession, config: Config, run_dir: RunDir) -> DataFrame:
    """The cleaned table with derived columns, numeric features as double, and the split."""
    # quality.json says reconciled only once clean has finished and checked its output.
    if not read_json(run_dir.require(run_dir.quality, "clean")).get("reconciled"):
        raise RunDirError(
            f"{run_dir.quality} does not record a finished clean stage: rerun clean "
            f"(jobs/clean.py --config CONFIG --run-dir {run_dir.root})"
        )
    clean = spark.read.parquet(spark_path(run_dir.require(run_dir.clean, "clean")))
    df = with_derived(clean, config).withColumn(SPLIT, split_column(config.split))
    selected = pipeline_inputs(config)
    selected[config.label.name] = F.col(config.label.name).cast("double")
    selected[SPLIT] = F.col(SPLIT)
    return df.select(*[col.alias(name) for name, col in selected.items()])


def pipeline_inputs(config: Config) -> dict[str, Column]:
    """The columns the feature pipeline reads, typed as it was fitted on them; scoring
    (sparknet/predict.py) builds its input with this too, so both sides cast alike."""
    # A column may be both a key and a feature (flights: month); select it once.
    selected = {c: F.col(c) for c in config.split.key}
    selected.update({c: F.col(c).cast("double") for c in config.features.numeric})
    selected.update({c: F.col(c).cast("string") for c in config.features.categorical})
    selected.update({c: F.col(c).cast("string") for c in config.features.target_encoded})
    return selected


def fit_and_project(spark: SparkSession, config: Config, run_dir: RunDir) -> dict:
    df = prepared_table(spark, config, run_dir).persist(StorageLevel.MEMORY_AND_DISK)
    train = df.filter(F.col(SPLIT) == "train")
    try:
        n_train = train.count()  # computes every derived column of every row, once
    except Exception as exc:
        if row_error_class(exc) is None:
            raise
        raise DataError(
            f"features.derived: an expression failed on a row ({spark_error_summary(exc)}); "
            "Spark's ANSI mode fails the job on one bad row: write try_divide(a, b), "
            f"try_cast(x AS type) and the like in {sorted(config.features.derived)}, "
            "which give null (then imputed) instead"
        ) from None
    if n_train < 2:
        raise DataError(
            f"features: the train split of {run_dir.clean} has {n_train} rows; PCA needs at "
            f"least 2: lower split.validation ({config.split.validation}) and split.test "
            f"({config.split.test}), or add data"
        )

    kept, dropped, train_stats = informative_features(train, config.features)
    if not (kept.numeric or kept.categorical or kept.target_encoded):
        raise DataError(
            f"features: every feature column is all-null or constant on the train split: {dropped}"
        )
    if not (kept.numeric or kept.categorical or kept.target_encoding.pca):
        raise DataError(
            "features: no numeric or categorical feature is left for PCA on the train split "
            f"(dropped: {dropped}) and features.target_encoding.pca is false: set it to true"
        )
    rules = fit_rules(train, kept)
    # Train rows carry their out-of-fold encoding from here on; validation and test rows
    # get the full-train encoding from the saved stage (see sparknet/target_encoding.py).
    started = time.monotonic()
    encodings, train = fit_target_encoding(spark, train, kept.target_encoded, config)
    if encodings:
        # Read by the fits below, PCA's cache and the final write: join once.
        train = train.persist(StorageLevel.MEMORY_AND_DISK)
    encoded = [out for enc in encodings for out in enc.outputs]
    for enc in encodings:
        log.info(
            "target encoding %s -> %s: %d categories in train, prior %s, strength %g; "
            "train rows encoded out of %d folds (all encodings fitted in %.1f s)",
            enc.column,
            ", ".join(enc.outputs),
            len(enc.table),
            ", ".join(f"{p:.4g}" for p in enc.prior),
            enc.strength,
            enc.folds,
            time.monotonic() - started,
        )
    prep = preprocessing(kept, rules, encoded).fit(train)
    transformed = prep.transform(train)
    # PCA reads these rows several times: cached as dense float64 arrays, the stages
    # above run once, and first() below caches the first partition rather than wasting it.
    scaled_train = transformed.select(vector_to_array("scaled").alias("scaled")).persist(
        StorageLevel.MEMORY_AND_DISK
    )
    n_features = len(scaled_train.first()["scaled"])
    names = feature_names(transformed, n_features)
    fit = fit_pca(scaled_train, n_features, config.pca, names)
    scaled_train.unpersist()

    through_pca = kept.target_encoding.pca
    tail = output_stages(fit, encoded, through_pca)
    head = [encoding_stage(encodings)] if encodings else []
    model = PipelineModel(stages=[*head, *prep.stages, *tail])
    model.write().overwrite().save(spark_path(run_dir.feature_pipeline))

    kept_cols = [*config.split.key, config.label.name, SPLIT, FEATURES]
    projected_train = PipelineModel(stages=[*prep.stages, *tail]).transform(train)
    projected = projected_train.select(*kept_cols).unionByName(
        model.transform(df.filter(F.col(SPLIT) != "train")).select(*kept_cols)
    )
    projected.write.mode("overwrite").partitionBy(SPLIT).parquet(spark_path(run_dir.features))
    split_counts = {r[SPLIT]: r["count"] for r in df.groupBy(SPLIT).count().collect()}
    applied = applied_counts(df, rules)
    applied.update(prior_counts(df.filter(F.col(SPLIT) != "train"), encodings))
    train.unpersist()
    df.unpersist()
    feature_quality = features_quality(
        config, rules, encodings, dropped, train_stats, applied, n_train
    )
    log_features_quality(feature_quality)
    write_json(run_dir.feature_quality, feature_quality)

    write_scree_plot(run_dir.pca_scree, fit)
    report = {
        **fit.report(),
        "fitted_on": {"split": "train", "rows": n_train},
        "dropped_features": dropped,
        "rows_by_split": split_counts,
        "scree_plot": run_dir.pca_scree.name,
        # Appended after the k components (target_encoding.pca false), standardised.
        "appended_features": [] if through_pca else encoded,
        "n_features_out": fit.k + (0 if through_pca else len(encoded)),
    }
    write_json(run_dir.pca, report)
    log.info(
        "PCA: %d input features -> k=%d components keeping %.4f of the variance (%s); "
        "fitted on %d train rows; rows by split %s",
        n_features,
        fit.k,
        fit.variance_kept,
        f"target {fit.variance_target}" if fit.k_from == "variance" else "pca.k fixed",
        n_train,
        split_counts,
    )
    return report


def feature_names(scaled: DataFrame, n_features: int) -> list[str]:
    """Names of the assembled vector's slots (one-hot slots as column=value), from the
    ML attribute metadata Spark attaches to the assembled column."""
    attrs = scaled.schema["assembled"].metadata.get("ml_attr", {}).get("attrs", {})
    names = [""] * n_features
    for group in attrs.values():
        for attr in group:
            name = attr.get("name", f"slot_{attr['idx']}")
            # Spark names slots after the stage columns: x__ready, cat__onehot_value.
            name = name.removesuffix(READY).replace("__onehot_", "=", 1)
            names[attr["idx"]] = name
    return names
