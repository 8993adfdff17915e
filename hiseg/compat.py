"""Differences between detectron2 v0.6 (pure-Python sdist) and upstream main, in one place."""
import functools

from detectron2.layers import ShapeSpec

__all__ = ["has_compiled_ops", "shape_spec", "coco_evaluator_kwargs"]


@functools.lru_cache(maxsize=None)
def has_compiled_ops() -> bool:
    """True when ``detectron2._C`` is a real compiled extension (not absent, not our stub)."""
    try:
        from detectron2 import _C
    except ImportError:
        return False
    return not getattr(_C, "IS_PURE_PYTHON_STUB", False)


def shape_spec(channels=None, height=None, width=None, stride=None) -> ShapeSpec:
    """``ShapeSpec`` is a namedtuple in v0.6 and a dataclass on main: build it by keyword."""
    return ShapeSpec(channels=channels, height=height, width=width, stride=stride)


def coco_evaluator_kwargs() -> dict:
    """Keyword arguments that make ``COCOEvaluator`` work with or without ``detectron2._C``."""
    return {"use_fast_impl": has_compiled_ops()}
