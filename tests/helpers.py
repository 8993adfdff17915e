"""Helpers shared by the tests: the repository root, the config of every project, and loading the
scripts that are not packages (entry points, prepare scripts, dev plumbing, experiments)."""
import importlib
import importlib.util
import itertools
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_LOADED = itertools.count()


def load_file(path, prefix: str = "_hiseg_test"):
    """The Python file ``path`` (absolute, or relative to the repository root) executed as a new
    module. Every call runs the file again under a name of its own (``<prefix>_<stem>_<n>``), not
    entered in ``sys.modules``: two loads never share module state."""
    path = Path(path)
    if not path.is_absolute():
        path = REPO / path
    spec = importlib.util.spec_from_file_location(f"{prefix}_{path.stem}_{next(_LOADED)}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_tool(name: str):
    """The entry point ``tools/<name>.py`` as a module (``main(argv)``, its parser, its helpers)."""
    return load_file(REPO / "tools" / f"{name}.py", "_hiseg_tool")


def load_script(name: str):
    """The prepare script ``datasets/<name>.py`` as a module (the folder is not a package)."""
    return load_file(REPO / "datasets" / f"{name}.py", "_hiseg_script")


def load_dev(name: str):
    """The development script ``dev/<name>.py`` as a module."""
    return load_file(REPO / "dev" / f"{name}.py", "_hiseg_dev")


def run_captured(main, argv):
    """(exit status, stdout, stderr) of ``hiseg.cli.run_cli(main, argv)`` run in this process."""
    import contextlib
    import io

    from hiseg.cli import run_cli

    so, se = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(so), contextlib.redirect_stderr(se):
        rc = run_cli(main, [str(a) for a in argv])
    return rc, so.getvalue(), se.getvalue()


def error_line(stderr):
    """The one ``error:`` line of a failed run (and there is exactly one)."""
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr, stderr
    return lines[0]


def add_all_configs(cfg):
    """Every config key of the shared core and both projects (what ``tools/train_net.py`` adds)."""
    from hiseg_cast import add_cast_config
    from hiseg_oap import add_oap_config

    return add_oap_config(add_cast_config(cfg))


def stripes_sample(h: int, w: int, seed: int, superpixels: bool) -> dict:
    """A semantic-segmentation input of two regions: class 0 on the left (red), class 3 on the
    right (blue), split at a random column in the middle third, with noise; with ``superpixels``
    also SEEDS superpixels of about 64 pixels, as the CAST mappers give."""
    import torch

    g = torch.Generator().manual_seed(seed)
    img = torch.zeros(3, h, w)
    lab = torch.zeros(h, w, dtype=torch.long)
    cut = w // 3 + int(torch.randint(0, max(1, w // 3), (1,), generator=g))
    img[0, :, :cut] = 200
    img[2, :, cut:] = 220
    lab[:, cut:] = 3
    img += torch.randint(0, 20, (3, h, w), generator=g)
    d = {"image": img, "sem_seg": lab, "height": h, "width": w}
    if superpixels:
        from hiseg_cast.superpixels import SuperpixelConfig, superpixels_for_image_tensor

        sp_cfg = SuperpixelConfig(num_superpixels=0, pixels_per_superpixel=64)
        d["superpixels"] = superpixels_for_image_tensor(img, "RGB", sp_cfg)
    return d


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
    return load_tool("gpu_check").load_gpucheck()
