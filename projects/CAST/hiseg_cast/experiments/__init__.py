"""Experiments built from the library: training under a wall-clock budget (:mod:`.budget`) and
the CAST vs ViT comparison (:mod:`.cast_vs_vit`, CLI
``tools/experiments/cast_vs_vit.py``)."""
