"""Checkpoints: what a relaunched barrier stage needs to continue exactly where the
failed one stopped.

Spark does not retry a failed barrier result stage, so the driver relaunches it and
the ranks resume from the latest checkpoint. A checkpoint is taken between two steps,
at position (epoch, step) = the next step to run, and holds everything the rest of the
run depends on: weights, optimizer, scheduler and early-stopping state, the best
weights so far, the history, every rank's RNG state and partial-epoch sums, and the
fingerprint of the config and shards it belongs to. The data position needs no more
than (epoch, step): the shard plan derives every rank's rows from it.

Files are written by rank 0 to a temporary name and renamed, through fsspec, so the
folder may be a Hadoop or object-store URL on a cluster; a reader never sees half a
checkpoint. Loading uses torch.load(weights_only=True): tensors and plain values only.
"""

from __future__ import annotations

import io
import logging
import re

import fsspec
import torch

from sparknet.errors import TrainingError

log = logging.getLogger(__name__)

FORMAT = 1
NAME = re.compile(r"epoch(\d{4})-step(\d{6})\.pt$")


def name_of(epoch: int, step: int) -> str:
    return f"epoch{epoch:04d}-step{step:06d}.pt"


def _fs(directory: str):
    return fsspec.core.url_to_fs(str(directory))


def _listing(directory: str) -> list[tuple[int, int, str]]:
    """(epoch, step, path) of every finished checkpoint in `directory`, oldest first."""
    fs, root = _fs(directory)
    if not fs.exists(root):
        return []
    found = []
    for path in fs.ls(root, detail=False):
        match = NAME.search(str(path))
        if match:
            found.append((int(match[1]), int(match[2]), str(path)))
    return sorted(found)


def save(directory: str, state: dict, keep: int) -> str:
    """Writes `state` as checkpoint (state["epoch"], state["step"]) and prunes to the
    last `keep`, always keeping the latest one taken at an epoch boundary."""
    fs, root = _fs(directory)
    fs.makedirs(root, exist_ok=True)
    path = f"{root.rstrip('/')}/{name_of(state['epoch'], state['step'])}"
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, **state}, buffer)
    tmp = path + ".tmp"
    with fs.open(tmp, "wb") as out:
        out.write(buffer.getvalue())
    fs.mv(tmp, path)
    listing = _listing(directory)
    boundary = [entry for entry in listing if entry[1] == 0][-1:]
    for entry in listing[:-keep]:
        if entry not in boundary:
            fs.rm(entry[2])
    return path


def load(path: str) -> dict:
    fs, local = _fs(path)
    with fs.open(local, "rb") as source:
        state = torch.load(io.BytesIO(source.read()), weights_only=True)
    if state.get("format") != FORMAT:
        raise TrainingError(f"{path} is not a sparknet checkpoint of format {FORMAT}")
    return state


def latest(
    directory: str, fingerprint: str, epoch_boundary: bool = False
) -> tuple[str, dict] | None:
    """The newest checkpoint of this run's config and shards (only one taken at an
    epoch boundary when `epoch_boundary`), or None."""
    for _, step, path in reversed(_listing(directory)):
        if epoch_boundary and step != 0:
            continue
        state = load(path)
        if state["fingerprint"] == fingerprint:
            return path, state
    return None


def clear_stale(directory: str, fingerprint: str) -> list[str]:
    """Removes checkpoints of another config or other shards: resuming from them would
    silently mix two runs."""
    fs, _ = _fs(directory)
    removed = []
    for _, _, path in _listing(directory):
        if load(path)["fingerprint"] != fingerprint:
            fs.rm(path)
            removed.append(path)
    return removed
