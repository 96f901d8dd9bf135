"""What runs inside one Spark barrier task: one torch.distributed rank.

Spark task (partition p of the barrier stage) == torch rank p. The task learns the
world from BarrierTaskContext, rank 0 opens the rendezvous store on a free port and
shares it through allGather, then every rank trains its share of the driver's shard
plan under DistributedDataParallel, which averages gradients across ranks after each
backward.

Why the result equals one process training on the union of the ranks' batches: every
rank does the same number of steps (the plan guarantees it), each scales its summed
loss by world_size / rows-in-this-step-on-all-ranks, so DDP's average is the mean over
the step's rows however they are spread; tests/test_distributed.py checks the weights
against a single process to 1e-5.

Why it never hangs: a non-finite loss on any rank makes the averaged gradient
non-finite on every rank in the same step, so all stop together (a loss that overflows
while its gradient stays finite is caught, again by all ranks together, in the epoch's
closing allreduce); a rank that raises tells the driver before it dies;
one that exits or stalls is found by the driver's watchdog (events.py), which cancels
the job.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import math
import os
import socket
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sparknet.errors import TrainingError

if TYPE_CHECKING:
    from sparknet.config import TrainConfig
    from sparknet.train.events import EventClient
    from sparknet.train.model import ModelSpec
    from sparknet.train.plan import ShardPlan

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskSpec:
    """Everything a rank needs, made on the driver, so the closure shipped to executors
    holds plain values."""

    train_path: str
    validation_path: str
    model_path: str  # rank 0 writes model.json + model.pt here (shared storage on a cluster)
    # The network to build and what its outputs mean; for regression it already holds
    # the train split's target mean/std, so every rank standardises with the same values.
    model: ModelSpec
    train: TrainConfig
    train_plan: ShardPlan
    validation_plan: ShardPlan
    events: tuple[str, int]  # the driver's event server, see events.py
    token: str
    checkpoint_dir: str  # local path or fsspec URL, see checkpoint.py
    fingerprint: str  # of the config and shards: checkpoints of anything else are refused
    resume_from: str | None = None  # the checkpoint this launch continues from
    attempt: int = 0  # launches before this one
    # "stream": Petastorm reads the shards every epoch (what users run); "memory": the
    # rank decodes every row group once before training and gathers the same batches
    # from memory, the benchmark's yardstick for what streaming costs (data.py).
    feed: str = "stream"


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def listening_store(host: str, world_size: int, timeout: datetime.timedelta):
    """Rank 0's TCPStore server on a free port of `host`'s first address, and on no
    other interface: torch's server listens on every interface when it binds the port
    itself, so it is handed a socket bound here (the store owns and closes it)."""
    import torch.distributed as dist

    try:
        infos = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise TrainingError(
            f"the rendezvous address {host!r}, which Spark reported for barrier task 0, "
            f"does not resolve on that task's machine: {exc}"
        ) from exc
    family, _, _, _, address = infos[0]
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address)
        listener.listen(socket.SOMAXCONN)
    except OSError as exc:
        listener.close()
        raise TrainingError(
            f"cannot listen on {host} ({address[0]}) for the rendezvous: {exc}"
        ) from exc
    return dist.TCPStore(
        host,
        listener.getsockname()[1],
        world_size,
        is_master=True,
        timeout=timeout,
        wait_for_workers=False,
        master_listen_fd=listener.detach(),
    )


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
        # On the address Spark reported for this task: loopback in local mode.
        store = listening_store(master_addr, world_size, timeout)
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
    """Trains one rank; returns its report. Whatever happens, the driver hears about it
    through the event channel first: the exception that reaches it through Spark is a
    Py4J error, or nothing at all when the process dies."""
    from pyspark import BarrierTaskContext

    from sparknet.logs import add_handler, set_rank, set_stage
    from sparknet.train.events import EventClient

    context = BarrierTaskContext.get()
    rank = context.partitionId()
    events = EventClient(spec.events, spec.token, rank, spec.train.timeout_s)
    # This rank's records go to the driver, which prints them in its own log (the one
    # Airflow and spark-submit users read), not to the executor's stderr.
    set_stage("train")
    set_rank(rank)
    forward = add_handler(events.handler())
    finished = False
    try:
        result = _train(spec, context, events)
        finished = True
        return result
    except BaseException as exc:
        if isinstance(exc, TrainingError):
            message, show_traceback = str(exc), False
        else:
            message, show_traceback = f"{type(exc).__name__}: {exc}", True
        events.error(message, traceback.format_exc(), show_traceback)
        # A plain message survives the trip to the driver.
        raise TrainingError(f"rank {rank} failed: {message}") from None
    finally:
        logging.getLogger("sparknet").removeHandler(forward)
        # Spark reuses this Python worker for other tasks, which are no rank.
        set_stage("-")
        set_rank("-")
        events.close(done=finished)


@dataclass
class Resumed:
    """Where this launch starts: from scratch, or from a checkpoint (checkpoint.py)."""

    epoch: int = 0
    step: int = 0
    stopped: bool = False
    history: list = field(default_factory=list)
    best_state: dict | None = None
    state: dict | None = None
    same_world: bool = True

    @classmethod
    def fresh(cls) -> Resumed:
        return cls()

    @classmethod
    def load(cls, spec: TaskSpec, rank: int, steps: int) -> Resumed:
        from sparknet.train import checkpoint

        state = checkpoint.load(spec.resume_from)
        if state["fingerprint"] != spec.fingerprint:
            raise TrainingError(
                f"{spec.resume_from} belongs to another config or other shards; it cannot be "
                "resumed"
            )
        same = state["world_size"] == spec.train_plan.world_size
        if not same and state["step"] != 0:
            raise TrainingError(
                f"{spec.resume_from} was taken mid-epoch with {state['world_size']} ranks; "
                f"with {spec.train_plan.world_size} the plan differs, so only a checkpoint "
                "taken at an epoch boundary can be resumed"
            )
        return cls(
            epoch=state["epoch"],
            step=state["step"],
            stopped=state["stopped"],
            history=list(state["history"]),
            best_state=state["best_state"],
            state=state,
            same_world=same,
        )

    def restore(self, model, optimizer, scheduler, stopper, rank: int, steps: int, seed: int):
        import torch

        s = self.state
        model.load_state_dict(s["model"])
        optimizer.load_state_dict(s["optimizer"])
        stopper.load_state_dict(s["stopper"])
        if self.same_world:
            scheduler.load_state_dict(s["scheduler"])
            torch.set_rng_state(s["rng"][rank])
            return
        # Another world size, another plan: the schedule is re-counted in this plan's
        # steps from the epoch boundary, and dropout masks start from a fresh seed.
        position = self.epoch * steps + self.step
        scheduler.last_epoch = position
        for group, base, factor in zip(
            optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True
        ):
            group["lr"] = base * factor(position)
        torch.manual_seed(seed + 1 + rank + 7919 * (self.epoch + 1))

    def partial(self, epoch: int, rank: int) -> tuple[np.ndarray, np.ndarray, float]:
        """The sums of an epoch the checkpoint was taken in the middle of."""
        if self.state is not None and epoch == self.epoch and self.step > 0:
            part = self.state["partial"]
            return (
                np.array(part["seen"][rank], dtype=np.int64),
                np.array(part["loss_total"][rank], dtype=np.float64),
                float(part["waited"][rank]),
            )
        return np.zeros(3, dtype=np.int64), np.zeros(3), 0.0

    def position(self) -> dict | None:
        if self.state is None:
            return None
        return {"epoch": self.epoch, "step": self.step, "world_size": self.state["world_size"]}


def _checkpoint(
    spec: TaskSpec,
    rank: int,
    world_size: int,
    device,
    events: EventClient,
    epoch: int,
    step: int,
    steps: int,
    model,
    optimizer,
    scheduler,
    stopper,
    best_state,
    history: list,
    partial,
    stopped: bool,
) -> None:
    """A collective: every rank hands rank 0 its RNG state (and its sums of a partial
    epoch); rank 0 writes. Called at the same steps on every rank."""
    import torch

    from sparknet.train import checkpoint

    rng = _gather_equal(torch.get_rng_state(), world_size, device)
    seen = waited = loss_total = None
    if partial is not None:
        seen = [r.tolist() for r in _gather_equal(torch.from_numpy(partial[0]), world_size, device)]
        losses = torch.from_numpy(partial[1])
        loss_total = [r.tolist() for r in _gather_equal(losses, world_size, device)]
        mine = torch.tensor([partial[2]], dtype=torch.float64)
        waited = [float(r[0]) for r in _gather_equal(mine, world_size, device)]
    if rank != 0:
        return
    state = {
        "fingerprint": spec.fingerprint,
        "world_size": world_size,
        "plan_digest": spec.train_plan.digest,
        "epoch": epoch,
        "step": step,
        "global_step": epoch * steps + step,
        "stopped": stopped,
        "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "stopper": _plain(stopper.state_dict()),
        "best_state": best_state,
        "history": _plain(history),
        "rng": [r.to(torch.uint8) for r in rng],
        "partial": None
        if partial is None
        else {"seen": seen, "waited": waited, "loss_total": loss_total},
    }
    path = checkpoint.save(spec.checkpoint_dir, state, spec.train.checkpoint.keep)
    events.send(type="checkpoint", epoch=epoch, step=step, path=path)


def _plain(value):
    """numpy scalars as Python numbers: torch.load(weights_only=True) refuses numpy."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _gather_equal(tensor, world_size: int, device) -> list:
    """Every rank's `tensor` (same shape and dtype on all), in rank order, on the CPU."""
    import torch
    import torch.distributed as dist

    parts = [torch.empty_like(tensor, device=device) for _ in range(world_size)]
    work = dist.all_gather(parts, tensor.to(device), async_op=True)
    work.wait()
    _keep(work)
    return [p.cpu() for p in parts]


