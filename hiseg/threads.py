"""Pin every CPU thread pool of the process to one count, for timings that compare methods fairly.

``torch.set_num_threads`` sets PyTorch's intra-op pool only. NumPy / SciPy run their linear
algebra (e.g. ``scipy.linalg.eigh`` in MaskCut, sparse and dense products in the references) on
the BLAS library's own pool (OpenBLAS, MKL) and OpenMP pools, which by default use every core:
with those left free a method that spends its time in BLAS looks faster or slower than one that
spends it in torch, depending on the machine's load. :func:`pinned_threads` sets all of them
(``threadpoolctl`` for the BLAS and OpenMP libraries loaded in the process) and restores them.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List

import torch

__all__ = ["pinned_threads", "thread_pools"]


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
