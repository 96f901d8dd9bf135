import copy

import pytest

from conftest import FLIGHTS_YAML, flights_config_dict
from sparknet.config import config_from_dict, config_to_dict, config_yaml, load_config
from sparknet.errors import ConfigError


def test_flights_config_loads_with_yaml12_booleans():
    config = load_config(FLIGHTS_YAML)
    # YAML 1.1 would turn the `on:` key into True.
    assert config.joins[0].on == ["origin", "year", "month", "day", "hour"]
    assert config.label.requires == ["arr_delay"]
    assert config.train.workers == 2


def test_leaking_columns_are_not_features():
    config = load_config(FLIGHTS_YAML)
    used = (
        set(config.features.numeric)
        | set(config.features.categorical)
        | set(config.features.target_encoded)
    )
    for expr in config.features.derived.values():
        used |= {word for word in expr.replace("(", " ").replace(")", " ").split()}
    assert not used & {"dep_time", "dep_delay", "arr_time", "air_time", "arr_delay"}


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d["train"].update(workerz=2), "train: unknown key(s) workerz"),
        (lambda d: d["train"].update(workers=0), "train.workers: must be > 0"),
        (lambda d: d["train"].update(epochs="many"), "train.epochs: expected an integer"),
        (lambda d: d["pca"].update(variance=1.5), "pca.variance: must be in (0, 1]"),
        (lambda d: d.update(main="nope"), "main: 'nope' is not a source"),
        (
            lambda d: d["sources"]["flights"]["columns"].update(year="integer"),
            "sources.flights.columns.year: 'integer' is not one of",
        ),
        (lambda d: d["joins"][0].update(on=["origin"]), "must equal sources.weather.key"),
        (
            lambda d: d["features"]["numeric"].append("dep_delay_x"),
            "features.numeric: 'dep_delay_x' is neither",
        ),
        (lambda d: d["split"].update(test=0.6, validation=0.5), "split: validation (0.5)"),
        (lambda d: d.pop("label"), "missing required key 'label'"),
        (
            lambda d: d["features"]["categorical"].append("month"),
            "['month'] listed as both numeric and categorical",
        ),
        (
            lambda d: d["features"]["derived"].update(late="1 - late"),
            "features.derived.late: would replace the column or label 'late'",
        ),
        (
            lambda d: d["features"]["derived"].update(distance="distance * 2"),
            "features.derived.distance: would replace",
        ),
        (
            lambda d: d["label"].update(name="carrier"),
            "label.name: 'carrier' is already a column",
        ),
        (
            lambda d: d["features"]["numeric"].append("distance"),
            "features.numeric: ['distance'] listed more than once",
        ),
        (
            lambda d: d["features"]["numeric"].append("tailnum"),
            "features.numeric: 'tailnum' is a string column",
        ),
        (
            lambda d: d["sources"]["flights"]["columns"].update(Dest={"type": "string"}),
            "['Dest', 'dest'] differ only in case",
        ),
        (lambda d: d["split"].update(key=[]), "split.key: list the columns"),
        (
            lambda d: d["sources"]["flights"]["columns"].update(
                distance={"type": "double", "min": float("nan")}
            ),
            "sources.flights.columns.distance: min/max must be finite",
        ),
        (
            lambda d: d["features"].update(
                impute_columns={"temp": {"strategy": "constant", "value": "inf"}}
            ),
            "features.impute_columns.temp.value: 'inf' is not a finite number",
        ),
        (
            lambda d: d["sources"]["flights"]["options"].update(multiLine="false"),
            "sources.flights.options.multiLine: false is refused",
        ),
    ],
)
def test_bad_config_names_the_key(edit, message):
    data = copy.deepcopy(flights_config_dict())
    edit(data)
    with pytest.raises(ConfigError) as info:
        config_from_dict(data, where="test.yaml")
    assert message in str(info.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_config_error_survives_pickling():
    import pickle

    err = pickle.loads(pickle.dumps(ConfigError("train.workers: must be > 0")))
    assert isinstance(err, ConfigError) and str(err) == "train.workers: must be > 0"


def test_set_overrides_dotted_keys_with_yaml_values():
    config = load_config(
        FLIGHTS_YAML,
        [
            "train.epochs=3",
            "train.hidden=[64, 32]",
            "train.schedule.name=cosine",
            "train.fault={kind: exit, rank: 1, step: 3}",
            "evaluate.compare=true",
            # A Spark setting's name holds dots itself: the rest of the key is its name.
            "spark.conf.spark.sql.shuffle.partitions=4",
            # dep_time is given by its bare type in the file.
            "sources.flights.columns.dep_time.min=0",
            "features.impute_columns.precip={strategy: constant, value: 0}",
            "pca={k: 5}",
            # The same config on another month's file.
            "sources.flights.path=flights-2014-01.csv",
            "train.epochs=4",  # the last one wins
        ],
    )
    assert config.train.epochs == 4 and config.train.hidden == [64, 32]
    assert config.train.schedule.name == "cosine" and config.train.learning_rate == 0.002
    assert (config.train.fault.kind, config.train.fault.rank, config.train.fault.step) == (
        "exit",
        1,
        3,
    )
    assert config.evaluate.compare is True
    assert config.spark.conf["spark.sql.shuffle.partitions"] == "4"
    dep_time = config.sources["flights"].columns["dep_time"]
    assert (dep_time.type, dep_time.min) == ("int", 0.0)
    assert config.features.impute_columns["precip"].value == "0"
    assert (config.pca.k, config.pca.variance) == (5, None)
    assert config.sources["flights"].path == "flights-2014-01.csv"
    assert config.path == str(FLIGHTS_YAML)


@pytest.mark.parametrize(
    "override, message",
    [
        ("trian.epochs=3", "--set trian.epochs: unknown key 'trian' (did you mean 'train'?)"),
        ("train.epocs=3", "unknown key 'train.epocs' (did you mean 'epochs'?); train has workers"),
        ("train.epochs", "--set 'train.epochs': expected KEY=VALUE"),
        ("=3", "expected KEY=VALUE"),
        ("train.epochs=many", "--set train.epochs: expected an integer, got 'many'"),
        ("train.hidden=[64, x]", "--set train.hidden[1]: expected an integer, got 'x'"),
        ("train.epochs=[3", "--set train.epochs: '[3' is not a YAML value"),
        ("train.dropout=yes", "--set train.dropout: expected a number, got 'yes'"),
        ("evaluate.compare=on", "--set evaluate.compare: expected true or false, got 'on'"),
        ("train.epochs.max=3", "'train.epochs' is a single value, it has no key 'max'"),
        ("joins.0.on=[origin]", "'joins' is a list, it has no key '0'; set it whole"),
        ("sources.nope.path=x.csv", "sources has no 'nope' (it has flights, weather, planes)"),
        (
            "sources.flights.pth=x.csv",
            "unknown key 'sources.flights.pth' (did you mean 'path'?); sources.flights has path,",
        ),
        # Config.path is where the file was read from: not a key.
        ("path=other.yaml", "--set path: unknown key 'path'; the top level has name,"),
        ("train.fault={kind: exit, when: 3}", "--set train.fault: unknown key(s) when"),
        # Ranges and cross-field rules are checked with the whole config, naming --set.
        ("train.epochs=0", "with --set train.epochs=0: train.epochs: must be > 0, got 0"),
        (
            "train.optimizer=adamx",
            "train.optimizer: 'adamx' is not one of adam, adamw, sgd, rmsprop",
        ),
    ],
)
def test_a_bad_override_names_the_key_the_value_and_what_is_allowed(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(FLIGHTS_YAML, [override])
    assert message in str(info.value)


@pytest.mark.parametrize(
    "key, value, allowed",
    [
        ("train.activation", "swish", "relu, gelu, tanh, sigmoid, silu"),
        ("train.optimizer", "lamb", "adam, adamw, sgd, rmsprop"),
        ("train.device", "tpu", "auto, cpu, cuda"),
        ("train.schedule.name", "linear", "constant, step, cosine"),
        ("train.early_stopping.metric", "f1", "validation_loss, validation_accuracy"),
        ("label.task", "ranking", "binary, multiclass, regression"),
        ("features.impute", "zero", "median, mean, mode"),
        ("sources.flights.format", "xlsx", "csv, parquet, json"),
        # A column may be given by its bare type: the message names the column.
        ("sources.flights.columns.year", "int32", "int, long, double"),
        ("spark.log_level", "LOUD", "ALL, TRACE, DEBUG, INFO, WARN, ERROR, FATAL, OFF"),
    ],
)
def test_every_enum_refuses_other_values_listing_the_allowed(key, value, allowed):
    with pytest.raises(ConfigError) as info:
        load_config(FLIGHTS_YAML, [f"{key}={value}"])
    assert f"{key}: '{value}' is not one of {allowed}" in str(info.value)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d["train"]["schedule"].update(warmup="x"), "train.schedule: unknown key(s)"),
        (lambda d: d["train"].update(schedule="cosine"), "train.schedule: expected a mapping"),
        (lambda d: d["features"].update(numeric="month"), "features.numeric: expected a list"),
        (lambda d: d["sources"]["flights"].update(null_values={"NA": 1}), "expected a list"),
        (lambda d: d["spark"].update(conf=["x"]), "spark.conf: expected a mapping"),
        (lambda d: d.update(name="my run/1"), "name: 'my run/1' must be letters, digits"),
        (lambda d: d.update(trian={}), "unknown key(s) trian (did you mean 'train'?)"),
        # A source lists its path among its keys; a path at the top level is no key.
        (
            lambda d: d["sources"]["weather"].update(pth="w.csv"),
            "sources.weather: unknown key(s) pth (did you mean 'path'?); expected some of path,",
        ),
        (lambda d: d.update(path="flights.csv"), "test.yaml: unknown key 'path' at the top level"),
    ],
)
def test_nested_types_and_names_are_checked(edit, message):
    data = copy.deepcopy(flights_config_dict())
    data.setdefault("spark", {})
    data["train"].setdefault("schedule", {})
    edit(data)
    with pytest.raises(ConfigError) as info:
        config_from_dict(data, where="test.yaml")
    assert message in str(info.value)


@pytest.mark.parametrize("name", ["flights.yaml", "penguins.yaml"])
def test_the_effective_config_reads_back_as_the_same_config(tmp_path, name):
    config = load_config(FLIGHTS_YAML.parent / name, ["train.epochs=2", "train.hidden=[8]"])
    saved = tmp_path / "config.yaml"
    saved.write_text(config_yaml(config))
    again = load_config(saved)
    assert config_to_dict(again) == config_to_dict(config)
    assert again.train.epochs == 2 and again.train.hidden == [8]
