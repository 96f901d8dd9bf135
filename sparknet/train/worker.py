"""What runs inside one Spark barrier task: one torch.distributed rank.

Spark task (partition p of the barrier stage) == torch rank p. The task learns the
world from BarrierTaskContext, rank 0 opens the rendezvous store on a free port and
shares it through allGather, then every rank trains its Petastorm share under
DistributedDataParallel, which averages gradients across ranks after each backward.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import math
import os
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sparknet.errors import TrainingError

if TYPE_CHECKING:
    from sparknet.train.model import ModelSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskSpec:
    """Everything a rank needs, copied out of the config on the driver so the closure
    shipped to executors holds plain values."""

    train_path: str
    model_path: str  # rank 0 writes model.json + model.pt here (shared storage on a cluster)
    validation_path: str
    # The network to build and what its outputs mean; for regression it already holds
    # the train split's target mean/std, so every rank standardises with the same values.
    model: ModelSpec
    optimizer: str
    learning_rate: float
    weight_decay: float
    epochs: int
    batch_size: int
    seed: int
    device: str
    prefetch_row_groups: int
    timeout_s: float

    def share(self, path: str, rank: int, world_size: int, epoch: int, shuffle: bool = True):
        """This rank's row groups of the split at `path` for `epoch`."""
        from sparknet.train.data import iterate_row_groups

        return iterate_row_groups(
            path,
            self.model.columns,
            rank,
            world_size,
            self.seed,
            epoch,
            self.prefetch_row_groups,
            shuffle=shuffle,
        )


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def choose_backend(device: str):
    import torch

    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise TrainingError("train.device=cuda but torch sees no CUDA device in this task")
    return ("nccl", "cuda") if use_cuda else ("gloo", "cpu")


def init_process_group(context, backend: str, timeout_s: float) -> tuple[int, int]:
    """Rendezvous through the barrier: rank 0 binds a free port (port 0, so two runs on
    one machine never collide), allGather hands it to the others."""
    import torch.distributed as dist

    rank = context.partitionId()
    infos = context.getTaskInfos()
    world_size = len(infos)
    master_addr = infos[0].address.rsplit(":", 1)[0]
    timeout = datetime.timedelta(seconds=timeout_s)
    if is_loopback(master_addr):
        # Keep gloo's own connections on loopback too, not the machine's first interface.
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")

    store = None
    if rank == 0:
        store = dist.TCPStore(
            master_addr, 0, world_size, is_master=True, timeout=timeout, wait_for_workers=False
        )
        port = store.port
    else:
        port = 0
    ports = context.allGather(str(port))
    port = int(ports[0])
    if store is None:
        store = dist.TCPStore(master_addr, port, world_size, is_master=False, timeout=timeout)

    # torch's environment contract, for user code that reads it.
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK="0",
        MASTER_ADDR=master_addr,
        MASTER_PORT=str(port),
    )
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    return rank, world_size


def weights_digest(model) -> str:
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def run_rank(spec: TaskSpec) -> dict:
    """Trains one rank; returns its report (rank 0's also carries the weights)."""
    from pyspark import BarrierTaskContext

    from sparknet.logs import set_stage, setup_logging

    # Executors have no handler of ours: without one, rank 0's epoch lines vanish.
    # (In local mode they reach the console; on a cluster, the executor's stderr log.)
    setup_logging()
    set_stage("train")
    context = BarrierTaskContext.get()
    rank = context.partitionId()
    try:
        return _train(spec, context)
    except TrainingError:
        raise
    except Exception as exc:
        # A plain message survives the trip to the driver; the traceback rides along.
        raise TrainingError(
            f"rank {rank} failed: {type(exc).__name__}: {exc}\n{traceback.format_exc()}"
        ) from None


