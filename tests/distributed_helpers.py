"""Real multi-process groups on CPU for the tests, set up the way detectron2's ``launch`` does.

detectron2 v0.6's ``launch`` asserts CUDA for more than one process and uses NCCL, so on a CPU
machine the tests start the workers themselves with ``torch.multiprocessing`` (the same
``start_processes(..., start_method="spawn")`` that ``launch``'s ``mp.spawn`` runs) and then do
what ``launch``'s ``_distributed_worker`` does, with gloo instead of NCCL and no CUDA device:

1. ``dist.init_process_group(backend, init_method="tcp://127.0.0.1:<port>", world_size, rank,
   timeout)`` with ``rank = machine_rank * procs_per_machine + local_rank``;
2. one ``dist.new_group`` per machine over its ranks, the own machine's stored as
   ``detectron2.utils.comm._LOCAL_PROCESS_GROUP`` (every process creates every group, in order);
3. ``comm.synchronize()``, then the worker function.

Several "machines" can be simulated on this host (``procs_per_machine < world_size``): their
ranks are spawned here too, and ``comm.get_local_rank()`` / ``get_local_size()`` behave as on a
multi-machine job.

This lives in ``tests/`` only: the product starts its processes with detectron2's ``launch``.
"""
import os
import socket
import tempfile
import time
from datetime import timedelta

import torch

__all__ = ["free_port", "run_group", "start_group", "init_like_launch", "collect_results"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (what ``launch`` does for ``auto``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_like_launch(local_rank: int, world_size: int, procs_per_machine: int, machine_rank: int,
                     dist_url: str, timeout_s: float, num_threads: int = 1) -> int:
    """Steps 1-3 of the module doc in the calling process; returns its global rank."""
    import torch.distributed as dist
    from detectron2.utils import comm

    torch.set_num_threads(num_threads)
    rank = machine_rank * procs_per_machine + local_rank
    dist.init_process_group(backend="gloo", init_method=dist_url, world_size=world_size, rank=rank,
                            timeout=timedelta(seconds=timeout_s))
    assert comm._LOCAL_PROCESS_GROUP is None
    for i in range(world_size // procs_per_machine):
        pg = dist.new_group(list(range(i * procs_per_machine, (i + 1) * procs_per_machine)))
        if i == machine_rank:
            comm._LOCAL_PROCESS_GROUP = pg
    comm.synchronize()
    return rank


def _worker(index, fn, world_size, procs_per_machine, dist_url, args, result_dir, timeout_s):
    import torch.distributed as dist

    machine_rank, local_rank = divmod(index, procs_per_machine)
    rank = init_like_launch(local_rank, world_size, procs_per_machine, machine_rank, dist_url, timeout_s)
    try:
        out = fn(*args)
        if result_dir:
            tmp = os.path.join(result_dir, f".rank{rank}.pt")
            torch.save(out, tmp)
            os.replace(tmp, os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def start_group(fn, world_size: int, args=(), *, procs_per_machine=None, result_dir=None,
                timeout_s=None, join: bool = True):
    """Run ``fn(*args)`` in ``world_size`` spawned processes joined in one gloo group.

    ``fn`` must be importable by name (a module-level function). ``timeout_s``: the process
    group's timeout; ``None``: the one ``tools/train_net.py`` gives ``launch``
    (``hiseg.engine.trainer.distributed_timeout()``, i.e. ``$HISEG_DIST_TIMEOUT_S`` or 30 min).
    With ``join`` this returns after all processes ended (``torch.multiprocessing`` raises if one
    failed, naming it); without, the ``ProcessContext`` (its ``processes`` can be signalled,
    ``join()`` waited on)."""
    import torch.multiprocessing as mp

    if timeout_s is None:
        from hiseg.engine.trainer import distributed_timeout

        timeout_s = distributed_timeout().total_seconds()
    ppm = procs_per_machine or world_size
    if world_size % ppm:
        raise ValueError(f"world_size {world_size} is not a multiple of procs_per_machine {ppm}")
    url = f"tcp://127.0.0.1:{free_port()}"
    return mp.start_processes(_worker, args=(fn, world_size, ppm, url, tuple(args), result_dir, timeout_s),
                              nprocs=world_size, join=join, daemon=False, start_method="spawn")


def collect_results(result_dir, world_size: int):
    """The return values of the ranks (``torch.load`` of what each wrote)."""
    return [torch.load(os.path.join(result_dir, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]


def run_group(fn, world_size: int, args=(), *, procs_per_machine=None, timeout_s: float = 120.0):
    """``fn(*args)`` on every rank of a fresh ``world_size``-process group; the list of the
    ranks' return values (anything ``torch.save`` can write)."""
    with tempfile.TemporaryDirectory(prefix="hiseg-dist-") as d:
        tic = time.perf_counter()
        start_group(fn, world_size, args, procs_per_machine=procs_per_machine, result_dir=d,
                    timeout_s=timeout_s, join=True)
        results = collect_results(d, world_size)
    run_group.last_seconds = time.perf_counter() - tic
    return results
