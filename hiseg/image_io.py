"""Reading images so that a bad file is named and explained, never half-used.

Decoders are forgiving in ways that hide broken inputs: OpenCV decodes a truncated JPEG, prints
libjpeg's "Premature end of JPEG file" and returns the half-grey picture; PIL does the same when
``ImageFile.LOAD_TRUNCATED_IMAGES`` is set. Here every file is decoded completely by PIL with that
flag off first (:func:`verify_image`), so that

* a missing, empty (0 bytes) or non-regular file,
* a file that is not an image (text, HTML, a Git LFS pointer, a checkpoint, ...),
* a truncated or otherwise damaged image,
* an image of zero width or height

each raise :class:`InputError` whose one-line message names the file, the problem and what to do.
Batch tools catch it, print it as a warning, skip the file and count it in their summary.
"""
import contextlib
import os
import struct
from typing import Optional, Tuple

import numpy as np

from .errors import InputError

__all__ = [
    "InputError",
    "check_image_file",
    "verify_image",
    "read_image",
    "image_size",
    "image_problem",
    "ImageCheckingMapper",
    "describe_file_start",
]

_REDO = "re-download or re-export it"


def check_image_file(path: str) -> None:
    """Raise :class:`InputError` naming ``path`` if it cannot be an image file (absent, not a
    regular file, or empty)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise InputError(f"{path}: file not found; check the path")
    if not os.path.isfile(path):
        raise InputError(f"{path}: not a regular file (a folder?); give an image file")
    if os.path.getsize(path) == 0:
        raise InputError(f"{path}: empty file (0 bytes), not an image; {_REDO}")


def describe_file_start(head: bytes) -> str:
    """What a file that no image decoder accepts looks like, from its first bytes."""
    if head.startswith(b"version https://git-lfs"):
        return "a Git LFS pointer, not the file itself (run `git lfs pull`)"
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive (a PyTorch checkpoint or an archive to unpack?)"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a Python pickle (a checkpoint?)"
    if head.startswith(b"%PDF"):
        return "a PDF document"
    stripped = head.lstrip().lower()
    if stripped.startswith(b"<svg"):
        return "an SVG drawing (vector graphics; export it as PNG)"
    if stripped.startswith((b"<!doctype html", b"<html", b"<?xml")):
        return "an HTML/XML page (a failed download?)"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and text.strip() and all(c.isprintable() or c in "\r\n\t" for c in text):
        first = text.strip().splitlines()[0][:40]
        return f"a text file starting {first!r}"
    return f"unknown content starting with bytes {head[:8].hex(' ')}"


def _header_size(head: bytes) -> Optional[Tuple[int, int]]:
    """(width, height) from the header of a PNG, GIF, BMP or PNM file, or None. Used to explain
    files that PIL refuses because a side is 0."""
    try:
        if head.startswith(b"\x89PNG\r\n\x1a\n") and head[12:16] == b"IHDR":
            return struct.unpack(">II", head[16:24])
        if head[:6] in (b"GIF87a", b"GIF89a"):
            return struct.unpack("<HH", head[6:10])
        if head[:2] == b"BM" and len(head) >= 26:
            w, h = struct.unpack("<ii", head[18:26])
            return w, abs(h)
        if head[:1] == b"P" and head[1:2] and head[1:2] in b"123456":
            tokens = []
            text = head[2:].decode("ascii", errors="replace")
            for line in text.splitlines():
                line = line.split("#", 1)[0]
                tokens += line.split()
                if len(tokens) >= 2:
                    break
            return int(tokens[0]), int(tokens[1])
    except (struct.error, ValueError, IndexError):
        return None
    return None


def _image_magic(head: bytes) -> str:
    """The image format whose signature ``head`` starts with, or ""."""
    signatures = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF8", "GIF"), (b"BM", "BMP"),
                  (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"))
    for magic, name in signatures:
        if head.startswith(magic):
            return name
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    return ""


@contextlib.contextmanager
def _strict_decoding():
    """PIL refuses truncated files inside the block (whatever another module set)."""
    from PIL import ImageFile

    old = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = old


def _head(path: str, n: int = 64) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def _zero_size(path: str, size) -> InputError:
    w, h = size
    return InputError(f"{path}: image of zero size ({w}x{h} pixels), nothing to process; {_REDO}")


def _open_checked(path: str):
    """The fully decoded PIL image of ``path`` (caller closes it), or :class:`InputError`."""
    from PIL import Image, UnidentifiedImageError

    check_image_file(path)
    try:
        with _strict_decoding():
            im = Image.open(path)
            try:
                if 0 in im.size:
                    raise _zero_size(path, im.size)
                im.load()
            except BaseException:
                im.close()
                raise
    except InputError:
        raise
    except UnidentifiedImageError:
        head = _head(path)
        size = _header_size(head)
        if size is not None and 0 in size:
            raise _zero_size(path, size) from None
        kind = _image_magic(head)
        if kind:
            raise InputError(f"{path}: not a readable image: a truncated or damaged {kind} file "
                             f"({os.path.getsize(path)} bytes; its header or data is incomplete); {_REDO}") from None
        raise InputError(f"{path}: not a readable image: {describe_file_start(head)}; "
                         f"give an image file (JPEG, PNG, ...)") from None
    except Image.DecompressionBombError as e:
        raise InputError(f"{path}: refused, too many pixels ({e}); downscale it first") from None
    except OSError as e:
        size = os.path.getsize(path)
        if "truncated" in str(e).lower():
            raise InputError(f"{path}: not a readable image: truncated image file (its data ends early, "
                             f"{size} bytes); the file is incomplete, {_REDO}") from None
        raise InputError(f"{path}: not a readable image: damaged image file ({e}); {_REDO}") from None
    except (SyntaxError, ValueError, struct.error, EOFError) as e:  # PIL's "broken PNG file" & co.
        raise InputError(f"{path}: not a readable image: damaged image file "
                         f"({type(e).__name__}: {e}); {_REDO}") from None
    return im


def verify_image(path: str) -> Tuple[int, int]:
    """Decode ``path`` completely; its (width, height), or :class:`InputError` explaining why
    it cannot be used (see the module docstring)."""
    path = os.fspath(path)
    im = _open_checked(path)
    try:
        return im.size
    finally:
        im.close()


def _scaled_to_uint8(im, path: str) -> np.ndarray:
    """The samples of a PIL image with more than 8 bits per sample (modes ``I;16*``, ``I``,
    ``F``) as an HxW uint8 array, by what the mode means, never by the image's own range:

    * ``I;16``, ``I;16L``, ``I;16B``, ``I;16N`` (16-bit grey PNG / TIFF / PGM): ``round(v / 257)``,
      so 65535 -> 255 and 8-bit data stored as ``v * 257`` comes back exactly;
    * ``I`` (32-bit integer samples): 16-bit data as above when every value lies in
      ``[0, 65535]`` (how some decoders hand over 16-bit files), else mapped linearly from the
      image's [min, max] to [0, 255] (there is no fixed white for signed 32-bit data);
    * ``F`` (32-bit float): ``[0, 1]`` data times 255 when every value lies in ``[0, 1]``, else
      taken as ``[0, 255]`` and clipped (the convention of ``hiseg_cast.superpixels.to_rgb_uint8``).

    PIL's own ``convert("RGB")`` clips such samples at 255 instead, which makes a typical 16-bit
    photograph almost entirely white."""
    arr = np.asarray(im)
    if im.mode == "F":
        arr = arr.astype(np.float64)
        if not np.isfinite(arr).all():
            raise InputError(f"{path}: floating-point image with NaN or infinite pixels; re-export it")
        top = float(arr.max()) if arr.size else 0.0
        scale = 255.0 if top <= 1.0 and float(arr.min()) >= 0.0 else 1.0
        return np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8)
    arr = arr.astype(np.int64)
    lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
    if im.mode.startswith("I;16") or (lo >= 0 and hi <= 65535):
        return ((arr * 2 + 257) // 514).astype(np.uint8)  # round(v / 257), half up
    span = max(hi - lo, 1)
    return ((arr - lo) * 255 // span).astype(np.uint8)


def _to_array(im, path: str, format: Optional[str]) -> np.ndarray:
    """``im`` (EXIF-oriented) as detectron2's ``convert_PIL_to_numpy(im, format)`` would give
    it, except that samples wider than 8 bits are scaled (:func:`_scaled_to_uint8`) and a
    palette image with transparency goes through RGBA (as PIL asks)."""
    from detectron2.data.detection_utils import convert_PIL_to_numpy

    if format in ("RGB", "BGR", "L") and (im.mode.startswith("I") or im.mode == "F"):
        grey = _scaled_to_uint8(im, path)
        if format == "L":
            return grey[:, :, None]
        return np.repeat(grey[:, :, None], 3, axis=2)  # grey: RGB and BGR alike
    if format is not None and im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    try:
        return convert_PIL_to_numpy(im, format)
    except ValueError as e:  # a mode PIL cannot convert (e.g. LAB -> RGB)
        raise InputError(f"{path}: image mode {im.mode} cannot be converted to {format} ({e}); "
                         f"re-export it as RGB") from None


def read_image(path: str, format: str = "RGB") -> np.ndarray:
    """The pixels of ``path`` after the checks of :func:`verify_image`: THE image reader of the
    tools and the project's mappers, so that every one sees the same pixels of a file.

    * EXIF orientation is applied (as detectron2's ``read_image``, and as cameras mean it);
    * ``format`` "RGB" / "BGR" give HxWx3 uint8, "L" HxWx1 uint8, whatever the file's mode:
      grey (``1``, ``L``), grey + alpha (``LA``), palette (``P``, ``PA``, with or without
      transparency), ``RGBA`` (alpha dropped), ``CMYK``, ``YCbCr``, and 16-bit / 32-bit
      integer or float grey (``I;16``, ``I``, ``F``), which is scaled to 8 bits by what the
      mode means (:func:`_scaled_to_uint8`) instead of PIL's clipping at 255;
    * ``format=None`` gives the stored samples unchanged (label maps).

    The array is writable (its own copy).
    """
    from PIL import ImageOps

    path = os.fspath(path)
    im = _open_checked(path)
    try:
        try:
            oriented = ImageOps.exif_transpose(im)
        except Exception:  # noqa: BLE001  (a damaged EXIF block: keep the stored orientation)
            oriented = im
        arr = _to_array(oriented, path, format)
    finally:
        im.close()
    if arr.size == 0:
        raise _zero_size(path, (arr.shape[1] if arr.ndim > 1 else 0, arr.shape[0]))
    return arr if arr.flags.writeable else arr.copy()  # PIL's buffer is read-only; callers may draw on it


def image_size(path: str) -> Tuple[int, int]:
    """``(height, width)`` of ``path`` as :func:`read_image` gives its pixels (EXIF orientation
    5-8 swaps the stored sides), from the header only; for the ``height`` / ``width`` that
    dataset records carry (detectron2 checks them against the decoded image)."""
    from PIL import Image

    with Image.open(os.fspath(path)) as im:
        w, h = im.size
        try:
            orientation = im.getexif().get(0x0112, 1)
        except Exception:  # noqa: BLE001  (a damaged EXIF block: read_image keeps the stored orientation)
            orientation = 1
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


def image_problem(path) -> Optional[InputError]:
    """The :class:`InputError` that :func:`verify_image` raises for ``path``, or None if the
    file is a complete, non-empty image."""
    if not path:
        return None
    try:
        verify_image(path)
    except InputError as e:
        return e
    return None


class ImageCheckingMapper:
    """Wraps a dataset mapper (``dict -> dict``): when it fails on a record whose
    ``file_name`` is a bad image, the failure becomes that image's :class:`InputError`.

    Nothing is checked on success, so training and evaluation read every file once, as before;
    only a failing record's image is examined. A truncated image that the mapper decoded without
    error is still caught, since PIL refuses truncated files by default.
    """

    def __init__(self, mapper):
        self.mapper = mapper

    def __getattr__(self, name):  # the wrapped mapper's attributes (is_train, ...)
        if name == "mapper":
            raise AttributeError(name)
        return getattr(self.mapper, name)

    def __call__(self, dataset_dict):
        try:
            return self.mapper(dataset_dict)
        except Exception as e:
            name = dataset_dict.get("file_name") if isinstance(dataset_dict, dict) else None
            problem = image_problem(name) if isinstance(name, (str, os.PathLike)) else None
            if problem is None:
                raise
            raise InputError(f"{problem}; or leave it out of the dataset") from e
