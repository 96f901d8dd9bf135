"""What the machine can do, measured before anything is compared: cores, threads per
core, matrix-multiply FLOP/s (the ceiling for an MLP's training), and the latency of a
gloo allreduce between two processes on loopback (the floor for one DDP step)."""

from __future__ import annotations

import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def cpu_facts() -> dict:
    import psutil

    logical = psutil.cpu_count(logical=True) or os.cpu_count() or 1
    physical = psutil.cpu_count(logical=False) or logical
    model = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu_model": model or platform.processor(),
        "logical_cpus": logical,
        "cores": physical,
        "threads_per_core": logical // max(physical, 1),
        "usable_cpus": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else logical,
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def _best_seconds(work, repeats: int, min_seconds: float) -> float:
    """The fastest of `repeats` timings of `work` (each run long enough to time): the
    least disturbed by whatever else the machine runs."""
    work()  # warm-up: allocations, thread pools, kernel choice
    best = float("inf")
    for _ in range(repeats):
        calls, started = 0, time.perf_counter()
        while True:
            work()
            calls += 1
            elapsed = time.perf_counter() - started
            if elapsed >= min_seconds:
                break
        best = min(best, elapsed / calls)
    return best


def numpy_matmul_gflops(n: int = 1024, repeats: int = 3, min_seconds: float = 0.3) -> float:
    """float32 n x n @ n x n with numpy's BLAS and all its threads: 2 n^3 FLOP."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    return 2 * n**3 / _best_seconds(lambda: a @ b, repeats, min_seconds) / 1e9


def torch_matmul_gflops(
    shapes: list[tuple[int, int, int]], threads: int, repeats: int = 3, min_seconds: float = 0.3
) -> float:
    """FLOP/s of torch.mm over `shapes` (m, k, n): each (m x k) @ (k x n) is 2 m k n FLOP,
    run back to back with `threads` intra-op threads, as one training step would."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(0)
        pairs = [
            (torch.randn(m, k, generator=gen), torch.randn(k, n, generator=gen))
            for m, k, n in shapes
        ]
        flops = sum(2 * m * k * n for m, k, n in shapes)

        def work():
            for a, b in pairs:
                torch.mm(a, b)

        return flops / _best_seconds(work, repeats, min_seconds) / 1e9
    finally:
        torch.set_num_threads(before)


def mlp_step_shapes(n_inputs: int, hidden: list[int], n_outputs: int, batch: int) -> list:
    """The GEMMs of one forward and backward pass of an MLP on `batch` rows: per Linear
    layer (i -> o), forward (b x i)(i x o), input gradient (b x o)(o x i) and weight
    gradient (o x b)(b x i): 6 b i o FLOP, the '6 x parameters per sample' rule. The
    first layer's input gradient is not needed (torch skips it); it is kept so that the
    shapes match the rule the achieved FLOP/s is counted with."""
    widths = [n_inputs, *hidden, n_outputs]
    shapes = []
    for i, o in zip(widths[:-1], widths[1:], strict=True):
        shapes += [(batch, i, o), (batch, o, i), (o, batch, i)]
    return shapes


def _allreduce_worker(rank: int, store_path: str, sizes: list[int], iters: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, 2)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
    results = {}
    for size in sizes:
        tensor = torch.ones(size, dtype=torch.float32)
        for _ in range(10):
            dist.all_reduce(tensor)
        times = []
        for _ in range(iters):
            dist.barrier()
            started = time.perf_counter()
            dist.all_reduce(tensor)
            times.append(time.perf_counter() - started)
        results[size] = statistics.median(times)
    dist.destroy_process_group()
    if rank == 0:
        Path(out).write_text(repr(results))


