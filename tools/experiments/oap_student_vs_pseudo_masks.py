#!/usr/bin/env python
"""Does the OAP student surpass its own pseudo-masks? (docs/oap_student_vs_pseudo_masks.md)

Only parses the command line: the experiment is ``hiseg_oap.experiments.student_vs_pseudo_masks``::

    python tools/experiments/oap_student_vs_pseudo_masks.py \
        --vit-weights output/cast_vs_vit/runs/vit_s0/point_5.pth --iters 400
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from hiseg.cli import script_main  # noqa: E402
from hiseg_oap.experiments.student_vs_pseudo_masks import main  # noqa: E402

if __name__ == "__main__":
    script_main(main, result_is_status=False)
