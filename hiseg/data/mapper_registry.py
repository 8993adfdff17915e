"""The dataset-mapper registry: ``INPUT.DATASET_MAPPER_NAME`` names a mapper registered here
(empty: detectron2's ``DatasetMapper``). Projects register theirs when imported."""
from detectron2.utils.registry import Registry

__all__ = ["MAPPER_REGISTRY"]

MAPPER_REGISTRY = Registry("HISEG_MAPPER")
MAPPER_REGISTRY.__doc__ = "Dataset mappers selectable with INPUT.DATASET_MAPPER_NAME: cls(cfg, is_train)."
