"""Streaming a rank's share of a split from Parquet with Petastorm, as arrays.

`iterate_rank` follows the shard plan (sparknet/train/plan.py): the rank's slices of
row groups, cut into exactly the batches the plan lists, the same number on every rank.

NOTE [petastorm thread pool]: petastorm 0.13.1's "thread" reader pool can end a
reader before it has read anything: ThreadPool.get_results checks "all workers done"
and then "ventilator completed" as two separate reads, and when the ventilator thread
hands out every item in between, the reader raises end-of-data with no rows (measured
here: 3 of 30 readers over 2 row groups returned nothing). So petastorm runs with its
synchronous "dummy" pool, and one prefetch thread of ours reads ahead so that
reading still overlaps compute.

NOTE [reader threads]: with the dummy pool, petastorm's `workers_count` sizes nothing;
the threads that read are our prefetch thread and Arrow's CPU pool, which decodes a row
group's columns in parallel. That pool is process-wide and as large as the machine by
default, so `iterate_rank` sizes it to the cores the Spark task was given
(`reader_threads`: spark.task.cpus, 1 unless configured), leaving the other cores to
their own tasks. Measured on the flights train shards (14 row groups x 117 float32
columns, 2 cores): one rank read about 0.6-0.7 M rows/s with 1 and with 2 decode threads
alike, alone or next to a second rank, because decoding is under a fifth of the time;
petastorm's per-column pandas conversion and our row gather cost more.
"""

from __future__ import annotations

import queue
import re
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from sparknet.errors import TrainingError
from sparknet.shard import LABEL, SAMPLE_ID
from sparknet.train.plan import ShardPlan, Slice

Batch = tuple[np.ndarray, np.ndarray, np.ndarray]


def dataset_url(path: str | Path) -> str:
    text = str(path)
    return text if "://" in text else Path(text).resolve().as_uri()


def local_filesystem():
    """petastorm's own choice for file:// URLs, pyarrow's legacy LocalFileSystem, opens
    Python file objects; pyarrow's C++ threads then call into Python to read them and may
    run the garbage collector there, which aborted the process ("terminate called without
    an active exception") in about half of our runs. Native Arrow files avoid both."""
    import pyarrow as pa
    from pyarrow.filesystem import LocalFileSystem

    class NativeFileLocalFileSystem(LocalFileSystem):
        def open(self, path, mode="rb"):
            if mode == "rb":
                return pa.OSFile(str(path), "rb")
            return super().open(path, mode)

    return NativeFileLocalFileSystem()