def _train(spec: TaskSpec, context) -> dict:
    import torch
    from torch.nn.parallel import DistributedDataParallel

    from sparknet.train.data import rebatch
    from sparknet.train.model import build_mlp, save_model, state_to_bytes, task_loss

    threads = max(1, int(context.cpus()))
    torch.set_num_threads(threads)
    backend, device_type = choose_backend(spec.device)
    rank, world_size = init_process_group(context, backend, spec.timeout_s)
    if device_type == "cuda":
        gpus = context.resources().get("gpu")
        index = int(gpus.addresses[0]) if gpus and gpus.addresses else 0
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")

    try:
        torch.manual_seed(spec.seed)  # same initial weights on every rank
        model_spec = spec.model
        model = build_mlp(model_spec).to(device)
        ddp = DistributedDataParallel(
            model, device_ids=[device.index] if device.index is not None else None
        )
        optimizer = _optimizer(spec, ddp.parameters())

        history = []
        for epoch in range(spec.epochs):
            started = time.perf_counter()
            ddp.train()
            # Accounting of the samples this rank saw: count, sum and sum of squares of
            # the dense sample ids; summed over ranks they identify "each id exactly once".
            seen = torch.zeros(3, dtype=torch.float64)
            loss_sum = torch.zeros(2, dtype=torch.float64)
            groups = spec.share(spec.train_path, rank, world_size, epoch)
            # Ranks may hold a few rows more or less (whole row groups are dealt);
            # join() lets the early finisher shadow the others' allreduces instead of
            # leaving them waiting forever.
            with ddp.join():
                for ids, x, y in rebatch(groups, spec.batch_size):
                    features = torch.from_numpy(x).to(device, non_blocking=True)
                    target = torch.from_numpy(y).to(device, non_blocking=True)
                    optimizer.zero_grad(set_to_none=True)
                    # (batch, n_outputs) raw outputs; task_loss squeezes or casts per task.
                    loss = task_loss(model_spec, ddp(features), target)
                    loss.backward()
                    optimizer.step()
                    ids_f = ids.astype(np.float64)
                    seen += torch.tensor(
                        [len(ids), ids_f.sum(), (ids_f * ids_f).sum()], dtype=torch.float64
                    )
                    loss_sum += torch.tensor(
                        [loss.item() * len(ids), len(ids)], dtype=torch.float64
                    )
            rank_samples = int(seen[0].item())
            totals = torch.cat([seen, loss_sum]).to(device)
            all_reduce(totals)
            totals = totals.cpu()
            train_loss = float(totals[3] / max(totals[4], 1))
            if not math.isfinite(train_loss):
                # Every rank sees the same summed loss, so all stop here together.
                raise TrainingError(
                    f"epoch {epoch}: the training loss is {train_loss}; lower "
                    f"train.learning_rate (now {spec.learning_rate}) or check the shards for "
                    "extreme values"
                )
            validation = _validate(spec, model, rank, world_size, epoch, device)
            elapsed = time.perf_counter() - started
            record = {
                "epoch": epoch,
                "train_loss": train_loss,
                **validation,
                "samples": int(totals[0]),
                "sample_id_sum": float(totals[1]),
                "sample_id_square_sum": float(totals[2]),
                "rank_samples": rank_samples,
                "seconds": elapsed,
            }
            history.append(record)
            if rank == 0:
                log.info(
                    "rank 0/%d epoch %d: train loss %.4f, %s, %d samples in %.1f s",
                    world_size,
                    epoch,
                    record["train_loss"],
                    validation_summary(model_spec.task, record),
                    record["samples"],
                    elapsed,
                )
        result = {
            "rank": rank,
            "world_size": world_size,
            "backend": backend,
            "torch_threads": threads,
            "history": history,
            "weights_digest": weights_digest(model),
        }
        if rank == 0:
            save_model(Path(spec.model_path), model_spec, state_to_bytes(model))
        return result
    finally:
        # DDP's Reducer holds the process group: release it first, see shut_down().
        ddp = optimizer = model = None
        shut_down(spec.timeout_s)


