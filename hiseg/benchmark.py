"""Timing code fairly on a device: the plumbing of the benchmark tools (``tools/benchmark.py``)
and of the GPU check (``dev/gpucheck``).

* :class:`Timer`: seconds of one call on a device, from CUDA events around it (the queued work
  waited for) or from the host clock between two synchronisations, and the call's peak memory;
* :func:`alternate`: time several functions round after round, one after the other within a
  round, so that a change of clocks or of the machine's load hits all of them alike (the ratios
  of their medians are then fair); :func:`time_interleaved` is its medians on the host clock;
* :data:`PIXEL_MEAN` / :data:`PIXEL_STD` and :func:`normalize`: the ImageNet normalisation of
  uint8 RGB images (detectron2's default ``MODEL.PIXEL_MEAN`` / ``PIXEL_STD``).

The pseudo-mask generators have their own side-by-side timing, image by image with every
thread pool pinned (``hiseg_oap.pooling.benchmark``).
"""
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

__all__ = ["PIXEL_MEAN", "PIXEL_STD", "normalize", "Sync", "Timer", "Measured", "alternate", "time_interleaved"]

#: ImageNet mean and standard deviation of RGB uint8 images (detectron2's defaults)
PIXEL_MEAN = np.array([123.675, 116.28, 103.53], np.float32)
PIXEL_STD = np.array([58.395, 57.12, 57.375], np.float32)


def normalize(images_u8: torch.Tensor) -> torch.Tensor:
    """``(N, 3, H, W)`` RGB uint8 images, float and normalised with :data:`PIXEL_MEAN` /
    :data:`PIXEL_STD`, on their device."""
    mean = torch.from_numpy(PIXEL_MEAN).view(1, 3, 1, 1)
    std = torch.from_numpy(PIXEL_STD).view(1, 3, 1, 1)
    return ((images_u8.float() - mean.to(images_u8.device)) / std.to(images_u8.device)).contiguous()


class Sync:
    """Calling it waits for the work queued on ``device`` (CUDA); a no-op on the CPU."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"

    def __call__(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)


class Timer:
    """Seconds of ``fn()`` on ``device``: CUDA events around the call (the queued work is
    waited for), or the host clock on the CPU and with ``host_clock`` (between two
    synchronisations). Peak memory is CUDA's ``max_memory_allocated`` over an event-timed call
    (weights and inputs already on the device included), ``None`` otherwise."""

    def __init__(self, device, host_clock: bool = False):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.host_clock = host_clock
        self.sync = Sync(self.device)

    def time(self, fn: Callable, track_memory: bool = True):
        """``(seconds, peak_bytes_or_None, result)`` of one call."""
        if not self.cuda or self.host_clock:
            self.sync()
            t0 = time.perf_counter()
            out = fn()
            self.sync()
            return time.perf_counter() - t0, None, out
        self.sync()
        if track_memory:
            torch.cuda.reset_peak_memory_stats(self.device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        end.synchronize()
        peak = torch.cuda.max_memory_allocated(self.device) if track_memory else None
        return start.elapsed_time(end) / 1e3, peak, out


@dataclass
class Measured:
    name: str
    times: List[float] = field(default_factory=list)
    peaks: List[int] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.times) if self.times else float("nan")

    @property
    def spread(self) -> float:
        """(max - min) / median of the timed calls: how noisy the median is."""
        if len(self.times) < 2:
            return 0.0
        return (max(self.times) - min(self.times)) / max(self.median, 1e-12)

    @property
    def peak(self) -> Optional[int]:
        return max(self.peaks) if self.peaks else None


def alternate(timer: Timer, fns: Dict[str, Callable], reps: int, warmup: int = 1) -> Dict[str, Measured]:
    """Time each function ``reps`` times after ``warmup`` untimed rounds; within a round the
    functions run one after the other, so that a change of clocks or load hits all alike (the
    ratios of their medians are then fair). Runs under ``torch.no_grad``."""
    out = {name: Measured(name) for name in fns}
    with torch.no_grad():
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        timer.sync()
        for _ in range(reps):
            for name, fn in fns.items():
                sec, peak, _ = timer.time(fn)
                out[name].times.append(sec)
                if peak is not None:
                    out[name].peaks.append(peak)
    return out


def time_interleaved(fns: Sequence[Callable], iters: int, warmup: int, device) -> List[float]:
    """Median seconds of each of ``fns`` over ``iters`` rounds after ``warmup`` rounds
    (:func:`alternate` on the host clock, synchronised around every call)."""
    res = alternate(Timer(device, host_clock=True), {str(i): fn for i, fn in enumerate(fns)}, iters, warmup)
    return [res[str(i)].median for i in range(len(fns))]
