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
