"""The GPU check's wall-clock budget: a running clock from the process's start that shares what is
left among the parts still to run, and the repetitions that fit a part's share."""
import time
from typing import Optional

__all__ = ["Budget"]


class Budget:
    """A running clock against a wall-time budget (seconds since the process started)."""

    def __init__(self, seconds: float, start: Optional[float] = None):
        self.total = float(seconds)
        self.start = time.perf_counter() if start is None else start

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.total - self.elapsed()

    def share(self, weight: float, remaining_weights: float, reserve: float = 0.0) -> float:
        """Seconds allotted to a part of weight ``weight`` among parts still to run whose
        weights sum to ``remaining_weights`` (this one included), keeping ``reserve`` back."""
        return max(0.0, self.left() - reserve) * weight / max(remaining_weights, 1e-9)

    @staticmethod
    def reps(per_rep_s: float, allot_s: float, lo: int, hi: int) -> int:
        """How many repetitions of ``per_rep_s`` seconds fit in ``allot_s``, within [lo, hi]."""
        n = int(allot_s / max(per_rep_s, 1e-6))
        return max(lo, min(hi, n))
