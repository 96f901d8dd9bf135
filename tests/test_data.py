"""Batching and per-rank reading, without Spark."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sparknet.train.data import iterate_row_groups, rebatch


def groups_of(sizes):
    start = 0
    for size in sizes:
        ids = np.arange(start, start + size, dtype=np.int64)
        yield ids, ids[:, None].astype(np.float32), (ids % 2).astype(np.float32)
        start += size


@pytest.mark.parametrize(
    "sizes, batch", [([300, 50, 700], 256), ([10, 10], 64), ([512], 256), ([1], 1), ([], 8)]
)
def test_rebatch_keeps_every_sample_once_in_order(sizes, batch):
    batches = list(rebatch(groups_of(sizes), batch))
    total = sum(sizes)
    assert [len(b[0]) for b in batches[:-1]] == [batch] * (len(batches) - 1)
    assert sum(len(b[0]) for b in batches) == total
    if batches:
        ids = np.concatenate([b[0] for b in batches])
        np.testing.assert_array_equal(ids, np.arange(total))
        for ids, x, y in batches:
            np.testing.assert_array_equal(x[:, 0], ids.astype(np.float32))
            np.testing.assert_array_equal(y, (ids % 2).astype(np.float32))


@pytest.fixture()
def five_row_groups(tmp_path):
    n = 0
    for i, size in enumerate([100, 100, 100, 100, 37]):
        ids = np.arange(n, n + size, dtype=np.int64)
        pq.write_table(
            pa.table(
                {
                    "sample_id": ids,
                    "label": (ids % 2).astype(np.float32),
                    "pc_000": ids.astype(np.float32),
                }
            ),
            tmp_path / f"part-{i}.parquet",
        )
        n += size
    return tmp_path, n


def read_rank(path, rank, world, epoch, seed=7):
    return np.concatenate(
        [
            ids
            for ids, _, _ in iterate_row_groups(
                path, ["pc_000"], rank, world, seed=seed, epoch=epoch, prefetch_row_groups=2
            )
        ]
    )


def test_ranks_are_disjoint_and_complete(five_row_groups):
    path, n = five_row_groups
    for world in (1, 2, 3):
        parts = [read_rank(path, r, world, epoch=0) for r in range(world)]
        np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(n))
        assert sum(len(p) for p in parts) == n


def test_order_follows_seed_plus_epoch(five_row_groups):
    path, _ = five_row_groups
    a = read_rank(path, 0, 1, epoch=0)
    assert np.array_equal(a, read_rank(path, 0, 1, epoch=0))
    assert not np.array_equal(a, read_rank(path, 0, 1, epoch=1))
    assert not np.array_equal(a, np.sort(a))  # rows are shuffled inside row groups too
