"""The layering rules of the code base, checked over the import graph of the product code.

Rules (``docs``: README "What this is"; the layout notes in each project's package docstring):

1. the shared core (``hiseg``) imports no project;
2. a project imports the core, never the other project (``hiseg_cast`` <-> ``hiseg_oap``);
3. library code (every module of the installed packages) never imports, executes (``runpy``,
   ``importlib.util.spec_from_file_location``, ``exec``) or spawns (``subprocess``, ``os.system``,
   ``os.exec*``) an entry point (``tools/``), a prepare script (``datasets/``), dev tooling
   (``dev/``) or an experiment driver (``projects/*/experiments/*.py``);
4. experiments are scripts beside their project: no installed package has an ``experiments``
   folder;
5. product code (the installed packages, ``tools/``, ``dev/``, ``datasets/`` and the experiment
   scripts) never edits ``sys.path`` (``sys.path.insert`` / ``append`` / ..., assigning to it,
   ``site.addsitedir``): the packages are found because they are installed (``setup.sh``) or on
   ``PYTHONPATH``, and a script imports only what is beside it or installed.

Imports are read with :mod:`ast` (those inside functions included), so a lazy import cannot hide
a dependency. A module that calls an execute/spawn function is a violation when it also names a
repository script (a string literal with a ``tools`` / ``datasets`` path part or ending in
``.py``, or ``sys.executable``); ``git`` calls for provenance are not scripts.

``KNOWN_VIOLATIONS`` lists the violations that exist today and are being removed; the test fails
on any violation not in it, and on an entry that no longer occurs (so the list only shrinks).
"""
import ast
import os
import re
import sys
from typing import Iterator, Set, Tuple

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: import name -> folder of the package, relative to the repository root
PACKAGES = {"hiseg": "hiseg", "hiseg_cast": "projects/CAST/hiseg_cast", "hiseg_oap": "projects/OAP/hiseg_oap"}
PROJECTS = ("hiseg_cast", "hiseg_oap")
EXEC_CALLS = {
    ("subprocess", "run"), ("subprocess", "Popen"), ("subprocess", "call"), ("subprocess", "check_call"),
    ("subprocess", "check_output"), ("os", "system"), ("os", "execv"), ("os", "execvp"), ("os", "execl"),
    ("runpy", "run_path"), ("runpy", "run_module"), ("util", "spec_from_file_location"),
    ("importlib.util", "spec_from_file_location"),
}
SCRIPT_LITERAL = re.compile(r"(^|[/\\])(tools|datasets|dev)([/\\]|$)|\.py$")
#: folders of scripts (searched recursively; ``dev/gpucheck`` is a package of dev tooling)
SCRIPT_DIRS = ("tools", "dev", "datasets")
#: top-level import names that are repository scripts or dev tooling, never library
SCRIPT_IMPORTS = {"tools", "datasets", "dev", "gpucheck"}
SYS_PATH_EDITS = {"insert", "append", "extend", "remove", "pop", "clear", "__setitem__", "__iadd__"}

#: (module, rule, target) triples present today; remove an entry when its violation is fixed.
KNOWN_VIOLATIONS: Set[Tuple[str, str, str]] = set()


def _experiment_scripts() -> Iterator[str]:
    for project in sorted(os.listdir(os.path.join(REPO, "projects"))):
        folder = os.path.join(REPO, "projects", project, "experiments")
        if os.path.isdir(folder):
            yield from (os.path.join(folder, n) for n in sorted(os.listdir(folder)) if n.endswith(".py"))


def experiment_modules() -> Set[str]:
    """The import names of the experiment scripts (``projects/*/experiments/<name>.py``)."""
    return {os.path.basename(p)[:-3] for p in _experiment_scripts()}


def _scripts() -> Iterator[str]:
    """Every Python file of the entry points, dev tooling, prepare scripts and experiments."""
    for d in SCRIPT_DIRS:
        for dirpath, _, files in os.walk(os.path.join(REPO, d)):
            yield from (os.path.join(dirpath, n) for n in sorted(files) if n.endswith(".py"))
    yield from _experiment_scripts()


