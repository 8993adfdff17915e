"""Which evaluators score a test dataset: the evaluator-factory registry and ``build_evaluators``.

A factory ``factory(cfg, dataset_name, output_folder) -> [DatasetEvaluator, ...]`` is registered
under an ``evaluator_type`` with :func:`register_evaluator_factory`; the shared core registers its
own when this module is imported, a project registers its factories when it is imported (e.g.
``hiseg_oap`` adds the cluster evaluators). A test dataset is scored by the factories of its
``metadata.evaluator_type``, or of the ``TEST.EVALUATORS`` entries that apply to it.
"""
import os
import re
from typing import Callable, Dict, List

from detectron2.data import MetadataCatalog
from detectron2.evaluation import DatasetEvaluators

__all__ = ["EVALUATOR_FACTORIES", "register_evaluator_factory", "evaluator_types", "build_evaluators"]

#: evaluator_type -> factory(cfg, dataset_name, output_folder) -> list of evaluators
EVALUATOR_FACTORIES: Dict[str, Callable] = {}


def register_evaluator_factory(evaluator_type: str):
    """Decorator registering a factory under ``evaluator_type``. Registering the same function
    again (also after a module reload) changes nothing; another function under a taken name is
    an error, not a replacement."""

    def deco(factory: Callable) -> Callable:
        current = EVALUATOR_FACTORIES.get(evaluator_type)
        if current is not None and (current.__module__, current.__qualname__) != (
                factory.__module__, factory.__qualname__):
            raise ValueError(f"evaluator_type {evaluator_type!r} is already registered by {current!r}")
        EVALUATOR_FACTORIES[evaluator_type] = factory
        return factory

    return deco


def evaluator_types(cfg, dataset_name: str) -> List[str]:
    """The evaluator types for one test dataset.

    ``TEST.EVALUATORS`` entries are either ``"<type>"`` (every test dataset) or
    ``"<dataset>:<type>"`` (that dataset only); without an entry that applies, the dataset's
    ``metadata.evaluator_type`` is used.
    """
    types = []
    for entry in cfg.TEST.EVALUATORS:
        name, sep, t = entry.rpartition(":")
        if not sep:
            types.append(entry)
        elif name == dataset_name:
            types.append(t)
        elif name not in cfg.DATASETS.TEST:
            raise ValueError(f"TEST.EVALUATORS entry {entry!r} names dataset {name!r}, which is not in "
                             f"DATASETS.TEST {tuple(cfg.DATASETS.TEST)}")
    return types or [getattr(MetadataCatalog.get(dataset_name), "evaluator_type", None)]


def build_evaluators(cfg, dataset_name: str, output_folder: str = None):
    """The evaluator(s) of one test dataset (one, or a ``DatasetEvaluators`` of several)."""
    # a name such as "coco:ann.json:images" (hiseg.data.datasets.user_data) as one folder name
    output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", re.sub(r"[^\w.-]+", "_", dataset_name))
    types = evaluator_types(cfg, dataset_name)
    evaluators = []
    for t in types:
        if t not in EVALUATOR_FACTORIES:
            raise ValueError(f"no evaluator for evaluator_type {t!r} of dataset {dataset_name!r}; "
                             f"known: {sorted(EVALUATOR_FACTORIES)} (set TEST.EVALUATORS or the metadata)")
        evaluators += EVALUATOR_FACTORIES[t](cfg, dataset_name, output_folder)
    return evaluators[0] if len(evaluators) == 1 else DatasetEvaluators(evaluators)


# the shared core's factories register themselves (each beside its evaluator)
from . import (boundary_fscore, classification, detectron2_evaluators, figure_ground,  # noqa: E402,F401
               hierarchical_evaluator)
