"""One module per dataset family; :mod:`hiseg.data` imports them and calls their ``register_all``.

Every module registers its datasets lazily: nothing is read at import time, and
``DatasetCatalog.get(name)`` raises ``FileNotFoundError`` (naming the expected path and the
``datasets/prepare_*.py`` script to run) when a dataset's files are absent.
"""