# NOTE [gloo teardown]: torch 2.13's ProcessGroupGloo destructor joins its worker
# threads while the caller holds the GIL, and a worker thread that is still releasing a
# finished collective (one whose tensors have Python objects) waits for the GIL: a
# deadlock we hit in about one run in fifteen, at the end of training. So collectives
# are awaited and released by this thread (all_reduce below), the process group is
# destroyed only after a pause without the GIL, and a watchdog ends the Python worker
# if teardown still hangs, so Spark fails the task instead of waiting forever.
EXIT_TEARDOWN_HUNG = 70
_finished_work: list = []


def all_reduce(tensor) -> None:
    """Sums `tensor` across ranks in place; keeps the work object so that it is released
    here, not on gloo's thread."""
    import torch.distributed as dist

    work = dist.all_reduce(tensor, async_op=True)
    work.wait()
    _finished_work.append(work)


def shut_down(timeout_s: float) -> None:
    import gc
    import sys
    import threading

    import torch.distributed as dist

    def give_up() -> None:
        print(
            f"sparknet: torch.distributed teardown hung for {timeout_s} s; exiting the "
            "Python worker so that Spark fails the task",
            file=sys.stderr,
            flush=True,
        )
        os._exit(EXIT_TEARDOWN_HUNG)

    watchdog = threading.Timer(timeout_s, give_up)
    watchdog.daemon = True
    watchdog.start()
    try:
        gc.collect()
        time.sleep(0.2)  # gloo's threads finish releasing work while we hold no GIL
        if dist.is_initialized():
            dist.destroy_process_group()
        _finished_work.clear()
    finally:
        watchdog.cancel()


def _optimizer(spec: TaskSpec, params):
    import torch

    if spec.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=spec.learning_rate, momentum=0.9, weight_decay=spec.weight_decay
        )
    cls = torch.optim.AdamW if spec.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=spec.learning_rate, weight_decay=spec.weight_decay)


def validation_summary(task: str, record: dict) -> str:
    """The validation part of an epoch's log line."""
    if task == "regression":
        return (
            f"validation loss {record['validation_loss']:.4f} (standardised MSE), "
            f"RMSE {record['validation_rmse']:.4g}"
        )
    return (
        f"validation loss {record['validation_loss']:.4f}, "
        f"accuracy {record['validation_accuracy']:.4f}"
    )


def _validate(spec: TaskSpec, model, rank: int, world_size: int, epoch: int, device) -> dict:
    """The validation split's mean loss (the training loss, so the two compare) and
    accuracy (classification) or RMSE in the target's own unit (regression); each rank
    scores its share, allreduce sums."""
    import torch

    from sparknet.train.model import predict, task_loss

    model_spec = spec.model
    model.eval()
    # loss * n, then correct predictions (classification) or squared error in the
    # original unit (regression), then n
    sums = torch.zeros(3, dtype=torch.float64)
    with torch.no_grad():
        for _, x, y in spec.share(spec.validation_path, rank, world_size, epoch, shuffle=False):
            output = model(torch.from_numpy(x).to(device)).cpu().double()
            target = torch.from_numpy(y).double()
            loss = task_loss(model_spec, output, target, reduction="sum")
            predicted = predict(model_spec, output)
            if model_spec.task == "regression":
                quality = ((predicted - target) ** 2).sum()
            elif model_spec.task == "multiclass":
                quality = (predicted.argmax(dim=1) == target.long()).sum()
            else:
                # The logit's sign, not sigmoid > 0.5, which rounds tiny logits to 0.5.
                quality = ((output.squeeze(1) > 0).double() == target).sum()
            sums += torch.tensor([loss.item(), quality.item(), len(y)], dtype=torch.float64)
    sums = sums.to(device)
    all_reduce(sums)
    sums = sums.cpu()
    n = max(float(sums[2]), 1.0)
    result = {"validation_loss": float(sums[0]) / n}
    if model_spec.task == "regression":
        result["validation_rmse"] = math.sqrt(float(sums[1]) / n)
    else:
        result["validation_accuracy"] = float(sums[1]) / n
    result["validation_rows"] = int(sums[2])
    return result
