"""The shard plan: balanced ranks, equal step counts, every sample once per epoch, read
through Petastorm from real Parquet files."""

import json
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sparknet.errors import TrainingError
from sparknet.run_dir import RunDir
from sparknet.train.data import iterate_memory, iterate_rank, load_groups
from sparknet.train.plan import RowGroup, ShardPlan, Slice, make_plan, read_row_groups

COLUMNS = ["pc_000", "pc_001"]


def table_of(ids: np.ndarray) -> pa.Table:
    """Features and label are functions of the id, so a row read back can be checked
    against its own id."""
    return pa.table(
        {
            "sample_id": pa.array(ids, type=pa.int64()),
            "label": pa.array((ids % 3).astype(np.float32)),
            "pc_000": pa.array(ids.astype(np.float32)),
            "pc_001": pa.array((-2 * ids).astype(np.float32)),
        }
    )


def write_files(folder, sizes, row_group_size=None):
    """One file per size, consecutive ids; `row_group_size` cuts files into several row
    groups. Returns the number of rows."""
    folder.mkdir(parents=True, exist_ok=True)
    start = 0
    for number, size in enumerate(sizes):
        ids = np.arange(start, start + size, dtype=np.int64)
        pq.write_table(
            table_of(ids), folder / f"part-{number:05d}.parquet", row_group_size=row_group_size
        )
        start += size
    return start


def read_epoch(plan, epoch, seed=11, shuffle=True):
    """Every rank's batches for one epoch, checking each batch's rows against its ids."""
    per_rank = []
    for rank in range(plan.world_size):
        batches = list(iterate_rank(plan, rank, epoch, seed, COLUMNS, shuffle=shuffle))
        for ids, x, y in batches:
            assert ids.dtype == np.int64 and x.dtype == np.float32 and y.dtype == np.float32
            assert x.shape == (len(ids), len(COLUMNS)) and x.flags.writeable
            np.testing.assert_array_equal(x[:, 0], ids.astype(np.float32))
            np.testing.assert_array_equal(x[:, 1], (-2 * ids).astype(np.float32))
            np.testing.assert_array_equal(y, (ids % 3).astype(np.float32))
        per_rank.append(batches)
    return per_rank


def planned_ids(plan, rank, epoch, seed=11, shuffle=True):
    """The rank's ids as the plan defines them, straight from pyarrow, without petastorm."""
    parts = []
    for part in plan.rank_slices(rank, epoch, seed, shuffle):
        group = plan.groups[part.group]
        stored = pq.ParquetFile(group.path).read_row_group(group.index).column("sample_id")
        parts.append(stored.to_numpy()[plan.row_positions(part, epoch, seed, shuffle)])
    return np.concatenate(parts)


def check_epoch(plan, per_rank, n, epoch, seed=11, shuffle=True):
    for rank, batches in enumerate(per_rank):
        assert len(batches) == plan.steps_per_epoch
        assert [len(ids) for ids, _, _ in batches] == plan.batch_sizes(rank)
        assert all(len(ids) >= plan.min_batch for ids, _, _ in batches)
        read = np.concatenate([ids for ids, _, _ in batches])
        np.testing.assert_array_equal(read, planned_ids(plan, rank, epoch, seed, shuffle))
    sequence = np.concatenate([ids for batches in per_rank for ids, _, _ in batches])
    assert len(sequence) == n
    np.testing.assert_array_equal(np.sort(sequence), np.arange(n))
    return sequence


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("batch_size", [7, 64, 1000])
def test_every_sample_once_per_epoch_in_planned_batches(tmp_path, world_size, batch_size):
    n = write_files(tmp_path, [157, 89, 203])  # 449: divisible by no world_size x batch
    plan = make_plan(read_row_groups(tmp_path), world_size, batch_size)
    sequences = [check_epoch(plan, read_epoch(plan, epoch), n, epoch) for epoch in (0, 1)]
    assert not np.array_equal(sequences[0], sequences[1])

    # A second, independent computation (new plan from the footers, new readers) agrees.
    again = make_plan(read_row_groups(tmp_path), world_size, batch_size)
    assert again == plan
    np.testing.assert_array_equal(check_epoch(again, read_epoch(again, 1), n, 1), sequences[1])


def test_ranks_are_balanced_when_one_file_is_three_times_another(tmp_path):
    n = write_files(tmp_path, [300, 100])
    plan = make_plan(read_row_groups(tmp_path), 2, 32)
    assert [plan.rank_rows(r) for r in (0, 1)] == [200, 200]
    for epoch in (0, 1, 2):
        check_epoch(plan, read_epoch(plan, epoch), n, epoch)


def test_one_row_group_serves_three_ranks(tmp_path):
    n = write_files(tmp_path, [10])
    plan = make_plan(read_row_groups(tmp_path), 3, 2)
    assert [plan.rank_rows(r) for r in range(3)] == [4, 3, 3]
    assert plan.steps_per_epoch == 2
    assert [plan.batch_sizes(r) for r in range(3)] == [[2, 2], [2, 1], [2, 1]]
    first, second = (check_epoch(plan, read_epoch(plan, e), n, e) for e in (0, 1))
    # One row group: the epochs differ only by the permutation of its rows.
    assert not np.array_equal(first, second)


