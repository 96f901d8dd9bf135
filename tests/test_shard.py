"""Shards: dense ids, float32 columns, balanced non-empty row groups, readable by the
shard plan's Petastorm reader."""

import math

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import synthetic_clean, synthetic_config
from sparknet.features import fit_and_project
from sparknet.run_dir import SPLITS, RunDir, read_json
from sparknet.shard import shard
from sparknet.train.data import iterate_rank
from sparknet.train.plan import make_plan, read_row_groups


@pytest.fixture(scope="module")
def sharded(spark, tmp_path_factory):
    run_dir = RunDir.at(tmp_path_factory.mktemp("sharded"))
    synthetic_clean(spark, run_dir.clean, n=5_000)
    config = synthetic_config(shard={"rows_per_row_group": 300}, train={"workers": 2})
    fit_and_project(spark, config, run_dir)
    manifest = shard(spark, config, run_dir)
    return run_dir, config, manifest


def test_manifest_matches_the_files(sharded):
    run_dir, config, manifest = sharded
    assert manifest == read_json(run_dir.shards_manifest)
    pca = read_json(run_dir.pca)
    assert manifest["k"] == pca["k"] and len(manifest["columns"]) == pca["k"]
    assert sum(manifest["splits"][s]["rows"] for s in SPLITS) == 5_000
    for split in SPLITS:
        info = manifest["splits"][split]
        assert info["rows"] == pca["rows_by_split"][split]
        # As many row groups as rows_per_row_group asks for, whatever train.workers is.
        assert info["row_groups"] == math.ceil(info["rows"] / 300)
        files = sorted(run_dir.shard(split).glob("*.parquet"))
        assert len(files) == info["files"] == info["row_groups"]  # one row group per file
        assert all(pq.ParquetFile(f).metadata.num_rows > 0 for f in files)
    train = manifest["splits"]["train"]
    assert train["rows_per_row_group"]["max"] - train["rows_per_row_group"]["min"] <= 0.2 * 300


def test_columns_are_float32_and_ids_dense(sharded):
    run_dir, _, manifest = sharded
    for split in SPLITS:
        table = pq.read_table(run_dir.shard(split))
        schema = table.schema
        assert str(schema.field("sample_id").type) == "int64"
        assert str(schema.field("label").type) == "float"
        assert all(str(schema.field(c).type) == "float" for c in manifest["columns"])
        ids = np.sort(table.column("sample_id").to_numpy())
        np.testing.assert_array_equal(ids, np.arange(manifest["splits"][split]["rows"]))
        values = np.column_stack([table.column(c).to_numpy() for c in manifest["columns"]])
        assert np.all(np.isfinite(values))


def test_two_ranks_read_every_row_exactly_once(sharded):
    run_dir, _, manifest = sharded
    n = manifest["splits"]["train"]["rows"]
    plan = make_plan(read_row_groups(run_dir.shard("train")), 2, 128)
    for epoch in (0, 1):
        per_rank = [
            np.concatenate(
                [ids for ids, _, _ in iterate_rank(plan, rank, epoch, 5, manifest["columns"])]
            )
            for rank in (0, 1)
        ]
        np.testing.assert_array_equal(np.sort(np.concatenate(per_rank)), np.arange(n))
        assert abs(len(per_rank[0]) - len(per_rank[1])) <= 1


def test_resharding_is_deterministic(spark, sharded):
    run_dir, config, manifest = sharded
    before = pq.read_table(run_dir.shard("test")).sort_by("sample_id")
    shard(spark, config, run_dir)
    after = pq.read_table(run_dir.shard("test")).sort_by("sample_id")
    assert before.equals(after)
