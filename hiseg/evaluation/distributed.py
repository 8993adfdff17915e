"""The one gather step every evaluator here needs."""
import itertools
from typing import List, Optional

from detectron2.utils import comm

__all__ = ["gather_records"]


def gather_records(records: List, distributed: bool) -> Optional[List]:
    """All workers' per-image records concatenated on the main process; ``None`` on the others.
    Without ``distributed`` the local records are returned as they are."""
    if not distributed:
        return records
    comm.synchronize()
    gathered = comm.gather(records, dst=0)
    if not comm.is_main_process():
        return None
    return list(itertools.chain(*gathered))
