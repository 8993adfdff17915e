"""Input checks shared by the command-line tools."""
import os

__all__ = ["InputError", "check_image_file"]


class InputError(Exception):
    """An input that cannot be used; the message names it (tools report it and go on)."""


def check_image_file(path: str) -> None:
    """Raise :class:`InputError` naming ``path`` if it cannot be an image file."""
    if not os.path.exists(path):
        raise InputError(f"{path}: file not found")
    if not os.path.isfile(path):
        raise InputError(f"{path}: not a regular file")
    if os.path.getsize(path) == 0:
        raise InputError(f"{path}: empty file, not an image")
