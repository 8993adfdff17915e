"""The GPU check (``tools/gpu_check.py``, docs/gpu_check.md): one prepared run that checks every
CUDA path of the project against its CPU path and measures the papers' speed claims.

Where it lives, and why: it is a developer's tool, not part of the installed packages. It imports
the shared core ``hiseg`` and both projects, which no library module may do (``hiseg`` knows no
project, a project never the other), so it sits in ``dev/`` beside the GPU machine's wheels
(``dev/gpu_wheels.sh``). ``tools/gpu_check.py`` loads this package from the checkout by its
location; what it shares with the benchmark tools is library code: timing in
:mod:`hiseg.benchmark`, the sample pictures and CAST's part timer in :mod:`hiseg_cast.benchmark`,
OAP's synthetic features in :mod:`hiseg_oap.pooling.benchmark` and training batches in
:mod:`hiseg_oap.data.synthetic`, markdown cells in :mod:`hiseg.utils.markdown`, the commit in
:mod:`hiseg.provenance`.

Modules:

* :mod:`.cli`: the command line and the order of the parts;
* :mod:`.budget`: the wall-clock budget the parts share;
* :mod:`.report`: the markdown report, row statuses, which rows fail the run;
* :mod:`.precision`: AMP dtype, autocast, one training step, true fp32, relative errors;
* :mod:`.provenance`: the run's commit (git or stamp), source fingerprint, environment;
* :mod:`.profiles`: the sizes of a full (GPU) run and of the ``--quick`` (CPU) run;
* :mod:`.correctness`: CUDA against CPU (``slic_torch``, OAP, CAST forward), the suite's
  CUDA-only tests, one AMP training step of each trainable meta-architecture;
* :mod:`.memory`: peak GPU memory of a training step per config family at the per-GPU batch of
  docs/distributed.md's 1- and 2-GPU commands;
* :mod:`.speed`: CAST / ViT time ratios with parts, OAP against MaskCut, OAP's share of an
  OAPSegmentor training step.
"""
from pathlib import Path

#: the checkout this check runs from (configs, tests and the fingerprinted sources)
REPO = Path(__file__).resolve().parents[2]
