"""A second real dataset, described only by its config: the raw Palmer penguins table
(palmerpenguins on PyPI) through every stage, as multiclass (conf/penguins.yaml) and,
with the label swapped, as regression."""

import copy

import numpy as np
import pytest

from conftest import REPO, evaluated_by_key
from sparknet.config import config_from_dict, read_yaml
from sparknet.predict import predict
from sparknet.run_dir import RunDir, read_json
from sparknet.stages import STAGES

pytestmark = pytest.mark.slow

PENGUINS_YAML = REPO / "conf" / "penguins.yaml"


def run_all_stages(spark, data: dict, root) -> RunDir:
    config = config_from_dict(data, where=str(PENGUINS_YAML))
    run_dir = RunDir.at(root)
    run_dir.root.mkdir(parents=True, exist_ok=True)
    for stage in STAGES.values():
        stage(spark, config, run_dir)
    return run_dir


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

    features = quality["features"]
    assert features["dropped"] == {"region": "constant", "stage": "constant"}
    isotopes = features["columns"]["delta_15_n"]
    assert isotopes["filled"] == 12 and isotopes["impute"] == "median"
    mass = features["columns"]["body_mass_g"]
    assert mass["clip_quantiles"] == [0.005, 0.995] and mass["clip_bounds"][0] > 2700


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
