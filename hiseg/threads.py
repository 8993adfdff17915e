"""Pin every CPU thread pool of the process to one count, for timings that compare methods fairly.

``torch.set_num_threads`` sets PyTorch's intra-op pool only. NumPy / SciPy run their linear
algebra (e.g. ``scipy.linalg.eigh`` in MaskCut, sparse and dense products in the references) on
the BLAS library's own pool (OpenBLAS, MKL) and OpenMP pools, which by default use every core:
with those left free a method that spends its time in BLAS looks faster or slower than one that
spends it in torch, depending on the machine's load. :func:`pinned_threads` sets all of them
(``threadpoolctl`` for the BLAS and OpenMP libraries loaded in the process) and restores them.

:func:`spawn_with_threads` starts a process (``spawn``) whose pools start at a given count: the
OpenMP / MKL / OpenBLAS variables are read once, when a process starts, so they are set for the
child's start and restored here right after.
"""
from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
from typing import Callable, Dict, Iterator, List

import torch

__all__ = ["pinned_threads", "thread_pools", "spawn_with_threads", "THREAD_ENV_VARS"]

#: the variables the BLAS and OpenMP libraries size their pools from at start-up
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def thread_pools() -> List[Dict]:
    """The thread pools of the process: torch's intra-op pool and each BLAS / OpenMP library
    threadpoolctl finds (``{'api', 'library', 'num_threads'}``)."""
    from threadpoolctl import threadpool_info

    pools = [{"api": "torch", "library": "intra-op", "num_threads": torch.get_num_threads()}]
    for p in threadpool_info():
        pools.append({"api": p.get("user_api"), "library": p.get("internal_api") or p.get("prefix"),
                      "num_threads": p.get("num_threads")})
    return pools


@contextlib.contextmanager
def pinned_threads(num_threads: int) -> Iterator[List[Dict]]:
    """Within the block, torch's intra-op pool and every BLAS / OpenMP pool use ``num_threads``
    threads (``0`` or ``None``: leave everything as it is). Yields :func:`thread_pools` as set."""
    if not num_threads:
        yield thread_pools()
        return
    if num_threads < 0:
        raise ValueError(f"num_threads must be >= 0, got {num_threads}")
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    with threadpool_limits(limits=int(num_threads)):
        torch.set_num_threads(int(num_threads))
        try:
            yield thread_pools()
        finally:
            torch.set_num_threads(before)


def spawn_with_threads(target: Callable, args: tuple, threads: int) -> "mp.Process":
    """A started ``spawn`` process running ``target(*args)`` with :data:`THREAD_ENV_VARS` set to
    ``threads`` (inherited at its start); this process's environment is left as it was."""
    old = {k: os.environ.get(k) for k in THREAD_ENV_VARS}
    try:
        for k in THREAD_ENV_VARS:
            os.environ[k] = str(threads)
        p = mp.get_context("spawn").Process(target=target, args=args)
        p.start()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return p
