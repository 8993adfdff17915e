"""Library of ``tools/gpu_check.py``: one prepared run that checks every CUDA path of the project
against its CPU path and measures the papers' speed claims (see ``docs/gpu_check.md``).

Where it lives, and why: the checks import both projects (``cast`` and ``oap``) and the shared
``hiseg`` package. ``hiseg`` must not import the projects and the projects must not import each
other, so the orchestration sits at the tools level, beside the benchmark scripts whose library
code it reuses (``tools/benchmark.py``, ``benchmark_oap.py``, ``benchmark_oap_step.py``).
``tools/gpu_check.py`` puts ``tools/``, the repository root and ``projects/*`` on ``sys.path``
(so it also runs from a checkout without an editable install) and imports this package.

Modules:

* :mod:`.common`: device timing (CUDA events, alternating medians, peak memory), the wall-clock
  budget, the markdown report and the run's provenance (commit, source fingerprint);
* :mod:`.profiles`: the sizes of a full (GPU) run and of the ``--quick`` (CPU) run;
* :mod:`.correctness`: CUDA against CPU (``slic_torch``, OAP, CAST forward), the suite's
  CUDA-only tests, one AMP training step of each trainable meta-architecture;
* :mod:`.memory`: peak GPU memory of a training step per config family at the per-GPU batch of
  docs/distributed.md's 1- and 2-GPU commands;
* :mod:`.speed`: CAST / ViT time ratios with parts, OAP against MaskCut, OAP's share of an
  OAPSegmentor training step.
"""
