"""Errors that mean "the user gave a bad file or setting", not "the program has a bug".

Every entry point (``tools/*.py``, ``datasets/prepare_*.py``) runs its ``main`` through
:func:`hiseg.cli.run_cli`, which prints such an error as ONE line on stderr (``error: ...``) and
exits with the error's :attr:`UserError.exit_code` instead of showing a traceback. A message
names the file (or key), says what is wrong with it and what to do, in that order.

The classes take exactly one argument, the message: torch's DataLoader re-raises an exception of
a worker as ``type(e)(text)``, and this keeps the type (and so the one-line report) intact.
"""

__all__ = [
    "UserError",
    "UsageError",
    "ConfigError",
    "CheckpointError",
    "InputError",
    "DatasetNotFoundError",
    "EmptyDatasetError",
    "SkippedInputsError",
    "OutputError",
    "TrainingDivergedError",
]


class UserError(Exception):
    """A bad input, reported as one line with exit status :attr:`exit_code` (2)."""

    exit_code = 2


class UsageError(UserError):
    """A bad command-line argument: an output path that cannot be written, a device this machine
    lacks, a value out of range, flags that exclude each other."""


class ConfigError(UserError):
    """A missing config file, an unknown (misspelled) key, a bad value or override."""


class CheckpointError(UserError):
    """A weights file that is not a checkpoint, is damaged, or belongs to another model."""


class InputError(UserError):
    """One input file (an image) that cannot be used. Batch tools report it as a warning, skip
    the file and count it in their summary."""


class DatasetNotFoundError(UserError, FileNotFoundError):
    """A dataset folder or file that does not exist. Also a ``FileNotFoundError``, which the
    dataset loaders raised before and callers catch."""


class EmptyDatasetError(DatasetNotFoundError):
    """A dataset whose folders exist but hold nothing to use (also a ``FileNotFoundError``:
    the files it needs are not there)."""


class SkippedInputsError(UserError):
    """Raised at the end of a batch tool that skipped some inputs (each already reported as a
    warning); the message is the summary. Exit status 1: the other inputs were processed."""

    exit_code = 1


class OutputError(UserError):
    """An output folder or file that cannot be written: read-only, not a folder, or a full disk."""


class TrainingDivergedError(UserError):
    """The loss or the weights became NaN or infinite (a learning rate too high for the run)."""