class NonFiniteError(TrainingError):
    pass


def _train(spec: TaskSpec, context, events: EventClient) -> dict:
    import torch
    from torch.nn.parallel import DistributedDataParallel

    from sparknet.train.data import iterate_memory, iterate_rank, load_groups
    from sparknet.train.model import build_mlp, save_model, state_to_bytes, task_loss
    from sparknet.train.optim import (
        EarlyStopping,
        clip_gradients,
        make_optimizer,
        make_scheduler,
        penalty,
    )

    t, plan, model_spec = spec.train, spec.train_plan, spec.model
    threads = max(1, int(context.cpus()))
    torch.set_num_threads(threads)
    backend, device_type = choose_backend(t.device)
    events.at(-1, -1, "rendezvous")
    rank, world_size = init_process_group(context, backend, collective_timeout(t.timeout_s))
    if world_size != plan.world_size:
        raise TrainingError(
            f"the barrier stage has {world_size} tasks but the shard plan is for "
            f"{plan.world_size} ranks"
        )
    if device_type == "cuda":
        gpus = context.resources().get("gpu")
        index = int(gpus.addresses[0]) if gpus and gpus.addresses else 0
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    log.info(
        "rank %d of %d: pid %d on %s, %s backend on %s, %d torch threads",
        rank,
        world_size,
        os.getpid(),
        socket.gethostname(),
        backend,
        device,
        threads,
    )

    model = ddp = optimizer = None
    completed = False
    try:
        torch.manual_seed(t.seed)  # the same initial weights on every rank
        model = build_mlp(model_spec).to(device)
        # Dropout masks must differ between ranks, and repeat between runs.
        torch.manual_seed(t.seed + 1 + rank)
        ddp = DistributedDataParallel(
            model, device_ids=[device.index] if device.index is not None else None
        )
        optimizer = make_optimizer(t, model)
        scheduler = make_scheduler(optimizer, t, plan.steps_per_epoch)
        stopper = EarlyStopping(t.early_stopping)
        step_rows = plan.step_rows()
        steps = plan.steps_per_epoch
        run = Resumed.fresh() if spec.resume_from is None else Resumed.load(spec, rank, steps)
        if spec.resume_from is not None:
            run.restore(model, optimizer, scheduler, stopper, rank, steps, t.seed)
        best_state, history = run.best_state, run.history
        in_memory = None
        if spec.feed == "memory":
            events.at(run.epoch, run.step, "read")
            in_memory = load_groups(plan, model_spec.columns)

        def save_checkpoint(epoch: int, step: int, partial, stopped: bool) -> None:
            _checkpoint(
                spec, rank, world_size, device, events, epoch, step, steps, model, optimizer,
                scheduler, stopper, best_state, history, partial, stopped,
            )  # fmt: skip

        for epoch in range(run.epoch, t.epochs if not run.stopped else run.epoch):
            started = time.perf_counter()
            ddp.train()
            first_step = run.step if epoch == run.epoch else 0
            # Which samples this rank saw (count, sum and sum of squares of the dense ids:
            # summed over ranks they prove "each id exactly once"), then this rank's
            # finite loss sum, rows and non-finite losses, then seconds spent waiting for
            # data. They are summed over ranks once, at the end of the epoch. A resumed
            # epoch starts from the checkpoint's sums.
            seen, loss_total, waited = run.partial(epoch, rank)
            events.at(epoch, first_step, "read")
            if in_memory is None:
                batches = iterate_rank(
                    plan,
                    rank,
                    epoch,
                    t.seed,
                    model_spec.columns,
                    shuffle=True,
                    prefetch_row_groups=t.prefetch_row_groups,
                    reader_threads=threads,
                    start_step=first_step,
                )
            else:
                batches = iterate_memory(
                    in_memory, plan, rank, epoch, t.seed, start_step=first_step
                )
            step = first_step - 1
            asked = time.perf_counter()
            for step, (ids, x, y) in enumerate(batches, start=first_step):
                waited += time.perf_counter() - asked
                global_step = epoch * steps + step
                events.at(epoch, step, "forward")
                inject = _inject_fault(
                    t.fault, rank, global_step, spec.attempt, resumed=spec.resume_from is not None
                )
                features = torch.from_numpy(x).to(device, non_blocking=True)
                target = torch.from_numpy(y).to(device, non_blocking=True)
                optimizer.zero_grad(set_to_none=True)
                loss_sum = task_loss(model_spec, ddp(features), target, reduction="sum")
                if inject == "nan":
                    loss_sum = loss_sum * float("nan")
                # DDP averages gradients over ranks; scaling each rank's summed loss by
                # world_size / (rows in this step on all ranks) turns that average into
                # the mean over every row of the step, however unevenly the rows are
                # spread (the last step's batches differ). The penalty is the same on
                # every rank, so averaging keeps it once.
                loss = loss_sum * (world_size / step_rows[step])
                extra = penalty(model, t.l1, t.l2)
                if extra is not None:
                    loss = loss + extra
                events.at(epoch, step, "backward")
                loss.backward()
                local = float(loss_sum.item())
                if inject == "overflow":
                    local = float("inf")
                # Gradients are identical on all ranks after DDP's allreduce (a rank's
                # non-finite loss makes them non-finite everywhere), so every rank takes
                # the same decision and none is left waiting in the next collective. Only
                # then do the ranks learn whose loss it was: one more allreduce on a step
                # that fails, none on the others (issue 9 measured a per-step one at
                # 16-20% of a step).
                if not _gradients_finite(model):
                    events.at(epoch, step, "allreduce")
                    raise NonFiniteError(
                        _non_finite_message(
                            _ranks_not_finite(local, rank, world_size, device),
                            epoch,
                            step,
                            global_step,
                            optimizer.param_groups[0]["lr"],
                        )
                    )
                events.at(epoch, step, "optimizer")
                if t.grad_clip_norm > 0:
                    clip_gradients(model, t.grad_clip_norm)
                optimizer.step()
                scheduler.step()
                seen += _id_sums(ids)
                if math.isfinite(local):
                    loss_total += (local, len(ids), 0.0)
                else:
                    loss_total += (0.0, len(ids), 1.0)
                every = t.checkpoint.every_steps
                if every and (global_step + 1) % every == 0 and step + 1 < steps:
                    events.at(epoch, step, "checkpoint")
                    save_checkpoint(epoch, step + 1, (seen, loss_total, waited), False)
                # For the driver's progress display (progress.py): this rank's rows, data
                # wait and running loss so far.
                events.at(
                    epoch,
                    step + 1,
                    "read",
                    rows=int(seen[0]),
                    wait_s=waited,
                    seconds=time.perf_counter() - started,
                    loss=loss_total[0] / max(loss_total[1], 1),
                )
                asked = time.perf_counter()
            if step + 1 != steps:
                raise TrainingError(
                    f"epoch {epoch}: rank {rank} read {step + 1} batches, the shard plan "
                    f"promised {steps}; the shards changed after the plan was made"
                )
            events.at(epoch, steps, "allreduce")
            totals = torch.tensor(seen, dtype=torch.int64).to(device)
            all_reduce(totals)
            totals = totals.cpu()
            losses = torch.from_numpy(loss_total.copy()).to(device)
            all_reduce(losses)
            loss_sum_all, rows_all, not_finite = (float(v) for v in losses.cpu())
            if not_finite:
                # The loss overflowed on some rows while the gradients stayed finite;
                # the sums are the same on every rank, so all stop here together.
                raise NonFiniteError(
                    f"epoch {epoch}: the loss of {int(not_finite)} step(s) is not finite "
                    "though the gradients were; all ranks stopped together. Lower "
                    "train.learning_rate, set train.grad_clip_norm, or look for extreme "
                    "values in the shards"
                )
            if t.batch_norm:
                _average_batch_norm_statistics(model, world_size, device)
            train_loss = loss_sum_all / max(rows_all, 1)
            events.at(epoch, steps, "validation")
            validation = _validate(spec, model, rank, world_size, device, events, epoch)
            if not math.isfinite(validation["validation_loss"]):
                # The sums are the same on every rank: all stop here together.
                raise NonFiniteError(
                    f"epoch {epoch}: the validation loss is {validation['validation_loss']}: "
                    "the validation shards hold a non-finite feature or label, or the "
                    "network overflows on them"
                )
            elapsed = time.perf_counter() - started
            record = {
                "epoch": epoch,
                "train_loss": train_loss,
                **validation,
                "learning_rate": optimizer.param_groups[0]["lr"],
                "samples": int(totals[0]),
                "sample_id_sum": int(totals[1]),
                "sample_id_square_sum_mod": int(totals[2]) % ID_MODULUS,
                "rank_samples": int(seen[0]),
                "steps": steps,
                "seconds": elapsed,
                "data_wait_seconds": waited,
            }
            # The metrics are sums over all ranks, so every rank takes the same decision.
            stop = stopper.update(epoch, record)
            record["best_epoch"] = stopper.best_epoch
            history.append(record)
            if rank == 0:
                events.send(type="epoch", epochs=t.epochs, **record)
            if stopper.improved and t.early_stopping.patience > 0:
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            events.at(epoch, steps, "checkpoint")
            save_checkpoint(epoch + 1, 0, None, stop)
            if stop:
                log.info(
                    "early stopping after epoch %d: %s has not improved for %d epochs",
                    epoch,
                    t.early_stopping.metric,
                    t.early_stopping.patience,
                )
                break
        if best_state is not None:
            model.load_state_dict(best_state)
        result = {
            "rank": rank,
            "world_size": world_size,
            "backend": backend,
            "torch_threads": threads,
            "history": history,
            "stopped_early": len(history) < t.epochs,
            "resumed_from": run.position(),
            "best_epoch": stopper.best_epoch,
            "weights_digest": weights_digest(model),
        }
        if rank == 0:
            events.at(len(history) - 1, steps, "saving")
            save_model(Path(spec.model_path), model_spec, state_to_bytes(model))
        completed = True
        return result
    finally:
        # DDP's Reducer holds the process group: release it first, see shut_down().
        ddp = optimizer = model = None
        events.at(events.epoch, events.step, "teardown")
        # After a failure the driver already knows why; do not keep the task for long.
        shut_down(spec.train.timeout_s if completed else FAILED_TEARDOWN_S)


