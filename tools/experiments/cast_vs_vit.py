#!/usr/bin/env python
"""CAST vs ViT + K-means at an equal wall-clock budget (docs/cast_vs_vit.md).

Only parses the command line: the experiment is ``hiseg_cast.experiments.cast_vs_vit``. Examples::

    python tools/experiments/cast_vs_vit.py                      # the full experiment (resumable)
    python tools/experiments/cast_vs_vit.py --quick --out /tmp/q  # a tiny end-to-end run
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from hiseg_cast.experiments.cast_vs_vit import main  # noqa: E402

if __name__ == "__main__":
    main()
