import copy

import pytest

from conftest import FLIGHTS_YAML, flights_config_dict
from sparknet.config import config_from_dict, load_config
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
