"""The shard plan: which rows each rank trains on, batch by batch, in every epoch.

Made once on the driver from the Parquet footers of a split and written to
<run-dir>/train/plan.json; every rank recomputes its share from (plan, epoch, seed)
alone, so no rank ever asks another what it reads.

Epoch order. With shuffling, the row groups are permuted with
`default_rng([seed, epoch])` and the rows of row group g (g indexes `groups`) with
`default_rng([seed, epoch, g])`; without it, file order and stored row order. The
concatenation of all row groups in that order is the epoch's sequence of every row, and
rank r takes one contiguous stretch of it: rows // world_size rows, one more for the
first rows % world_size ranks. A row group may straddle two ranks, which is how a split
with fewer row groups than ranks, or with row groups of very different sizes, still
gives every rank the same share to within one row.

Batches. Every rank takes the same number of optimizer steps per epoch,
ceil(largest share / batch_size), because a rank that runs out of batches first would
leave its peers waiting in allreduce. Batches hold batch_size rows except the last one;
a last batch smaller than min_batch (including an empty one, on a rank holding one row
fewer) borrows rows from the batch before it until it reaches min_batch. min_batch is 2
with batch norm, which cannot normalise a single row. Nothing is padded or dropped: every
row is trained on exactly once per epoch.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from sparknet.errors import TrainingError

PLAN_FORMAT = 1


@dataclass(frozen=True)
class RowGroup:
    path: str  # absolute local path or URL of the Parquet file
    index: int  # row group index inside that file
    rows: int


@dataclass(frozen=True)
class Slice:
    group: int  # index into ShardPlan.groups
    start: int  # [start, stop) positions in that row group's rows as permuted for the epoch
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


def read_row_groups(path: str | Path) -> list[RowGroup]:
    """Every non-empty row group of the *.parquet files directly inside the split folder
    `path` (the shard stage writes no subfolders), sorted by (file name, index).

    Empty files and row groups are skipped: Spark writes one for an empty partition, and
    a rank must not be handed a row group that yields nothing."""
    folder = Path(str(path).removeprefix("file://")).resolve()
    if not folder.is_dir():
        raise TrainingError(f"{folder} is not a folder of Parquet shards; run the shard stage")
    groups = []
    for file in sorted(folder.glob("*.parquet"), key=lambda f: f.name):
        meta = pq.ParquetFile(file).metadata
        for index in range(meta.num_row_groups):
            rows = meta.row_group(index).num_rows
            if rows > 0:
                groups.append(RowGroup(str(file), index, rows))
    if not groups:
        raise TrainingError(f"{folder} holds no rows in any *.parquet file; rerun the shard stage")
    return groups


@dataclass(frozen=True)
class ShardPlan:
    groups: list[RowGroup]
    world_size: int
    batch_size: int
    min_batch: int  # smallest per-rank batch allowed (1; 2 when batch norm is on)

    @property
    def rows(self) -> int:
        return sum(g.rows for g in self.groups)

    def rank_rows(self, rank: int) -> int:
        self._check_rank(rank)
        base, extra = divmod(self.rows, self.world_size)
        return base + (1 if rank < extra else 0)

    def rank_offset(self, rank: int) -> int:
        """Where rank `rank`'s stretch starts in the epoch's sequence of rows."""
        self._check_rank(rank)
        base, extra = divmod(self.rows, self.world_size)
        return rank * base + min(rank, extra)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.rank_rows(0) / self.batch_size)  # rank 0 has the most rows

    def batch_sizes(self, rank: int) -> list[int]:
        steps = self.steps_per_epoch
        rows = self.rank_rows(rank)
        sizes = [self.batch_size] * (steps - 1) + [rows - self.batch_size * (steps - 1)]
        # Borrowing walks backwards so that only the tail of the epoch changes shape.
        for step in range(steps - 1, 0, -1):
            short = self.min_batch - sizes[step]
            if short <= 0:
                break
            sizes[step] += short
            sizes[step - 1] -= short
        if sizes[0] < self.min_batch:
            raise TrainingError(self._too_small_message())
        return sizes

    def step_rows(self) -> list[int]:
        """Rows per optimizer step summed over ranks: the global batch sizes."""
        per_rank = [self.batch_sizes(rank) for rank in range(self.world_size)]
        return [sum(step) for step in zip(*per_rank, strict=True)]

    def group_order(self, epoch: int, seed: int, shuffle: bool = True) -> list[int]:
        """Indices into `groups` in the order the epoch visits them."""
        if not shuffle:
            return list(range(len(self.groups)))
        return np.random.default_rng(_entropy(seed, epoch)).permutation(len(self.groups)).tolist()

    def row_positions(self, part: Slice, epoch: int, seed: int, shuffle: bool = True):
        """Stored row positions (int64 array, or a slice when not shuffled) of `part`
        inside its row group: the epoch's permutation of the group's rows, then the cut."""
        if not shuffle:
            return slice(part.start, part.stop)
        rows = self.groups[part.group].rows
        order = np.random.default_rng(_entropy(seed, epoch, part.group)).permutation(rows)
        return order[part.start : part.stop]

    def rank_slices(self, rank: int, epoch: int, seed: int, shuffle: bool = True) -> list[Slice]:
        begin = self.rank_offset(rank)
        end = begin + self.rank_rows(rank)
        slices = []
        position = 0  # of the current row group's first row in the epoch's sequence
        for group in self.group_order(epoch, seed, shuffle):
            rows = self.groups[group].rows
            if position + rows > begin and position < end:
                slices.append(Slice(group, max(begin - position, 0), min(end - position, rows)))
            position += rows
            if position >= end:
                break
        return slices

    def to_json(self) -> dict:
        return {
            "format": PLAN_FORMAT,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "min_batch": self.min_batch,
            # Derived, kept for whoever reads the file; from_json checks they still agree.
            "rows": self.rows,
            "steps_per_epoch": self.steps_per_epoch,
            "rank_rows": [self.rank_rows(rank) for rank in range(self.world_size)],
            "groups": [{"path": g.path, "index": g.index, "rows": g.rows} for g in self.groups],
        }

    @classmethod
    def from_json(cls, data: dict) -> ShardPlan:
        if data.get("format") != PLAN_FORMAT:
            raise TrainingError(
                f"shard plan format {data.get('format')!r} is not {PLAN_FORMAT}; rerun training "
                "to make a new plan"
            )
        plan = make_plan(
            [RowGroup(str(g["path"]), int(g["index"]), int(g["rows"])) for g in data["groups"]],
            int(data["world_size"]),
            int(data["batch_size"]),
            int(data["min_batch"]),
        )
        if plan.to_json() != data:
            raise TrainingError(
                "the shard plan's rows, steps_per_epoch or rank_rows do not follow from its "
                "groups; the file was edited: rerun training to make a new plan"
            )
        return plan

    @property
    def digest(self) -> str:
        canonical = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank must be in 0..{self.world_size - 1}, got {rank}")

    def _too_small_message(self) -> str:
        return (
            f"train.batch_size={self.batch_size} cannot give each of {self.world_size} workers "
            f"{self.steps_per_epoch} batches of at least {self.min_batch} rows from "
            f"{self.rows} rows; raise train.batch_size to at least {2 * self.min_batch}"
        )


def make_plan(
    groups: list[RowGroup],
    world_size: int,
    batch_size: int,
    min_batch: int = 1,
    where: str = "the train split",
) -> ShardPlan:
    for name, value in (
        ("world_size", world_size),
        ("batch_size", batch_size),
        ("min_batch", min_batch),
    ):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if any(g.rows < 1 for g in groups):
        raise ValueError("row groups must hold rows; read_row_groups skips empty ones")
    plan = ShardPlan(list(groups), world_size, batch_size, min_batch)
    if plan.rows < world_size * min_batch:
        raise TrainingError(
            f"{where} has {plan.rows} rows: too few to give each of train.workers="
            f"{world_size} workers at least {min_batch}; lower train.workers or use more data"
        )
    # The smallest share must fill every step with min_batch rows; checked once here so
    # that batch_sizes() cannot fail inside a task.
    if plan.rank_rows(world_size - 1) < plan.steps_per_epoch * min_batch:
        raise TrainingError(plan._too_small_message())
    return plan


def _entropy(seed: int, *more: int) -> list[int]:
    if seed < 0:
        # numpy's SeedSequence takes non-negative entropy only.
        raise TrainingError(f"train.seed must be >= 0 for the shard plan, got {seed}")
    return [seed, *more]