def test_empty_parquet_files_are_skipped(tmp_path):
    n = write_files(tmp_path, [50, 70])
    # An empty upstream partition, both ways a writer leaves one: a row group of no rows,
    # and no row group at all.
    empty = table_of(np.arange(0, dtype=np.int64))
    pq.write_table(empty, tmp_path / "part-00002.parquet")
    pq.ParquetWriter(tmp_path / "part-00003.parquet", empty.schema).close()
    groups = read_row_groups(tmp_path)
    assert [g.rows for g in groups] == [50, 70]
    plan = make_plan(groups, 3, 8)
    check_epoch(plan, read_epoch(plan, 0), n, 0)


def test_multi_row_group_files_in_shuffled_order(tmp_path):
    # Rows 0..999 in row groups of 300, 300, 300, 100 in one file, then a file of 77: the
    # shuffled epoch order asks for one file's row groups out of their stored order.
    n = write_files(tmp_path, [1000, 77], row_group_size=300)
    groups = read_row_groups(tmp_path)
    assert [(g.index, g.rows) for g in groups] == [(0, 300), (1, 300), (2, 300), (3, 100), (0, 77)]
    for world_size in (1, 2, 3):
        plan = make_plan(groups, world_size, 50)
        orders = [plan.group_order(epoch, 11) for epoch in (0, 1)]
        assert any(order[:4] != sorted(order[:4]) for order in orders)
        for epoch in (0, 1):
            check_epoch(plan, read_epoch(plan, epoch), n, epoch)


def test_unshuffled_ranks_read_contiguous_stored_ranges(tmp_path):
    """What validation uses: each rank's share in stored order, one big batch."""
    n = write_files(tmp_path, [40, 41, 42])
    plan = make_plan(read_row_groups(tmp_path), 2, 10_000)
    per_rank = read_epoch(plan, 3, shuffle=False)
    check_epoch(plan, per_rank, n, 3, shuffle=False)
    assert [len(batches) for batches in per_rank] == [1, 1]
    np.testing.assert_array_equal(per_rank[0][0][0], np.arange(62))
    np.testing.assert_array_equal(per_rank[1][0][0], np.arange(62, n))


def test_rank_slices_tile_each_row_group_exactly_once():
    rng = np.random.default_rng(3)
    for _ in range(50):
        sizes = rng.integers(1, 40, size=rng.integers(1, 8)).tolist()
        groups = [RowGroup(f"/data/part-{i}.parquet", 0, s) for i, s in enumerate(sizes)]
        world_size = int(rng.integers(1, 5))
        if sum(sizes) < world_size:
            continue
        plan = make_plan(groups, world_size, int(rng.integers(1, 9)) * 2)
        for epoch in (0, 1):
            covered = [np.zeros(s, dtype=int) for s in sizes]
            for rank in range(world_size):
                slices = plan.rank_slices(rank, epoch, seed=5)
                assert sum(s.rows for s in slices) == plan.rank_rows(rank)
                assert len({s.group for s in slices}) == len(slices)
                for s in slices:
                    covered[s.group][s.start : s.stop] += 1
            assert all((c == 1).all() for c in covered)


