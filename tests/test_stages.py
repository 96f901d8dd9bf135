"""Idempotent, atomic stages (sparknet/status.py), with each real stage's declarations
(sparknet/stages.py) but a stand-in body that writes small files: which stages a
change recomputes, skipping, --force, what a failed stage leaves and who may read it.
The real stages under the real command line, killed mid-write, are in
test_end_to_end.py."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import shutil

import pytest

from conftest import flights_config_dict
from sparknet.cli import run_stages
from sparknet.config import config_from_dict
from sparknet.errors import RunDirError
from sparknet.run_dir import OUTPUTS, RunDir, read_json
from sparknet.stages import STAGES

ORDER = list(STAGES)
REPORTS = {
    "ingest": {},
    "clean": {"clean": 10},
    "features": {"rows_by_split": {"train": 7, "test": 3}},
    "shard": {"splits": {"train": {"rows": 7}, "test": {"rows": 3}}},
    "train": {"train_rows": 7},
    "evaluate": {"rows": 3},
    "export": {},
}


class Failure(Exception):
    pass


class Pipeline:
    """Runs stand-in stages through run_stages and records which ran."""

    def __init__(self, root):
        self.run_dir = RunDir.at(root)
        self.run_dir.root.mkdir(parents=True, exist_ok=True)
        self.data = flights_config_dict()
        self.calls: list[str] = []
        self.fail: str | None = None  # a stage that raises after writing half its outputs
        self.saw_checkpoints: bool | None = None

    def run(self, names=ORDER, force=(), data=None) -> list[str]:
        self.calls = []
        table = {n: dataclasses.replace(s, run=self._stand_in(n)) for n, s in STAGES.items()}
        config = config_from_dict(data or self.data, where="stand-in.yaml")
        run_stages(table, names, config, self.run_dir, spark=lambda: None, force=set(force))
        return self.calls

    def _stand_in(self, name: str):
        def run(spark, config, run_dir: RunDir) -> dict:
            assert run_dir.stage == name and spark is None
            self.calls.append(name)
            if name == "ingest":
                run_dir.raw.mkdir(parents=True)
                for src in config.sources.values():
                    (run_dir.raw / src.path).write_text(json.dumps(config.ingest.files))
            if name == "train":
                self.saw_checkpoints = run_dir.checkpoints.exists()
                run_dir.checkpoints.mkdir(exist_ok=True)
                (run_dir.checkpoints / "epoch0001-step000000.pt").write_text("weights")
            for i, path in enumerate(p for p in run_dir.outputs(name) if name != "ingest"):
                assert run_dir.staging(name) in path.parents  # never the committed place
                if self.fail == name and i == 1:
                    raise Failure(f"{name} fails half way")
                if path.suffix:
                    path.write_text(json.dumps({"stage": name}))
                else:
                    path.mkdir()
                    (path / "part-0").write_text(name)
            return REPORTS[name]

        return run


@pytest.fixture()
def pipeline(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return Pipeline(tmp_path / "run")


def messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records]


def test_a_second_run_skips_every_stage_and_says_why(pipeline, caplog):
    caplog.set_level(logging.INFO, logger="sparknet")
    assert pipeline.run() == ORDER
    run_dir = pipeline.run_dir
    assert not (run_dir.root / "_staging").exists()
    for name in ORDER:
        status = read_json(run_dir.status(name))
        assert status["stage"] == name and status["format"] == 1
        assert status["started"].endswith("Z") and status["finished"].endswith("Z")
        assert status["seconds"] >= 0 and status["sparknet_version"]
        assert len(status["config_sha256"]) == 64 and status["config"]
        assert set(status["inputs"]) == set(STAGES[name].inputs) | (
            {"raw"} if STAGES[name].reads_raw else set()
        )
        expected = (
            sorted(f"raw/{s['path']}" for s in pipeline.data["sources"].values())
            if name == "ingest"
            else list(OUTPUTS[name])
        )
        assert sorted(status["outputs"]) == sorted(expected)
        for output in status["outputs"]:
            assert (run_dir.root / output).exists()
    assert read_json(run_dir.status("clean"))["rows"] == 10
    assert read_json(run_dir.status("export"))["rows"] is None
    # A downstream status records the digest of its input's status file.
    assert len(read_json(run_dir.status("evaluate"))["inputs"]["train"]) == 64

    caplog.clear()
    assert pipeline.run() == []
    skipped = [m for m in messages(caplog) if m.startswith("skipped: up to date")]
    assert len(skipped) == len(ORDER)
    assert "--force recomputes it" in skipped[0]


def edit(path: str, value):
    def apply(data):
        *parents, last = path.split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value

    return apply


DOWNSTREAM_OF_FEATURES = ["features", "shard", "train", "evaluate", "export"]


@pytest.mark.parametrize(
    "change, recomputed",
    [
        # Training settings redo training and what follows it, never the data stages.
        (edit("train.epochs", 2), ["train", "evaluate", "export"]),
        (edit("train.learning_rate", 0.01), ["train", "evaluate", "export"]),
        (edit("train.hidden", [32]), ["train", "evaluate", "export"]),
        (edit("train.workers", 1), ["train", "evaluate", "export"]),
        # How a training runs, not what it computes: only the artifact holds it.
        (edit("train.timeout_s", 30.0), ["export"]),
        (edit("train.checkpoint", {"every_steps": 5}), ["export"]),
        (edit("train.prefetch_row_groups", 4), ["export"]),
        (edit("evaluate.compare", True), ["evaluate", "export"]),
        (edit("name", "flights2"), ["evaluate", "export"]),
        (edit("shard.rows_per_row_group", 100), ["shard", "train", "evaluate", "export"]),
        (edit("pca.variance", 0.9), DOWNSTREAM_OF_FEATURES),
        (edit("split.seed", 99), DOWNSTREAM_OF_FEATURES),
        (edit("features.impute", "mean"), DOWNSTREAM_OF_FEATURES),
        (edit("features.target_encoding.strength", 5), DOWNSTREAM_OF_FEATURES),
        (edit("label.expr", "arr_delay > 30"), ORDER[1:]),
        (edit("sources.flights.max_reject_share", 0.1), ORDER[1:]),
        (edit("ingest.files", {"flights.csv.zip": "flights.csv"}), ORDER),
        (edit("spark.conf", {"spark.sql.shuffle.partitions": "4"}), ["export"]),
        (edit("spark.log_level", "ERROR"), ["export"]),
        (edit("tracking.experiment", "other"), ["export"]),
    ],
)
def test_a_config_change_recomputes_exactly_the_stages_that_depend_on_it(
    pipeline, change, recomputed
):
    pipeline.run()
    data = copy.deepcopy(pipeline.data)
    change(data)
    assert pipeline.run(data=data) == recomputed
    assert pipeline.run(data=data) == []


def test_changed_raw_files_recompute_clean_and_what_follows(pipeline):
    pipeline.run()
    (pipeline.run_dir.raw / "weather.csv").write_text("another weather file\n")
    assert pipeline.run() == ORDER[1:]


def test_a_copied_run_directory_stays_up_to_date(pipeline, tmp_path):
    pipeline.run()
    shutil.copytree(pipeline.run_dir.root, tmp_path / "copy")
    pipeline.run_dir = RunDir.at(tmp_path / "copy")
    assert pipeline.run() == []


def test_missing_outputs_are_recomputed(pipeline, caplog):
    caplog.set_level(logging.INFO, logger="sparknet")
    pipeline.run()
    (pipeline.run_dir.model / "part-0").unlink()
    pipeline.run_dir.model.rmdir()
    assert pipeline.run() == ["train", "evaluate", "export"]
    assert "running: outputs missing: model" in messages(caplog)


def test_force_recomputes_the_stage_and_what_follows(pipeline, caplog):
    caplog.set_level(logging.INFO, logger="sparknet")
    pipeline.run()
    assert pipeline.run(force=["shard"]) == ["shard", "train", "evaluate", "export"]
    assert "running: --force" in messages(caplog)
    assert "running: 'shard' was recomputed" in messages(caplog)
    assert read_json(pipeline.run_dir.status("shard"))["forced"] is True
    assert pipeline.run(force=ORDER) == ORDER


def test_a_failed_stage_is_never_read_and_its_rerun_starts_over(pipeline, caplog):
    caplog.set_level(logging.INFO, logger="sparknet")
    run_dir = pipeline.run_dir
    pipeline.run()
    before = read_json(run_dir.status("clean"))

    pipeline.fail = "features"
    with pytest.raises(Failure):
        pipeline.run(force=["features"])
    assert pipeline.calls == ["features"]
    # The first output was written, in staging only; the stage has no status.
    assert (run_dir.staging("features") / "features" / "part-0").exists()
    assert not run_dir.status("features").exists()
    assert read_json(run_dir.status("clean")) == before
    assert any("same command with --run-dir" in m for m in messages(caplog))

    # Nothing downstream reads the committed features/ of the replaced run.
    with pytest.raises(RunDirError, match="run the 'features' stage first"):
        pipeline.run(names=["shard"])
    assert pipeline.calls == []

    pipeline.fail = None
    caplog.clear()
    assert pipeline.run() == DOWNSTREAM_OF_FEATURES
    assert any(m.startswith(f"removed {run_dir.staging('features')}") for m in messages(caplog))
    assert not run_dir.staging("features").exists()


def test_a_stage_refuses_missing_and_stale_inputs(pipeline):
    pipeline.run(names=["ingest", "clean", "features"])
    with pytest.raises(RunDirError) as info:
        pipeline.run(names=["train"])
    message = str(info.value)
    assert "train needs the outputs of 'shard', but it has not finished" in message
    assert "run the 'shard' stage first (jobs/shard.py --config CONFIG --run-dir" in message

    pipeline.run()
    data = copy.deepcopy(pipeline.data)
    data["pca"] = {"variance": 0.9}
    # Run alone, shard would read features computed for another config; so would train,
    # two stages down: each names features as the stage to run first.
    for name in ("shard", "train"):
        with pytest.raises(RunDirError, match="'features', but config changed: pca: run the"):
            pipeline.run(names=[name], data=data)
    pipeline.run(names=["features"], data=data)
    with pytest.raises(RunDirError, match="'shard', but 'features' was recomputed: run the"):
        pipeline.run(names=["evaluate"], data=data)
    assert pipeline.calls == []


def test_checkpoints_survive_a_failed_training_but_not_a_replaced_one(pipeline, caplog):
    caplog.set_level(logging.INFO, logger="sparknet")
    run_dir = pipeline.run_dir
    pipeline.fail = "train"
    with pytest.raises(Failure):
        pipeline.run()
    assert (run_dir.checkpoints / "epoch0001-step000000.pt").exists()

    pipeline.fail = None
    pipeline.run()  # a rerun after the failure: the training resumes
    assert pipeline.calls == ["train", "evaluate", "export"]
    assert pipeline.saw_checkpoints is True

    data = copy.deepcopy(pipeline.data)
    data["train"]["epochs"] = 2
    pipeline.run(data=data)  # replaces a finished training: starts from scratch
    assert pipeline.saw_checkpoints is False
    assert f"removed {run_dir.checkpoints}: they belong to the training being replaced" in (
        messages(caplog)
    )

    pipeline.run(data=data, force=["train"])
    assert pipeline.saw_checkpoints is False
