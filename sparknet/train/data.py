"""Streaming a rank's share of a split from Parquet with Petastorm, as arrays.

Petastorm deals row groups to ranks round-robin (`cur_shard=rank`,
`shard_count=world_size`); the ranks' shares are disjoint and together cover the
split. Row-group order is shuffled with `seed + epoch`, and rows inside a row group
are permuted with the same seed, so every rank and every rerun agree on the order.

NOTE [petastorm thread pool]: petastorm 0.13.1's "thread" reader pool can end a
reader before it has read anything: ThreadPool.get_results checks "all workers done"
and then "ventilator completed" as two separate reads, and when the ventilator thread
hands out every item in between, the reader raises end-of-data with no rows (measured
here: 3 of 30 readers over 2 row groups returned nothing). So petastorm runs with its
synchronous "dummy" pool, and one prefetch thread of ours reads ahead so that
reading still overlaps compute.
"""

from __future__ import annotations

import queue
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from sparknet.shard import LABEL, SAMPLE_ID

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


def iterate_row_groups(
    path: str | Path,
    columns: list[str],
    rank: int,
    world_size: int,
    seed: int,
    epoch: int,
    prefetch_row_groups: int = 2,
    shuffle: bool = True,
) -> Iterator[Batch]:
    """This rank's row groups for one epoch, read `prefetch_row_groups` ahead: yields
    (sample_id int64 (n,), features float32 (n, k), label float32 (n,)) per row group,
    converting column-wise."""

    def read() -> Iterator[Batch]:
        quiet_reader_warnings()
        from petastorm import make_batch_reader

        url = dataset_url(path)
        reader = make_batch_reader(
            url,
            filesystem=local_filesystem() if url.startswith("file://") else None,
            cur_shard=rank,
            shard_count=world_size,
            num_epochs=1,
            shuffle_row_groups=shuffle,
            seed=seed + epoch,
            reader_pool_type="dummy",
        )
        rng = np.random.default_rng(seed + epoch)
        try:
            for batch in reader:
                # Copies: Arrow's buffers are read-only, and torch wants writable arrays.
                ids = np.array(getattr(batch, SAMPLE_ID), dtype=np.int64)
                x = np.column_stack([getattr(batch, c) for c in columns]).astype(
                    np.float32, copy=False
                )
                y = np.array(getattr(batch, LABEL), dtype=np.float32)
                if shuffle:
                    order = rng.permutation(len(ids))
                    ids, x, y = ids[order], x[order], y[order]
                yield ids, x, y
        finally:
            # Not `with reader`: its exit prints "Cache cleanup complete." to stdout.
            reader.stop()
            reader.join()

    return prefetch(read(), prefetch_row_groups)


def rebatch(groups: Iterator[Batch], batch_size: int) -> Iterator[Batch]:
    """Cuts a stream of row groups into batches of `batch_size`; the short last batch of
    an epoch is kept, not dropped or padded, so every sample is trained on once."""
    pending: list[Batch] = []
    held = 0
    for group in groups:
        pending.append(group)
        held += len(group[0])
        if held < batch_size:
            continue
        ids, x, y = (np.concatenate(parts) for parts in zip(*pending, strict=True))
        cut = (len(ids) // batch_size) * batch_size
        for start in range(0, cut, batch_size):
            stop = start + batch_size
            yield ids[start:stop], x[start:stop], y[start:stop]
        pending = [(ids[cut:], x[cut:], y[cut:])] if cut < len(ids) else []
        held = len(ids) - cut
    if held:
        yield tuple(np.concatenate(parts) for parts in zip(*pending, strict=True))  # type: ignore[misc]
