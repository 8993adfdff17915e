"""The F-measure of the BSDS benchmark and the count ratio behind its precision and recall."""
import numpy as np

__all__ = ["fmeasure"]


def fmeasure(r, p):
    """Harmonic mean of recall and precision, 0 where both are 0 (``fmeasure`` of the BSDS
    benchmark, Martin et al. 2004)."""
    r = np.asarray(r, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    s = p + r
    return 2.0 * p * r / (s + (s == 0))


def _ratio(cnt, tot):
    """``cnt / tot``, 0 where ``tot`` is 0 (the benchmark's recall and precision)."""
    cnt = np.asarray(cnt, dtype=np.float64)
    tot = np.asarray(tot, dtype=np.float64)
    return cnt / (tot + (tot == 0))
