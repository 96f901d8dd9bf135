"""A second real dataset, described only by its config: the raw Palmer penguins table
(palmerpenguins on PyPI) through every stage, as multiclass (conf/penguins.yaml) and,
with the label swapped, as regression."""

import contextlib
import copy
import dataclasses

import numpy as np
import pytest

from conftest import REPO, evaluated_by_key
from sparknet.config import Config, TrainConfig, config_from_dict, read_yaml
from sparknet.predict import predict
from sparknet.run_dir import RunDir, read_json
from sparknet.stages import STAGES

pytestmark = pytest.mark.slow

PENGUINS_YAML = REPO / "conf" / "penguins.yaml"


# The config keys each stage read on the driver, by run directory.
READS: dict[str, dict[str, set[str]]] = {}


def run_all_stages(spark, data: dict, root) -> RunDir:
    config = config_from_dict(data, where=str(PENGUINS_YAML))
    run_dir = RunDir.at(root)
    run_dir.root.mkdir(parents=True, exist_ok=True)
    reads = READS.setdefault(str(run_dir.root), {})
    for name, stage in STAGES.items():
        with config_reads() as reads[name]:
            stage(spark, config, run_dir)
    return run_dir


@contextlib.contextmanager
def config_reads():
    """Records which config keys are read in this process: top-level sections, and
    train's keys one by one (stages depend on single train keys)."""
    reads: set[str] = set()

    def recording(cls, prefix):
        names = {f.name for f in dataclasses.fields(cls)}

        def getattribute(self, name):
            if name in names:
                reads.add(prefix + name)
            return object.__getattribute__(self, name)

        return getattribute

    Config.__getattribute__ = recording(Config, "")
    TrainConfig.__getattribute__ = recording(TrainConfig, "train.")
    try:
        yield reads
    finally:
        del Config.__getattribute__
        del TrainConfig.__getattribute__


def undeclared(stage, reads: set[str]) -> list[str]:
    """Keys a stage read that it declares neither as a dependency nor as operational:
    a change to one of them would not recompute the stage (sparknet/stages.py)."""
    declared = {*stage.depends_on, *stage.operational, "path"}  # path: for messages
    return sorted(
        key
        for key in reads
        if key not in declared
        and key.split(".")[0] not in declared
        # Read on the way to a declared key below it (config.train for train.workers).
        and not any(d.startswith(f"{key}.") for d in declared)
    )


def assert_stages_read_only_declared_keys(run_dir: RunDir) -> None:
    reads = READS[str(run_dir.root)]
    assert set(reads) == set(STAGES)
    assert {name: undeclared(STAGES[name], reads[name]) for name in STAGES} == {
        name: [] for name in STAGES
    }
    # The recorder sees reads at all: every stage but ingest reads the label.
    assert all("label" in reads[name] for name in STAGES if name != "ingest")


@pytest.fixture(scope="module")
def species_run(spark, tmp_path_factory):
    return run_all_stages(spark, read_yaml(PENGUINS_YAML), tmp_path_factory.mktemp("penguins"))


def test_every_penguin_is_clean_or_rejected_with_its_reason(spark, species_run):
    quality = read_json(species_run.quality)
    assert quality["rows_in"] == 344
    # Two birds have no measurement at all; culmen_length_mm is nullable: false.
    assert quality["rejected_by_reason"] == {"missing_value": 2}
    assert quality["sources"]["penguins"]["rejected_by_column"] == {
        "missing_value:culmen_length_mm": 2
    }
    assert quality["clean"] == 342 and quality["reconciled"]
    assert sum(quality["label"]["rows_by_class"].values()) == 342
    rejects = spark.read.parquet(str(species_run.rejects)).collect()
    assert {r["source_file"].rsplit("/", 1)[-1] for r in rejects} == {"penguins.csv"}

    columns = quality["columns"]
    # Sex is NA for 9 of the kept birds, and the isotopes for 12 and 11.
    assert (columns["sex"]["nulls"], columns["sex"]["distinct"]) == (9, 2)
    assert columns["delta_15_n"]["nulls"] == 12 and columns["delta_13_c"]["nulls"] == 11
    assert (columns["flipper_length_mm"]["min"], columns["flipper_length_mm"]["max"]) == (
        172.0,
        231.0,
    )
    assert columns["date_egg"]["min"] == "2007-11-09"

    features = read_json(species_run.feature_quality)
    assert features["dropped"] == {"region": "constant", "stage": "constant"}
    isotopes = features["columns"]["delta_15_n"]
    assert isotopes["filled"] == 12 and isotopes["impute"] == "median"
    mass = features["columns"]["body_mass_g"]
    assert mass["clip_quantiles"] == [0.005, 0.995] and mass["clip_bounds"][0] > 2700


