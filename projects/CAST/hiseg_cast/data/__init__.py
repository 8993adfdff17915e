"""CAST's data: the dataset mappers (:mod:`.dataset_mappers`, registered on import); the datasets
live in the shared core, :mod:`hiseg.data`."""
from . import dataset_mappers  # noqa: F401
