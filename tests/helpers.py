"""Helpers shared by the tests: the config of every project, the experiment scripts."""
import importlib
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def add_all_configs(cfg):
    """Every config key of the shared core and both projects (what ``tools/train_net.py`` adds)."""
    from hiseg_cast import add_cast_config
    from hiseg_oap import add_oap_config

    return add_oap_config(add_cast_config(cfg))


def experiment(project: str, name: str):
    """The experiment script ``projects/<project>/experiments/<name>.py`` as a module. Its folder
    goes first on ``sys.path``, as when the script runs: the files of one experiment import each
    other by name, and so do the processes it spawns (they start with this ``sys.path``)."""
    folder = str(REPO / "projects" / project / "experiments")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return importlib.import_module(name)


def gpucheck():
    """The GPU check's package ``dev/gpucheck`` as ``gpucheck``, loaded as ``tools/gpu_check.py``
    loads it (so that ``from gpucheck import ...`` gives the modules the tool runs)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_gpu_check_tool", REPO / "tools" / "gpu_check.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool.load_gpucheck()
