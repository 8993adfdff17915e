"""Cells of the markdown tables that the experiments and the GPU check write: a mean with its
sample standard deviation over seeds, durations, milliseconds, MiB and percentages. A missing
value is a dash (``–`` in the experiments' tables, ``-`` in the GPU check's)."""
from typing import Iterable, Optional, Tuple

import numpy as np

__all__ = ["mean_sd", "mean_sd_cell", "duration", "ms", "mib", "pct"]


def mean_sd(values: Iterable[Optional[float]]) -> Tuple[float, float, int]:
    """``(mean, sample s.d., n)`` of the finite values (``None`` and NaN left out); the s.d. is
    NaN for fewer than two values, both are NaN for none."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    if v.size == 0:
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else float("nan"), int(v.size)


def mean_sd_cell(values: Iterable[Optional[float]], digits: int = 3) -> str:
    """``"m ± s"`` over two or more values, ``"m"`` for one, ``"–"`` for none."""
    m, s, n = mean_sd(values)
    if n == 0:
        return "–"
    return f"{m:.{digits}f} ± {s:.{digits}f}" if n > 1 else f"{m:.{digits}f}"


def duration(seconds: Optional[float]) -> str:
    """``"42 s"``, ``"3.5 min"`` from two minutes on, ``"–"`` when unknown."""
    s = seconds
    return "–" if s is None or not np.isfinite(s) else (f"{s / 60:.1f} min" if s >= 120 else f"{s:.0f} s")


def ms(seconds: Optional[float], digits: int = 2) -> str:
    """Seconds as milliseconds with ``digits`` decimals; ``"-"`` for None / NaN."""
    if seconds is None or seconds != seconds:
        return "-"
    return f"{1e3 * seconds:.{digits}f}"


def mib(nbytes: Optional[int]) -> str:
    return "-" if nbytes is None else f"{nbytes / 2 ** 20:.0f} MiB"


def pct(x: Optional[float]) -> str:
    return "-" if x is None or x != x else f"{100 * x:.1f}%"
