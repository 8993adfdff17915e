#!/usr/bin/env python
"""One prepared GPU check: every CUDA path verified against its CPU path, every speed goal
measured, one markdown report (docs/gpu_check.md says what each row means).

    python tools/gpu_check.py                      # CUDA machine: full sizes, <= 7 minutes
    python tools/gpu_check.py --device cpu --quick # the same code paths on a CPU, tiny sizes

The check is a developer's tool in ``dev/gpucheck`` (not installed: it imports both projects);
this script loads it from the checkout by its location and runs it (``--help`` lists the
options). The packages ``hiseg``, ``hiseg_cast`` and ``hiseg_oap`` must be importable: installed
by ``setup.sh``, or on ``PYTHONPATH`` (docs/gpu_check.md, a machine without network access).
"""
import importlib.util
import sys
import time
from pathlib import Path

T0 = time.perf_counter()
PACKAGE = Path(__file__).resolve().parents[1] / "dev" / "gpucheck"


def load_gpucheck():
    """``dev/gpucheck`` as the package ``gpucheck`` (loaded once; no ``sys.path`` change)."""
    if "gpucheck" not in sys.modules:
        spec = importlib.util.spec_from_file_location("gpucheck", PACKAGE / "__init__.py",
                                                      submodule_search_locations=[str(PACKAGE)])
        module = importlib.util.module_from_spec(spec)
        sys.modules["gpucheck"] = module
        spec.loader.exec_module(module)
    return sys.modules["gpucheck"]


def main(argv=None) -> int:
    load_gpucheck()
    from gpucheck.cli import main as run

    return run(argv, start=T0)


if __name__ == "__main__":
    from hiseg.cli import run_cli

    sys.exit(run_cli(main))