@pytest.mark.parametrize(
    "rows, world_size, batch_size, min_batch",
    [
        (449, 3, 7, 1),
        (10, 4, 3, 1),
        (16, 2, 4, 2),  # every rank exactly 2 x batch_size
        (18, 2, 4, 2),  # 2 x batch_size + 1: the last batch of 1 borrows one row
        (17, 2, 4, 2),  # ranks of 9 and 8 rows: 8 would end with an empty step
        (6, 3, 4, 2),  # exactly min_batch rows per rank
        (25, 3, 4, 2),  # 9, 8, 8 rows
        (1, 1, 1, 1),
    ],
)
def test_batch_sizes_follow_the_rule(rows, world_size, batch_size, min_batch):
    plan = make_plan([RowGroup("/data/part-0.parquet", 0, rows)], world_size, batch_size, min_batch)
    shares = [plan.rank_rows(r) for r in range(world_size)]
    assert sum(shares) == rows and max(shares) - min(shares) <= 1
    assert plan.steps_per_epoch == -(-max(shares) // batch_size)
    for rank in range(world_size):
        sizes = plan.batch_sizes(rank)
        assert len(sizes) == plan.steps_per_epoch
        assert sum(sizes) == plan.rank_rows(rank)
        assert min(sizes) >= min_batch and max(sizes) <= batch_size
        # Only the tail departs from batch_size.
        assert all(size == batch_size for size in sizes[:-2])
    assert sum(plan.step_rows()) == rows and len(plan.step_rows()) == plan.steps_per_epoch


def test_borrowing_keeps_every_batch_trainable_with_batch_norm():
    plan = make_plan([RowGroup("/data/part-0.parquet", 0, 17)], 2, 4, min_batch=2)
    assert plan.batch_sizes(0) == [4, 3, 2]  # 9 rows: 4, 4, 1 would leave one row alone
    assert plan.batch_sizes(1) == [4, 2, 2]  # 8 rows: 4, 4, 0 would leave a step empty
    assert plan.step_rows() == [8, 5, 4]


def test_too_few_rows_names_the_split_rows_and_workers():
    groups = [RowGroup("/data/part-0.parquet", 0, 5)]
    with pytest.raises(TrainingError, match=r"the train split has 5 rows: .*train\.workers=3"):
        make_plan(groups, 3, 64, min_batch=2)
    with pytest.raises(TrainingError, match=r"^the validation split \(x\) has 5 rows"):
        make_plan(groups, 6, 8192, where="the validation split (x)")
    with pytest.raises(TrainingError, match="train.workers=6"):
        make_plan(groups, 6, 64)


def test_a_batch_too_small_to_share_fairly_is_refused():
    # Ranks of 2 and 1 rows with batch_size 1 would need two steps on a rank with one row.
    with pytest.raises(TrainingError, match=r"train\.batch_size=1 .* at least 2"):
        make_plan([RowGroup("/data/part-0.parquet", 0, 3)], 2, 1)


def test_a_folder_without_rows_is_refused_by_name(tmp_path):
    pq.write_table(table_of(np.arange(0, dtype=np.int64)), tmp_path / "part-00000.parquet")
    with pytest.raises(TrainingError, match=str(tmp_path)):
        read_row_groups(tmp_path)
    with pytest.raises(TrainingError, match="not a folder"):
        read_row_groups(tmp_path / "missing")


def test_shards_changed_after_planning_fail_loudly(tmp_path):
    write_files(tmp_path, [30, 30])
    plan = make_plan(read_row_groups(tmp_path), 1, 8)
    pq.write_table(table_of(np.arange(30, 50, dtype=np.int64)), tmp_path / "part-00001.parquet")
    with pytest.raises(TrainingError, match="the shard plan says 30"):
        read_epoch(plan, 0)


def test_stopping_early_ends_the_reader_thread(tmp_path):
    write_files(tmp_path, [500, 500, 500])
    plan = make_plan(read_row_groups(tmp_path), 1, 10)
    before = threading.active_count()
    batches = iterate_rank(plan, 0, 0, 1, COLUMNS)
    next(batches)
    batches.close()
    assert threading.active_count() <= before


def test_plan_json_round_trip_and_digest(tmp_path):
    groups = [RowGroup("/data/part-0.parquet", 0, 300), RowGroup("/data/part-1.parquet", 0, 149)]
    plan = make_plan(groups, 3, 64, min_batch=2)
    path = RunDir.at(tmp_path).shard_plan
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(plan.to_json(), indent=2))
    loaded = ShardPlan.from_json(json.loads(path.read_text()))
    assert loaded == plan and loaded.digest == plan.digest
    assert loaded.rank_slices(2, 4, 9) == plan.rank_slices(2, 4, 9)
    # Pinned: a change here means every stored plan.json reads as a different plan.
    assert plan.digest == "3057560d588758886c05e859abd4d6653a0acb5b7a3148ec566604f90ac0c01d"
    assert make_plan(groups, 3, 32, min_batch=2).digest != plan.digest

    edited = plan.to_json() | {"rows": 450}
    with pytest.raises(TrainingError, match="edited"):
        ShardPlan.from_json(edited)


def test_slices_are_plain_values():
    assert Slice(0, 2, 5).rows == 3
    plan = make_plan([RowGroup("/data/part-0.parquet", 0, 7)], 2, 4)
    assert plan.rank_slices(1, 0, 3, shuffle=False) == [Slice(0, 4, 7)]
    with pytest.raises(ValueError, match="rank"):
        plan.rank_rows(2)
    with pytest.raises(TrainingError, match="train.seed"):
        plan.rank_slices(0, 0, -1)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_the_in_memory_feed_serves_bitwise_the_streamed_batches(tmp_path, world_size):
    """The benchmark's yardstick for streaming (TaskSpec.feed="memory") must train on
    exactly what Petastorm hands the loop, or the comparison measures something else."""
    write_files(tmp_path / "split", [700, 300, 1000], row_group_size=400)
    plan = make_plan(read_row_groups(tmp_path / "split"), world_size, 64)
    groups = load_groups(plan, COLUMNS)
    for epoch, shuffle, start_step in ((0, True, 0), (1, True, 3), (0, False, 0)):
        for rank in range(world_size):
            streamed = list(
                iterate_rank(plan, rank, epoch, 11, COLUMNS, shuffle=shuffle, start_step=start_step)
            )
            held = list(
                iterate_memory(
                    groups, plan, rank, epoch, 11, shuffle=shuffle, start_step=start_step
                )
            )
            assert len(held) == len(streamed) == plan.steps_per_epoch - start_step
            for a, b in zip(streamed, held, strict=True):
                for part_a, part_b in zip(a, b, strict=True):
                    assert part_a.dtype == part_b.dtype
                    np.testing.assert_array_equal(part_a, part_b)