def quiet_reader_warnings() -> None:
    """Process-wide on purpose: the prefetch thread emits them, where a catch_warnings()
    block in the caller's thread would not reach. pyarrow 12's legacy dataset API (which
    petastorm 0.13 uses) warns on every call, and petastorm leaves files to the GC."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=ResourceWarning)


_DONE = object()


def prefetch(items: Iterator, depth: int) -> Iterator:
    """Runs `items` on a background thread, `depth` items ahead of the consumer.
    Errors reach the consumer; a consumer that stops early stops the thread."""
    if depth <= 0:
        yield from items
        return
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                buffer.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    break
        except BaseException as exc:  # handed to the consumer, re-raised there
            put(exc)
            return
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()
        put(_DONE)

    thread = threading.Thread(target=produce, name="sparknet-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = buffer.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


def iterate_rank(
    plan: ShardPlan,
    rank: int,
    epoch: int,
    seed: int,
    columns: list[str],
    shuffle: bool = True,
    prefetch_row_groups: int = 2,
    reader_threads: int = 1,
    start_step: int = 0,
) -> Iterator[Batch]:
    """This rank's batches for one epoch, exactly `plan.batch_sizes(rank)` of them, in plan
    order: (sample_id int64 (n,), features float32 (n, k), label float32 (n,)).

    Row groups are read `prefetch_row_groups` ahead on a background thread; Arrow decodes
    with `reader_threads` threads (see NOTE [reader threads]). For validation, pass
    shuffle=False and a plan with a large batch size: the rank's share in stored order.
    `start_step` resumes mid-epoch: the batches before it are not read at all."""
    if reader_threads < 1:
        raise ValueError(f"reader_threads must be >= 1, got {reader_threads}")
    sizes = plan.batch_sizes(rank)
    slices = _skip_rows(plan.rank_slices(rank, epoch, seed, shuffle), sum(sizes[:start_step]))
    parts = prefetch(
        _read_slices(plan, slices, epoch, seed, columns, shuffle, reader_threads),
        prefetch_row_groups,
    )
    try:
        yield from _cut_batches(parts, sizes[start_step:], f"rank {rank} epoch {epoch}")
    finally:
        parts.close()


def load_groups(plan: ShardPlan, columns: list[str]) -> list[Batch]:
    """Every row group of the plan decoded into memory, in `plan.groups` order, as the
    reader would return them: (sample_id int64 (n,), features float32 (n, k), label
    float32 (n,)) in stored row order. The in-memory feed (`iterate_memory`) serves the
    same batches from these without reading; it exists so that the benchmark can measure
    what streaming costs, with everything else in the training loop unchanged."""
    import pyarrow.parquet as pq

    quiet_reader_warnings()
    loaded = []
    for group in plan.groups:
        table = pq.ParquetFile(group.path).read_row_group(
            group.index, columns=[SAMPLE_ID, LABEL, *columns]
        )
        if table.num_rows != group.rows:
            raise TrainingError(
                f"{group.path} row group {group.index} holds {table.num_rows} rows, the shard "
                f"plan says {group.rows}: the shards changed after the plan was made"
            )
        x = np.stack([table.column(c).to_numpy() for c in columns], axis=1)
        loaded.append(
            (
                table.column(SAMPLE_ID).to_numpy().astype(np.int64, copy=False),
                x.astype(np.float32, copy=False),
                table.column(LABEL).to_numpy().astype(np.float32, copy=False),
            )
        )
    return loaded


def iterate_memory(
    groups: list[Batch],
    plan: ShardPlan,
    rank: int,
    epoch: int,
    seed: int,
    shuffle: bool = True,
    start_step: int = 0,
) -> Iterator[Batch]:
    """`iterate_rank`'s batches, bitwise the same, gathered from `load_groups`' arrays."""
    sizes = plan.batch_sizes(rank)
    slices = _skip_rows(plan.rank_slices(rank, epoch, seed, shuffle), sum(sizes[:start_step]))

    def parts() -> Iterator[Batch]:
        for part in slices:
            ids, x, y = groups[part.group]
            positions = plan.row_positions(part, epoch, seed, shuffle)
            yield ids[positions].copy(), x[positions].copy(), y[positions].copy()

    yield from _cut_batches(parts(), sizes[start_step:], f"rank {rank} epoch {epoch}")


def _skip_rows(slices: list[Slice], rows: int) -> list[Slice]:
    """`slices` without their first `rows` rows."""
    kept = []
    for part in slices:
        if rows >= part.rows:
            rows -= part.rows
            continue
        kept.append(Slice(part.group, part.start + rows, part.stop))
        rows = 0
    return kept


def _read_slices(
    plan: ShardPlan,
    slices: list[Slice],
    epoch: int,
    seed: int,
    columns: list[str],
    shuffle: bool,
    reader_threads: int,
) -> Iterator[Batch]:
    """One petastorm reader for all the rank's files, in slice order; yields each slice's
    rows (permuted, then cut) in slice order.

    A list of file URLs with shuffle_row_groups=False makes petastorm read the files in
    list order and each file's row groups in index order, and only those files. With one
    row group per file (what the shard stage writes) that is already slice order. A file
    with several row groups is read whole, and row groups this rank does not need are
    dropped, those it needs later are held until their turn: correct, but slower and
    holding more memory."""
    quiet_reader_warnings()
    import pyarrow as pa
    from petastorm import make_batch_reader

    if not slices:
        return
    pa.set_cpu_count(reader_threads)
    wanted = {part.group: part for part in slices}
    files = list(dict.fromkeys(plan.groups[part.group].path for part in slices))
    groups_of_file: dict[str, list[int]] = {}
    for number, group in enumerate(plan.groups):
        groups_of_file.setdefault(group.path, []).append(number)
    # What petastorm will hand back, one item per non-empty row group; empty ones are
    # not in the plan and petastorm publishes nothing for them either.
    arriving = [
        number
        for path in files
        for number in sorted(groups_of_file[path], key=lambda n: plan.groups[n].index)
    ]

    urls = [dataset_url(path) for path in files]
    missing = [path for path in files if "://" not in path and not Path(path).is_file()]
    if missing:
        raise TrainingError(
            f"shard file(s) {missing} are gone: the shards changed after the plan was made; "
            "rerun the shard and train stages"
        )
    reader = make_batch_reader(
        urls,
        schema_fields=[re.escape(name) for name in (SAMPLE_ID, LABEL, *columns)],
        filesystem=local_filesystem() if urls[0].startswith("file://") else None,
        reader_pool_type="dummy",
        shuffle_row_groups=False,
        shuffle_rows=False,
        num_epochs=1,
    )
    held: dict[int, Batch] = {}
    emitted = 0
    try:
        for arrived, batch in enumerate(reader):
            if arrived == len(arriving):
                raise TrainingError(
                    f"petastorm returned more row groups from {files} than the shard plan "
                    "lists: the shards changed after the plan was made; rerun training"
                )
            number = arriving[arrived]
            group = plan.groups[number]
            if len(getattr(batch, SAMPLE_ID)) != group.rows:
                raise TrainingError(
                    f"{group.path} row group {group.index} holds "
                    f"{len(getattr(batch, SAMPLE_ID))} rows, the shard plan says {group.rows}: "
                    "the shards changed after the plan was made; rerun training"
                )
            if number in wanted:
                part = wanted[number]
                held[number] = _slice_columns(plan, batch, part, epoch, seed, columns, shuffle)
            while emitted < len(slices) and slices[emitted].group in held:
                yield held.pop(slices[emitted].group)
                emitted += 1
    finally:
        # Not `with reader`: its exit prints "Cache cleanup complete." to stdout.
        reader.stop()
        reader.join()
    if emitted < len(slices):
        missing = plan.groups[slices[emitted].group]
        raise TrainingError(
            f"petastorm returned no rows for {missing.path} row group {missing.index}: the "
            "shards changed after the plan was made; rerun training"
        )


def _slice_columns(
    plan: ShardPlan, batch, part: Slice, epoch: int, seed: int, columns: list[str], shuffle: bool
) -> Batch:
    """The slice's rows of one row group as fresh, writable arrays (Arrow's buffers are
    read-only; torch wants to own its memory)."""
    positions = plan.row_positions(part, epoch, seed, shuffle)
    ids = np.array(getattr(batch, SAMPLE_ID)[positions], dtype=np.int64)
    y = np.array(getattr(batch, LABEL)[positions], dtype=np.float32)
    feature_columns = [getattr(batch, c) for c in columns]
    if isinstance(positions, slice):
        x = np.stack([column[positions] for column in feature_columns], axis=1)
    else:
        # Stacking first, then gathering whole rows, took 6-7 ms per 16k x 117 row group
        # here against 11-12 ms for gathering each column before stacking.
        x = np.stack(feature_columns, axis=1)[positions]
    return ids, x.astype(np.float32, copy=False), y


def _cut_batches(parts: Iterator[Batch], sizes: list[int], where: str) -> Iterator[Batch]:
    """Re-cuts a stream of slices into batches of exactly `sizes`; a batch spanning two
    slices is the one place rows are concatenated."""
    pending: list[Batch] = []
    held = 0
    step = 0
    for part in parts:
        pending.append(part)
        held += len(part[0])
        while step < len(sizes) and held >= sizes[step]:
            if len(pending) == 1:
                ids, x, y = pending[0]
            else:
                ids, x, y = (np.concatenate(c) for c in zip(*pending, strict=True))
            size = sizes[step]
            yield ids[:size], x[:size], y[:size]
            pending = [(ids[size:], x[size:], y[size:])] if held > size else []
            held -= size
            step += 1
    if step != len(sizes) or held:
        raise TrainingError(
            f"{where}: read {sum(sizes[:step]) + held} rows, the shard plan expects "
            f"{sum(sizes)} in {len(sizes)} batches; the shards changed after the plan was made"
        )