def test_every_config_key_a_stage_reads_is_one_its_outputs_are_declared_to_follow(species_run):
    assert_stages_read_only_declared_keys(species_run)


def test_the_read_check_flags_an_undeclared_key():
    config = config_from_dict(read_yaml(PENGUINS_YAML), where=str(PENGUINS_YAML))
    with config_reads() as reads:
        _ = config.pca.variance, config.train.workers, config.train.epochs, config.split.key
    assert reads == {"pca", "train", "train.workers", "train.epochs", "split"}
    # shard declares split and (as only checked) train.workers, not pca or train.epochs.
    assert undeclared(STAGES["shard"], reads) == ["pca", "train.epochs"]
    assert undeclared(STAGES["export"], reads) == []


def test_species_are_learned(species_run):
    metrics = read_json(species_run.metrics)
    assert metrics["task"] == "multiclass"
    model, baseline = metrics["model"], metrics["majority_baseline"]
    # Island, bill and flipper shapes separate the species almost perfectly.
    assert model["accuracy"] > 0.9 and model["accuracy"] > baseline["accuracy"] + 0.4
    counts = model["confusion_matrix"]["counts"]
    assert len(counts) == 3 and sum(map(sum, counts)) == metrics["rows"]


def scored_like_evaluate(spark, data: dict, run_dir: RunDir):
    """Every raw penguin (columns under their names in the file, as text) through
    predict(); returns the test rows joined with evaluate's scores, and the rejects."""
    config = config_from_dict(data, where=str(PENGUINS_YAML))
    raw = spark.read.option("header", "true").csv(str(run_dir.raw / "penguins.csv"))
    scored, rejects = predict(spark, config, run_dir, raw)
    scored = scored.toPandas()
    assert len(scored) + rejects.count() == raw.count()
    key = list(config.split.key)
    expected = evaluated_by_key(spark, run_dir, config)
    scored = scored.astype({c: expected[c].dtype for c in key})
    both = expected.merge(scored, on=key, suffixes=("_evaluate", "_predict"), validate="1:1")
    assert len(both) == len(expected)
    return both, rejects.toPandas()


def test_scoring_raw_penguins_gives_evaluate_class_probabilities(spark, species_run):
    both, rejects = scored_like_evaluate(spark, read_yaml(PENGUINS_YAML), species_run)
    assert rejects["reason"].tolist() == ["missing_value", "missing_value"]
    p_eval = np.stack(both["probability_evaluate"].to_numpy())
    p_pred = np.stack(both["probability_predict"].to_numpy())
    assert np.abs(p_eval - p_pred).max() <= 1e-6
    classes = read_json(species_run.artifact / "model_card.json")["classes"]
    assert both["predicted_species_id"].tolist() == [classes[i] for i in p_pred.argmax(axis=1)]


def test_body_mass_as_a_regression_target(spark, tmp_path):
    data = copy.deepcopy(read_yaml(PENGUINS_YAML))
    data["label"] = {
        "name": "mass",
        "expr": "body_mass_g",
        "requires": ["body_mass_g"],
        "task": "regression",
    }
    features = data["features"]
    features["numeric"].remove("body_mass_g")
    features["categorical"].append("species")
    del features["clip"]["body_mass_g"]
    data["train"]["epochs"] = 60
    run_dir = run_all_stages(spark, data, tmp_path / "mass")
    assert_stages_read_only_declared_keys(run_dir)

    quality = read_json(run_dir.quality)
    # Two birds have no mass, but they were already refused for their missing culmen.
    assert quality["clean"] == 342
    assert quality["label"]["mean"] == pytest.approx(4201.75, abs=0.01)
    metrics = read_json(run_dir.metrics)
    assert metrics["task"] == "regression"
    model, baseline = metrics["model"], metrics["mean_baseline"]
    # Species and sex explain most of a penguin's mass; the unit is grams.
    assert model["r2"] > 0.7
    assert model["rmse"] < 0.6 * baseline["rmse"] and 100 < model["rmse"] < 500

    both, _ = scored_like_evaluate(spark, data, run_dir)
    # Relative: the network's float32 output is in standard units, and its last-bit
    # differences between batch sizes are scaled by the target's std (about 800 g).
    np.testing.assert_allclose(both["prediction_predict"], both["prediction_evaluate"], rtol=1e-6)
    assert (both["predicted_mass"] == both["prediction_predict"]).all()
