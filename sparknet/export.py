"""Export: one self-contained inference artifact per run, <run-dir>/artifact/.

    artifact/
      model_card.json       input schema, feature names, PCA k, test metrics, versions,
                            config hash, what the outputs mean
      config.json           the config the run was trained with (rules are read from it)
      feature_pipeline/     the fitted Spark ML PipelineModel (fill, clip, encode, scale, PCA)
      lookups/<source>/     the cleaned lookup rows the main source is joined with
      network/model.json    the MLP's architecture and the meaning of its outputs
      network/model.pt      its state_dict (load with torch.load(..., weights_only=True))
      network/scorer.pt     TorchScript: float32 (n, k) PCA components -> what a user reads

It is its own stage, after evaluate, rather than the end of train or evaluate: the card
holds the test metrics, so it must follow evaluate, and as a stage it is rerun (or
cleared) with the stages before it, so an artifact never describes another model than
the one in model/. Everything is copied, not referenced, so the folder can be moved
away from the run directory and still score.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from pyspark.sql import SparkSession

from sparknet.clean import classify, clean_rows_of, read_raw, source_path
from sparknet.config import Config, config_to_dict
from sparknet.errors import DataError, RunDirError
from sparknet.run_dir import RunDir, read_json, write_json
from sparknet.stack import stack_report
from sparknet.train.model import (
    ModelSpec,
    build_mlp,
    load_model_files,
    model_from_bytes,
    predict,
)

log = logging.getLogger(__name__)

CARD = "model_card.json"
CONFIG = "config.json"
SCORER = "scorer.pt"
# TorchScript and the eager network run the same kernels; anything beyond float
# rounding would mean the trace missed a branch.
TORCHSCRIPT_TOLERANCE = 1e-6


def scoring_section(config: Config) -> dict:
    """The parts of a config that decide how a raw row becomes a score: a config that
    differs elsewhere (Spark settings, training schedule) scores the same."""
    used = [config.main, *[j.source for j in config.joins]]
    data = config_to_dict(config)
    # Not where the training files were: scoring reads its own input, and the lookups
    # travel in the artifact.
    return {
        "sources": {
            name: {k: v for k, v in data["sources"][name].items() if k != "path"} for name in used
        },
        "main": data["main"],
        "joins": data["joins"],
        "label": {k: data["label"][k] for k in ("name", "task", "classes")},
        "features": data["features"],
        "split": data["split"],
    }


def digest(data: dict) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


class Scorer(torch.nn.Module):
    """The MLP followed by the reading of its outputs, so that a TorchScript user needs
    nothing from sparknet: float32 (n, k) -> float64 (n,) or (n, classes)."""

    def __init__(self, spec: ModelSpec, network: torch.nn.Module):
        super().__init__()
        self.spec = spec
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return predict(self.spec, self.network(x))


def export_torchscript(spec: ModelSpec, state: bytes, path: Path) -> float:
    """Traces the network and checks the saved trace against the eager network; returns
    the largest difference seen."""
    eager = Scorer(spec, model_from_bytes(spec, state)).eval()
    example = torch.randn(512, spec.n_inputs, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        traced = torch.jit.trace(eager, example)
    torch.jit.save(traced, str(path))
    loaded = torch.jit.load(str(path))
    check = torch.randn(1000, spec.n_inputs, generator=torch.Generator().manual_seed(1)) * 3
    with torch.no_grad():
        diff = float((loaded(check) - eager(check)).abs().max())
    if not diff <= TORCHSCRIPT_TOLERANCE:
        raise RunDirError(
            f"the TorchScript export differs from the eager network by {diff} "
            f"(> {TORCHSCRIPT_TOLERANCE}); not writing {path}"
        )
    return diff


def input_schema(config: Config) -> list[dict]:
    """The raw columns predict reads, with their types and rules."""
    src = config.sources[config.main]
    needed = set(required_columns(config))
    schema = []
    for name, spec in src.columns.items():
        entry = {"name": name, "type": spec.type, "required": name in needed}
        if spec.raw_name:
            entry["name_in_file"] = spec.raw_name
        entry.update(
            {
                k: v
                for k, v in dataclasses.asdict(spec).items()
                if k in ("min", "max", "values", "nullable", "format") and v not in (None, [], "")
            }
        )
        schema.append(entry)
    return schema


def required_columns(config: Config) -> list[str]:
    """The main source's columns a score depends on: the split key (the output's id),
    join keys, features, columns a derived expression names, and columns whose absence
    rejects a row. Others (the label's inputs; columns known only later) may be left
    out of a scoring input, and are then missing."""
    import re

    src = config.sources[config.main]
    feats = config.features
    named = set(config.split.key) | set(feats.numeric) | set(feats.categorical)
    for join in config.joins:
        named |= set(join.on)
    # A word match over-approximates an expression's references, which is safe here:
    # at worst a column that is not used is required.
    words = set()
    for expr in feats.derived.values():
        words |= set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", expr))
    return [c for c, spec in src.columns.items() if c in named or c in words or not spec.nullable]


def export(spark: SparkSession, config: Config, run_dir: RunDir) -> dict:
    pipeline = run_dir.require(run_dir.feature_pipeline, "features")
    run_dir.require(run_dir.train_report, "train")  # written last: training finished
    spec, state = load_model_files(run_dir.model)
    pca = read_json(run_dir.require(run_dir.pca, "features"))
    # Target-encoded columns are appended after the k components (pca.json says which).
    width = pca.get("n_features_out", pca["k"])
    if spec.n_inputs != width:
        raise RunDirError(
            f"{run_dir.model} takes {spec.n_inputs} inputs but {run_dir.pca} describes "
            f"{width} (k={pca['k']} components + {width - pca['k']} appended); rerun the "
            "'shard' and 'train' stages"
        )

    final = run_dir.artifact
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        shutil.copytree(pipeline, tmp / "feature_pipeline")
        (tmp / "network").mkdir()
        shutil.copy2(run_dir.model / "model.json", tmp / "network" / "model.json")
        shutil.copy2(run_dir.model / "model.pt", tmp / "network" / "model.pt")
        diff = export_torchscript(spec, state, tmp / "network" / SCORER)
        lookups = write_lookups(spark, config, run_dir, tmp / "lookups")
        write_json(tmp / CONFIG, config_to_dict(config))
        card = model_card(config, run_dir, spec, pca, lookups, diff)
        write_json(tmp / CARD, card)

        # A rename is atomic; a reader sees the old artifact or the new one, never half.
        old = final.with_name(f"{final.name}.old-{os.getpid()}")
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info(
        "artifact %s: %d inputs -> %s; TorchScript within %.1e of the eager network; lookups %s",
        run_dir.committed(final),
        spec.n_inputs,
        spec.task,
        diff,
        lookups,
    )
    return {"path": str(run_dir.committed(final)), "lookups": lookups, "torchscript_max_diff": diff}


def write_lookups(spark: SparkSession, config: Config, run_dir: RunDir, out: Path) -> dict:
    """The lookup sources, cleaned by the same rules as in the clean stage, keeping the
    columns a join brings in. Returns rows per source."""
    rows = {}
    for join in config.joins:
        src = config.sources[join.source]
        path = source_path(src, run_dir)
        try:
            raw = read_raw(spark, join.source, src, path)
        except DataError as exc:
            raise RunDirError(
                f"export needs the raw lookup files the run was cleaned from: {exc}"
            ) from None
        # No duplicate_row / duplicate_key rows survive classify, so the join stays 1:1.
        clean = clean_rows_of(classify(raw, src), list(src.columns))
        table = clean.select(*dict.fromkeys([*join.on, *join.select]))
        table.coalesce(1).write.parquet(str(out / join.source))
        rows[join.source] = spark.read.parquet(str(out / join.source)).count()
    return rows


def model_card(
    config: Config,
    run_dir: RunDir,
    spec: ModelSpec,
    pca: dict,
    lookups: dict,
    torchscript_diff: float,
) -> dict:
    metrics = read_json(run_dir.metrics) if run_dir.metrics.exists() else None
    network = build_mlp(spec)
    return {
        "name": config.name,
        "task": spec.task,
        "label": config.label.name,
        "classes": spec.classes,
        "input": {
            "source": config.main,
            "format": config.sources[config.main].format,
            "options": config.sources[config.main].options,
            "null_values": config.sources[config.main].null_values,
            "columns": input_schema(config),
            "id": list(config.split.key),
        },
        "joins": [
            {"source": j.source, "on": j.on, "select": j.select, "rows": lookups[j.source]}
            for j in config.joins
        ],
        "features": {
            "derived": config.features.derived,
            "numeric": config.features.numeric,
            "categorical": config.features.categorical,
            "dropped": pca.get("dropped_features", {}),
            "names": pca["feature_names"],
        },
        "pca": {
            "k": pca["k"],
            "appended_features": pca.get("appended_features", []),
            "variance_kept": pca["variance_kept"],
            "n_features_in": pca["n_features_in"],
        },
        "network": {
            "hidden": spec.hidden,
            "activation": spec.activation,
            "batch_norm": spec.batch_norm,
            "parameters": sum(p.numel() for p in network.parameters()),
            "inputs": spec.columns,
            "outputs": {
                "binary": "probability of label 1 (float64)",
                "multiclass": "probability per class, in `classes` order (float64)",
                "regression": "the label in its own unit (float64)",
            }[spec.task],
            "torchscript": f"network/{SCORER}",
            "torchscript_max_diff": torchscript_diff,
        },
        "test_metrics": metrics,
        "versions": stack_report(),
        "config_sha256": digest(config_to_dict(config)),
        "scoring_sha256": digest(scoring_section(config)),
    }