def gloo_allreduce_seconds(sizes: list[int], iters: int = 200) -> dict[int, float]:
    """Median seconds of one allreduce of `size` float32 values between two processes
    (gloo over loopback, one thread each), per size."""
    import ast

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="sparknet-allreduce-") as tmp:
        out = os.path.join(tmp, "result")
        mp.start_processes(
            _allreduce_worker,
            args=(os.path.join(tmp, "store"), sizes, iters, out),
            nprocs=2,
            join=True,
            start_method="spawn",
        )
        return {int(k): float(v) for k, v in ast.literal_eval(Path(out).read_text()).items()}


def probe() -> dict:
    """The machine section of the report, measured before anything else runs."""
    facts = cpu_facts()
    facts["numpy_matmul_gflops"] = numpy_matmul_gflops()
    big = [(1024, 1024, 1024)]
    facts["torch_matmul_gflops_1_thread"] = torch_matmul_gflops(big, 1)
    facts["torch_matmul_gflops_all_threads"] = torch_matmul_gflops(big, facts["usable_cpus"])
    # The latency of a tiny allreduce (8 float64), gloo's floor; DDP's gradient
    # allreduce is measured once the model's size is known (add_gradient).
    latency = gloo_allreduce_seconds([8])
    facts["gloo_allreduce_s"] = {"8": latency[8]}
    facts["gloo_allreduce_small_s"] = latency[8]
    return facts


def add_gradient(facts: dict, gradient_values: int) -> None:
    """The allreduce of the model's gradient (its parameter count), which DDP does
    every step: known only after PCA has fixed the number of inputs."""
    latency = gloo_allreduce_seconds([gradient_values])[gradient_values]
    facts["gloo_allreduce_s"][str(gradient_values)] = latency
    facts["gloo_allreduce_gradient_s"] = latency
    facts["gradient_values"] = gradient_values


def _plain_ddp_worker(
    rank: int,
    world: int,
    independent: bool,
    tmp: str,
    spec: dict,
    batch: int,
    steps: int,
) -> None:
    """One rank of plain PyTorch: the train stage's network and loss (build_mlp and
    task_loss of the ModelSpec fields `spec`) with Adam, on random tensors already in
    memory; no Spark, no reader, no bookkeeping. `independent`: each process trains
    alone (a world of one), at the same time as the others."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from sparknet.train.model import ModelSpec, build_mlp, task_loss

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    if independent:
        store = dist.FileStore(os.path.join(tmp, f"store-{rank}"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    else:
        store = dist.FileStore(os.path.join(tmp, "store"), world)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    torch.manual_seed(0)
    model_spec = ModelSpec(**spec)
    model = DistributedDataParallel(build_mlp(model_spec))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(64, batch, model_spec.n_inputs, generator=gen)
    y = (torch.rand(64, batch, generator=gen) < 0.25).float()

    def step(i: int) -> None:
        optimizer.zero_grad(set_to_none=True)
        task_loss(model_spec, model(x[i % 64]), y[i % 64]).backward()
        optimizer.step()

    for i in range(20):
        step(i)
    dist.barrier()
    started = time.perf_counter()
    for i in range(steps):
        step(i)
    dist.barrier()
    seconds = time.perf_counter() - started
    model = optimizer = None
    dist.destroy_process_group()
    Path(tmp, f"result-{rank}").write_text(repr(batch * steps / seconds))


def plain_ddp_samples_per_s(
    spec: dict, batch: int, processes: int, steps: int = 600, independent: bool = False
) -> float:
    """Samples/s of `processes` plain DDP processes together (gloo over loopback, one
    thread each) on in-memory tensors: what PyTorch alone gets from this machine for the
    model, the yardstick for b's efficiency. With `independent`, the processes do not
    communicate: what the cores give two trainings at once."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="sparknet-ddp-") as tmp:
        mp.start_processes(
            _plain_ddp_worker,
            args=(processes, independent, tmp, spec, batch, steps),
            nprocs=processes,
            join=True,
            start_method="spawn",
        )
        return sum(float(Path(tmp, f"result-{r}").read_text()) for r in range(processes))
