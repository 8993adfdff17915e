import os

import pytest

# Tests run on CPU with a predictable thread count.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def shared_data():
    """The real-data folder (``$HISEG_SHARED_DATA``, default ``../shared/data``); skips if absent."""
    from hiseg.paths import SHARED_DATA_ENV, shared_data_dir

    path = shared_data_dir()
    if path is None:
        pytest.skip(f"real data not found: set {SHARED_DATA_ENV} or place it at ../shared/data")
    return path


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op torch thread for a module's tests (opt in with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``): on tiny tensors it is faster,
    and much faster on a busy machine."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