def _modules() -> Iterator[Tuple[str, str]]:
    for top, folder in PACKAGES.items():
        root = os.path.join(REPO, folder)
        for dirpath, _, files in os.walk(root):
            for name in sorted(files):
                if not name.endswith(".py"):
                    continue
                rel = os.path.relpath(os.path.join(dirpath, name), root)[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                yield ".".join([top] + rel), os.path.join(dirpath, name)


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    parts = module.split(".")
    base = parts if is_package else parts[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _dotted(expr: ast.AST) -> str:
    if isinstance(expr, ast.Name):
        return expr.id
    if isinstance(expr, ast.Attribute):
        head = _dotted(expr.value)
        return f"{head}.{expr.attr}" if head else ""
    return ""


def sys_path_edits(module: str, tree: ast.AST) -> Set[Tuple[str, str, str]]:
    """Rule 5: calls of ``sys.path.<method>`` that change it, assignments to ``sys.path`` (or an
    item or slice of it, ``+=`` included) and ``site.addsitedir`` calls."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            dotted = _dotted(node.func)
            if (dotted.startswith("sys.path.") and dotted.rsplit(".", 1)[1] in SYS_PATH_EDITS) \
                    or dotted in ("site.addsitedir", "addsitedir"):
                found.add((module, "product code edits sys.path", dotted))
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
        for t in targets:
            if _dotted(t.value if isinstance(t, ast.Subscript) else t) == "sys.path":
                found.add((module, "product code edits sys.path", "sys.path ="))
    return found


def violations_of(module: str, path: str) -> Set[Tuple[str, str, str]]:
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)
    is_package = path.endswith("__init__.py")
    top = module.split(".")[0]
    scripts = SCRIPT_IMPORTS | experiment_modules()
    found: Set[Tuple[str, str, str]] = sys_path_edits(module, tree)
    imported: Set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, is_package, node)
            imported.add(base)
            imported.update(f"{base}.{a.name}" for a in node.names)
    for name in imported:
        head = name.split(".")[0]
        if head in scripts:
            found.add((module, "library imports a repository script", name))
        if head in PROJECTS and head != top:
            rule = "core imports a project" if top == "hiseg" else "project imports the other project"
            found.add((module, rule, head))
        if ".experiments" in name and head in PACKAGES:
            found.add((module, "library imports an experiment driver", name))
    names_script = any(
        isinstance(n, ast.Constant) and isinstance(n.value, str) and SCRIPT_LITERAL.search(n.value)
        for n in ast.walk(tree)
    ) or any(_dotted(n) == "sys.executable" for n in ast.walk(tree) if isinstance(n, ast.Attribute))
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        dotted = _dotted(node.func)
        if dotted == "exec":
            found.add((module, "library executes or spawns a repository script", "exec"))
            continue
        tail = tuple(dotted.rsplit(".", 1)) if "." in dotted else ("", dotted)
        if tail in EXEC_CALLS and names_script:
            found.add((module, "library executes or spawns a repository script", dotted))
    return found


def experiments_in_packages() -> Set[Tuple[str, str, str]]:
    """Rule 4: an ``experiments`` folder holding Python files inside an installed package's folder
    (a folder left with only ``__pycache__`` after a checkout moved its files does not count)."""
    found = set()
    for top, folder in PACKAGES.items():
        for dirpath, dirs, _ in os.walk(os.path.join(REPO, folder)):
            if "experiments" not in dirs:
                continue
            exp = os.path.join(dirpath, "experiments")
            if any(n.endswith(".py") for d, _, files in os.walk(exp) if "__pycache__" not in d for n in files):
                rel = os.path.relpath(exp, REPO).replace(os.sep, "/")
                found.add((rel, "experiments inside an installed package", top))
    return found


def script_violations() -> Set[Tuple[str, str, str]]:
    """Rule 5 over the scripts (named by their path in the repository)."""
    out: Set[Tuple[str, str, str]] = set()
    for path in _scripts():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), filename=path)
        out |= sys_path_edits(os.path.relpath(path, REPO).replace(os.sep, "/"), tree)
    return out


def all_violations() -> Set[Tuple[str, str, str]]:
    out: Set[Tuple[str, str, str]] = set()
    for module, path in _modules():
        out |= violations_of(module, path)
    return out | experiments_in_packages() | script_violations()


def test_layer_rules_hold():
    found = all_violations()
    new = sorted(found - KNOWN_VIOLATIONS)
    assert not new, "layering rules broken (see this file's docstring):\n" + "\n".join(map(str, new))


def test_known_violations_list_only_shrinks():
    stale = sorted(KNOWN_VIOLATIONS - all_violations())
    assert not stale, "fixed violations still listed in KNOWN_VIOLATIONS; remove them:\n" + "\n".join(
        map(str, stale))


@pytest.mark.parametrize("source, module, expected", [
    ("import hiseg_oap\n", "hiseg.x", ("hiseg.x", "core imports a project", "hiseg_oap")),
    ("def f():\n    from hiseg_cast.visualize import draw\n", "hiseg_oap.v", ("hiseg_oap.v", "project imports the other project", "hiseg_cast")),
    ("import subprocess, sys\nsubprocess.run([sys.executable, 'tools/train_net.py'])\n", "hiseg_cast.y",
     ("hiseg_cast.y", "library executes or spawns a repository script", "subprocess.run")),
    ("import importlib.util\nimportlib.util.spec_from_file_location('m', 'datasets/prepare_x.py')\n", "hiseg.z",
     ("hiseg.z", "library executes or spawns a repository script", "importlib.util.spec_from_file_location")),
    ("from .experiments import budget\n", "hiseg_cast.moco", ("hiseg_cast.moco", "library imports an experiment driver",
                                                      "hiseg_cast.experiments.budget")),
    ("def f():\n    import cast_vs_vit_report\n", "hiseg_cast.z", ("hiseg_cast.z", "library imports a repository script",
                                                                "cast_vs_vit_report")),
    ("from gpucheck import correctness\n", "hiseg.x", ("hiseg.x", "library imports a repository script", "gpucheck")),
    ("import subprocess, sys\nsubprocess.run([sys.executable, 'dev/gpu_wheels.sh'])\n", "hiseg.w",
     ("hiseg.w", "library executes or spawns a repository script", "subprocess.run")),
    ("import os, sys\nsys.path.insert(0, os.path.dirname(__file__))\n", "hiseg.p",
     ("hiseg.p", "product code edits sys.path", "sys.path.insert")),
    ("import sys\nsys.path[:0] = ['/x']\n", "hiseg.q", ("hiseg.q", "product code edits sys.path", "sys.path =")),
    ("import sys\nsys.path += ['/x']\n", "hiseg.r", ("hiseg.r", "product code edits sys.path", "sys.path =")),
    ("import site\nsite.addsitedir('/x')\n", "hiseg.s", ("hiseg.s", "product code edits sys.path", "site.addsitedir")),
])
def test_checker_catches_each_rule(tmp_path, source, module, expected):
    path = tmp_path / "m.py"
    path.write_text(source)
    assert expected in violations_of(module, str(path))


def test_checker_allows_git_provenance_and_own_imports(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("import subprocess\nfrom hiseg.paths import REPO_ROOT\nfrom . import sibling\n"
                    "subprocess.run(['git', 'rev-parse', 'HEAD'])\n")
    assert violations_of("hiseg_cast.provenance_like", str(path)) == set()


def test_checker_finds_experiments_inside_a_package(tmp_path, monkeypatch):
    (tmp_path / "pkg" / "experiments" / "__pycache__").mkdir(parents=True)
    monkeypatch.setattr(sys.modules[__name__], "REPO", str(tmp_path))
    monkeypatch.setattr(sys.modules[__name__], "PACKAGES", {"pkg": "pkg"})
    assert experiments_in_packages() == set()  # what a moved package leaves behind
    (tmp_path / "pkg" / "experiments" / "run.py").write_text("")
    assert experiments_in_packages() == {("pkg/experiments", "experiments inside an installed package", "pkg")}


def test_checker_allows_reading_sys_path(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("import sys\nprint(list(sys.path), sys.path[0])\nenv = {'PYTHONPATH': 'x'}\n")
    assert violations_of("hiseg.read_only", str(path)) == set()
