"""Streaming a rank's share of a split from Parquet with Petastorm, as tensors.

Petastorm deals row groups to ranks round-robin (`cur_shard=rank`,
`shard_count=world_size`); the ranks' shares are disjoint and together cover the
split. Row-group order is shuffled with `seed + epoch`, and rows inside a row group
are permuted with the same seed, so a rerun sees the same order.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from sparknet.shard import LABEL, SAMPLE_ID


def dataset_url(path: str | Path) -> str:
    text = str(path)
    return text if "://" in text else Path(text).resolve().as_uri()


def quiet_reader_warnings() -> None:
    """Process-wide on purpose: petastorm's reader threads emit them, where a
    catch_warnings() block in this thread would not reach. pyarrow 12's legacy dataset
    API (which petastorm 0.13 uses) warns on every call, and petastorm leaves files to
    the garbage collector."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=ResourceWarning)


def iterate_row_groups(
    path: str | Path,
    columns: list[str],
    rank: int,
    world_size: int,
    seed: int,
    epoch: int,
    reader_threads: int,
    shuffle: bool = True,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yields (sample_id int64 (n,), features float32 (n, k), label float32 (n,)) per
    Petastorm batch, converting column-wise."""
    quiet_reader_warnings()
    from petastorm import make_batch_reader

    reader = make_batch_reader(
        dataset_url(path),
        cur_shard=rank,
        shard_count=world_size,
        num_epochs=1,
        shuffle_row_groups=shuffle,
        seed=seed + epoch,
        reader_pool_type="thread",
        workers_count=reader_threads,
    )
    rng = np.random.default_rng(seed + epoch)
    try:
        for batch in reader:
            ids = np.asarray(getattr(batch, SAMPLE_ID), dtype=np.int64)
            x = np.column_stack([getattr(batch, c) for c in columns]).astype(np.float32, copy=False)
            y = np.asarray(getattr(batch, LABEL), dtype=np.float32)
            if shuffle:
                order = rng.permutation(len(ids))
                ids, x, y = ids[order], x[order], y[order]
            yield ids, x, y
    finally:
        # Not `with reader`: its exit prints "Cache cleanup complete." to stdout.
        reader.stop()
        reader.join()


def rebatch(
    groups: Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]], batch_size: int
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Cuts a stream of row groups into batches of `batch_size`; the short last batch of
    an epoch is kept, not dropped or padded, so every sample is trained on once."""
    pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    held = 0
    for group in groups:
        pending.append(group)
        held += len(group[0])
        if held < batch_size:
            continue
        ids, x, y = (np.concatenate(parts) for parts in zip(*pending))
        cut = (len(ids) // batch_size) * batch_size
        for start in range(0, cut, batch_size):
            stop = start + batch_size
            yield ids[start:stop], x[start:stop], y[start:stop]
        pending = [(ids[cut:], x[cut:], y[cut:])] if cut < len(ids) else []
        held = len(ids) - cut
    if held:
        yield tuple(np.concatenate(parts) for parts in zip(*pending))  # type: ignore[misc]