# Sums of squares of the ids are kept modulo a prime, so that they stay exact in int64
# at any size: a duplicated id and a missing one change the exact id sum; several that
# cancel there would also have to cancel in the squares.
ID_MODULUS = 2_147_483_647


def _id_sums(ids: np.ndarray) -> np.ndarray:
    reduced = ids.astype(np.int64) % ID_MODULUS
    squares = (reduced * reduced) % ID_MODULUS  # < 2^62: no overflow
    return np.array([len(ids), int(ids.sum()), int(squares.sum() % ID_MODULUS)], dtype=np.int64)


def _average_batch_norm_statistics(model, world_size: int, device) -> None:
    """DDP averages gradients, not buffers: each rank's running mean and variance come
    from its own batches. Their average across ranks, once per epoch, gives every rank
    (and the saved model) the same statistics, drawn from all the data."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            for buffer in (module.running_mean, module.running_var):
                total = buffer.detach().to(torch.float64)
                all_reduce(total)
                buffer.copy_((total / world_size).to(buffer.dtype))


def collective_timeout(timeout_s: float) -> float:
    """Longer than the driver's no-progress bound, so that the driver, which knows which
    rank stalled, normally acts first; the collective timeout remains the backstop when
    the driver itself is gone."""
    return timeout_s * 1.25 + 10


def _inject_fault(
    fault, rank: int, global_step: int, attempt: int, resumed: bool = False
) -> str | None:
    """train.fault: the test hook that proves failures end the job and say why."""
    if fault is None or (fault.rank, fault.step, fault.attempt) != (rank, global_step, attempt):
        return None
    if fault.unless_resumed and resumed:
        return None
    log.warning("injecting fault '%s' at global step %d", fault.kind, global_step)
    if fault.kind == "raise":
        raise RuntimeError(f"injected fault at rank {rank}, global step {global_step}")
    if fault.kind == "exit":
        os._exit(3)
    if fault.kind == "sleep":
        time.sleep(fault.seconds)
    return fault.kind


def _gradients_finite(model) -> bool:
    import torch

    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()) if grads else True


def _ranks_not_finite(local_loss: float, rank: int, world_size: int, device) -> list[int]:
    """A collective, on a failing step only: the ranks whose own loss was not finite."""
    import torch

    flags = torch.zeros(world_size, dtype=torch.float64)
    flags[rank] = 0.0 if math.isfinite(local_loss) else 1.0
    flags = flags.to(device)
    all_reduce(flags)
    return [r for r in range(world_size) if flags[r] > 0]


def _non_finite_message(
    bad_ranks: list[int], epoch: int, step: int, global_step: int, lr: float
) -> str:
    where = f"epoch {epoch}, step {step} (global step {global_step}), learning rate {lr:.4g}"
    if bad_ranks:
        what = f"the loss of rank{'s' if len(bad_ranks) > 1 else ''} {bad_ranks} is not finite"
    else:
        what = "the averaged gradient is not finite (every rank's loss was)"
    return (
        f"{what} at {where}; all ranks stopped together. Lower train.learning_rate, set "
        "train.grad_clip_norm, or look for extreme values in the shards"
    )


# NOTE [gloo teardown]: torch 2.13's ProcessGroupGloo destructor joins its worker
# threads while the caller holds the GIL, and a worker thread that is still releasing a
# finished collective (one whose tensors have Python objects) waits for the GIL: a
# deadlock we hit in about one run in fifteen, at the end of training. So collectives
# are awaited and released by this thread (all_reduce below), the process group is
# destroyed only after a pause without the GIL, and a watchdog ends the Python worker
# if teardown still hangs, so Spark fails the task instead of waiting forever.
EXIT_TEARDOWN_HUNG = 70
FAILED_TEARDOWN_S = 15.0
_finished_work: list = []


def all_reduce(tensor) -> None:
    """Sums `tensor` across ranks in place; keeps the work object so that it is released
    here, not on gloo's thread."""
    import torch.distributed as dist

    work = dist.all_reduce(tensor, async_op=True)
    work.wait()
    _keep(work)


