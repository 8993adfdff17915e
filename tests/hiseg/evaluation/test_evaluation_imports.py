"""Every module of ``hiseg.evaluation`` imports on its own, as the first one: the evaluator
registry imports every core evaluator, so an evaluator that took a helper from another evaluator
(instead of :mod:`hiseg.evaluation.label_maps`) failed with a circular import when it came first."""
import subprocess
import sys

_IMPORT_EACH_FIRST = """
import importlib, pkgutil, sys
import hiseg.evaluation as package
names = sorted(m.name for m in pkgutil.iter_modules(package.__path__))
for name in names:
    for loaded in [k for k in sys.modules if k.startswith("hiseg.evaluation.")]:
        del sys.modules[loaded]
    importlib.import_module("hiseg.evaluation." + name)
print(len(names))
"""


def test_each_evaluation_module_imports_first():
    res = subprocess.run([sys.executable, "-c", _IMPORT_EACH_FIRST], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert int(res.stdout.split()[-1]) >= 10