def _keep(work) -> None:
    _finished_work.append(work)
    # Long finished ones are safe to drop here, on this thread.
    del _finished_work[:-64]


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


def validation_summary(task: str, record: dict) -> str:
    """The validation part of an epoch's log line."""
    if task == "regression":
        return (
            f"validation loss {record['validation_loss']:.4f} (standardised MSE), "
            f"RMSE {record['validation_rmse']:.4g}"
        )
    text = (
        f"validation loss {record['validation_loss']:.4f}, "
        f"accuracy {record['validation_accuracy']:.4f}"
    )
    if "validation_auc" in record:
        text += f", ROC AUC {record['validation_auc']:.4f}"
    return text


def _validate(spec: TaskSpec, model, rank: int, world_size: int, device, events, epoch) -> dict:
    """The validation split's mean loss (the training loss, so the two compare) and
    accuracy and ROC AUC (binary), accuracy (multiclass) or RMSE in the target's own
    unit (regression). Each rank scores its share of the plan; sums are allreduced, and
    for the AUC the scores themselves are gathered, so every rank holds the same numbers
    and takes the same early-stopping decision."""
    import torch

    from sparknet.train.data import iterate_rank
    from sparknet.train.model import predict, task_loss
    from sparknet.train.optim import binary_auc

    model_spec, plan = spec.model, spec.validation_plan
    model.eval()
    # loss * n, then correct predictions (classification) or squared error in the
    # original unit (regression), then n
    sums = torch.zeros(3, dtype=torch.float64)
    scores, labels = [], []
    with torch.no_grad():
        batches = iterate_rank(
            plan,
            rank,
            0,
            spec.train.seed,
            model_spec.columns,
            shuffle=False,
            prefetch_row_groups=spec.train.prefetch_row_groups,
            reader_threads=torch.get_num_threads(),
        )
        for index, (_, x, y) in enumerate(batches):
            events.at(epoch, index, "validation")
            raw = model(torch.from_numpy(x).to(device)).cpu()
            output = raw.double()
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
                # The network's own float32 logits and 1-byte labels: every rank
                # gathers all of them for the AUC, so they are what validation holds
                # per row (float64 copies cost 3 times the memory, benchmark f).
                scores.append(raw.squeeze(1))
                labels.append(torch.from_numpy(y).to(torch.uint8))
            sums += torch.tensor([loss.item(), quality.item(), len(y)], dtype=torch.float64)
    events.at(epoch, -1, "allreduce")
    sums = sums.to(device)
    all_reduce(sums)
    sums = sums.cpu()
    n = max(float(sums[2]), 1.0)
    result = {"validation_loss": float(sums[0]) / n}
    if model_spec.task == "regression":
        result["validation_rmse"] = math.sqrt(float(sums[1]) / n)
    else:
        result["validation_accuracy"] = float(sums[1]) / n
    if model_spec.task == "binary":
        every_score = _gather(torch.cat(scores), plan, world_size, device)
        every_label = _gather(torch.cat(labels), plan, world_size, device)
        result["validation_auc"] = binary_auc(every_score.numpy(), every_label.numpy())
    result["validation_rows"] = int(sums[2])
    return result


def _gather(values, plan, world_size: int, device):
    """Every rank's 1-d `values`, concatenated in rank order; the plan says how many
    each rank holds, so only the padded tensors travel."""
    import torch

    sizes = [plan.rank_rows(r) for r in range(world_size)]
    padded = torch.zeros(max(sizes), dtype=values.dtype)
    padded[: len(values)] = values
    parts = _gather_equal(padded, world_size, device)
    return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)])
