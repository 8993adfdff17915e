"""Multi-crop dataset mapper of OAP's teacher-student pre-training (OAP, Sec. 4.1, 5.1).

OAP, Sec. 4.1: "given an image, we use multi-crop (Caron et al. (2020)) augmentation to get a set
of local views from the original view. The original view is input to the teacher branch [...]
Simultaneously, each local view is fed to the student encoder". Sec. 5.1: "We use a local crop
scale between 0.05 and 0.4 for multi-crop augmentation. The images are resized to 448 as input."

One training sample is therefore

* ``"image"``: the global ("original") view, the teacher's input: the image resized so that its
  shortest edge is ``global_size`` (Sec. 5.1: "resized to 448"), then a random
  ``global_size x global_size`` crop, then an optional horizontal flip. The paper does not say how
  non-square images are made to batch; a square crop of the shortest-edge-resized image keeps the
  scale of Sec. 5.1 and a fixed size. No photometric augmentation: the teacher's pseudo-masks
  come from its features, and Fig. 2 shows the un-augmented original view in the teacher branch.
* ``"local_images"``: ``num_local_crops`` local views, each a random resized crop *of the global
  view* (so it is inside what the teacher saw, and its teacher pseudo-masks can be cropped from
  the teacher's, Sec. 4.3) with area scale in ``local_scale`` and aspect ratio in
  ``local_ratio``, resized to ``local_size x local_size``, optionally mirrored, and with DINO's
  photometric augmentations (student views only).
* ``"local_boxes"`` / ``"local_flips"``: where each local view lies in the global view, and
  whether it was mirrored; :func:`hiseg_oap.data.crop_targets.crop_masks_to_views` uses them to crop the
  teacher's masks.

Choices where the paper is silent:

* Crop boxes are pixel-aligned (integers), like torchvision's ``RandomResizedCrop``: a local view
  is then exactly "crop ``[y0, y1) x [x0, x1)`` of the global view, resize", and its box in
  continuous coordinates (pixel ``i`` spans ``[i, i + 1)``) is ``(x0, y0, x1, y1)``. Width and
  height are ``round(sqrt(area * ratio))`` and ``round(sqrt(area / ratio))`` clipped to the view,
  with area ~ U(local_scale) * G^2 and log(ratio) ~ U(log local_ratio) (torchvision's sampling,
  without its rejection loop, which never rejects for a square view and the default scales).
* Resizing is bilinear with antialiasing (torchvision's ``resize(..., antialias=True)``, which
  matches PIL's), so strong down-scaling of the global view does not alias. DINO uses bicubic;
  bilinear keeps values in range and mirrors detectron2's default ``ResizeShortestEdge``.
* Photometric augmentations (``local_color_aug``) follow DINO's (Caron et al. 2021)
  ``DataAugmentationDINO``: colour jitter (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1)
  with p = 0.8, greyscale with p = 0.2, Gaussian blur (sigma ~ U(0.1, 2.0)) with p = 0.5 (DINO's
  local-crop probability), and solarisation (threshold 128) with p = 0.2. DINO solarises only its
  second global view, which is a student input there; in OAP the teacher sees the un-augmented
  view, so solarisation is moved to the student's local views to keep DINO's full photometric
  set. These probabilities are the module constants below. All colour operations run in RGB
  order; the output is converted to ``image_format`` (BGR by default) at the end.
* Ground-truth fields (``annotations``, ``sem_seg_file_name``, ``pan_seg_file_name``,
  ``segments_info``) are dropped from training dicts: pre-training is self-supervised and they
  describe the original image, not the views.

Randomness: every random draw uses torch's global RNG (torchvision's colour-jitter sampler
included). ``torch.manual_seed(s)`` before ``mapper(d)`` reproduces the views exactly; in
detectron2's data loaders each worker is seeded through ``seed_all_rng`` (``cfg.SEED``), which
seeds torch too.

``is_train=False`` delegates to detectron2's standard test ``DatasetMapper`` (``ResizeShortestEdge``
with ``INPUT.MIN_SIZE_TEST`` / ``MAX_SIZE_TEST``), so the same mapper name serves evaluation.
"""
import copy
import math
from typing import Callable, Optional, Sequence, Tuple

import numpy as np
import torch
import torchvision.transforms.functional as TF
from detectron2.config import configurable
from detectron2.data import DatasetMapper
from detectron2.data import detection_utils as utils
from torchvision.transforms import ColorJitter, InterpolationMode

from hiseg.data.mapper_registry import MAPPER_REGISTRY
from hiseg.image_io import InputError, check_image_file, read_image

__all__ = ["OAPMultiCropDatasetMapper", "sample_crop_box", "dino_photometric_augment",
           "COLOR_JITTER", "COLOR_JITTER_P", "GRAYSCALE_P", "BLUR_P", "BLUR_SIGMA", "SOLARIZE_P",
           "SOLARIZE_THRESHOLD"]

# DINO's photometric augmentations (Caron et al. 2021, DataAugmentationDINO); see the module doc.
COLOR_JITTER = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue
COLOR_JITTER_P = 0.8
GRAYSCALE_P = 0.2
BLUR_P = 0.5  # DINO's local crops
BLUR_SIGMA = (0.1, 2.0)
SOLARIZE_P = 0.2  # DINO's second global view (see the module doc)
SOLARIZE_THRESHOLD = 128

_GT_KEYS = ("annotations", "sem_seg_file_name", "pan_seg_file_name", "segments_info")
_FORMATS = ("BGR", "RGB")


def _rand() -> float:
    return float(torch.rand(()))


def _uniform(lo: float, hi: float) -> float:
    return float(torch.empty(()).uniform_(lo, hi)) if hi > lo else float(lo)


def _randint(lo: int, hi_inclusive: int) -> int:
    return int(torch.randint(lo, hi_inclusive + 1, ()))


def sample_crop_box(height: int, width: int, scale: Sequence[float],
                    ratio: Sequence[float]) -> Tuple[int, int, int, int]:
    """A random pixel-aligned crop ``(x0, y0, x1, y1)`` of an ``height x width`` image.

    Area ~ U(scale) * height * width, log aspect ratio (w / h) ~ U(log ratio); width and height are
    rounded and clipped to the image (so the area can leave ``scale`` only where the ratio range
    does not fit the image), the position is uniform. Uses torch's global RNG.
    """
    area = _uniform(scale[0], scale[1]) * height * width
    aspect = math.exp(_uniform(math.log(ratio[0]), math.log(ratio[1])))
    w = min(max(int(round(math.sqrt(area * aspect))), 1), width)
    h = min(max(int(round(math.sqrt(area / aspect))), 1), height)
    x0 = _randint(0, width - w)
    y0 = _randint(0, height - h)
    return x0, y0, x0 + w, y0 + h


def dino_photometric_augment(img: torch.Tensor) -> torch.Tensor:
    """DINO's photometric augmentations of one ``(3, H, W)`` uint8 RGB view (see the module doc).

    Colour jitter (p = ``COLOR_JITTER_P``, DINO's random order of the four adjustments),
    greyscale (p = ``GRAYSCALE_P``), Gaussian blur (p = ``BLUR_P``, sigma ~ U(``BLUR_SIGMA``),
    kernel ``2 ceil(3 sigma) + 1``), solarisation (p = ``SOLARIZE_P``). Uses torch's global RNG.
    """
    if _rand() < COLOR_JITTER_P:
        b, c, s, h = COLOR_JITTER
        order, bf, cf, sf, hf = ColorJitter.get_params([1 - b, 1 + b], [1 - c, 1 + c], [1 - s, 1 + s], [-h, h])
        for fn in order.tolist():
            if fn == 0:
                img = TF.adjust_brightness(img, bf)
            elif fn == 1:
                img = TF.adjust_contrast(img, cf)
            elif fn == 2:
                img = TF.adjust_saturation(img, sf)
            else:
                img = TF.adjust_hue(img, hf)
    if _rand() < GRAYSCALE_P:
        img = TF.rgb_to_grayscale(img, num_output_channels=3)
    if _rand() < BLUR_P:
        sigma = _uniform(*BLUR_SIGMA)
        k = 2 * math.ceil(3 * sigma) + 1
        img = TF.gaussian_blur(img, [k, k], [sigma, sigma])
    if _rand() < SOLARIZE_P:
        img = TF.solarize(img, SOLARIZE_THRESHOLD)
    return img


def _check_range(value, name: str, lo_min: float, hi_max: Optional[float]) -> Tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (min, max), got {value!r}") from None
    if not (lo_min < lo <= hi) or (hi_max is not None and hi > hi_max) or not math.isfinite(hi):
        bound = f"{lo_min} < min <= max" + (f" <= {hi_max}" if hi_max is not None else "")
        raise ValueError(f"{name} must satisfy {bound}, got {value!r}")
    return lo, hi


def _check_positive_int(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


@MAPPER_REGISTRY.register()
class OAPMultiCropDatasetMapper:
    """Global view (teacher) + ``num_local_crops`` local views (student) of an image.

    See the module docstring for the output fields, the paper's text behind them and the choices
    made where it is silent. Constructed as ``OAPMultiCropDatasetMapper(cfg, is_train)`` from
    ``INPUT.OAP.*`` and ``INPUT.FORMAT`` (select it with
    ``INPUT.DATASET_MAPPER_NAME = "OAPMultiCropDatasetMapper"``), or with explicit arguments.

    Args:
        is_train: multi-crop views if True; detectron2's standard test mapping otherwise.
        image_format: channel order of the output images, "BGR" or "RGB".
        global_size: G, the side of the square global view.
        global_flip: mirror the global view with p = 0.5.
        num_local_crops: N >= 1 local views.
        local_size: s, the side of each local view.
        local_scale: (min, max) area of a local crop as a fraction of the global view's.
        local_ratio: (min, max) aspect ratio (width / height) of a local crop.
        local_flip: mirror each local view with p = 0.5.
        local_color_aug: DINO's photometric augmentations on the local views.
        test_mapper: the mapper used when ``is_train`` is False (``from_config`` passes
            ``detectron2.data.DatasetMapper(cfg, False)``); built from detectron2's defaults
            (shortest edge 800, longest 1333) if None. Not part of the training interface.
    """

    @configurable
    def __init__(self, is_train=True, *, image_format="BGR", global_size=448, global_flip=True, num_local_crops=4,
                 local_size=224, local_scale=(0.05, 0.4), local_ratio=(3 / 4, 4 / 3), local_flip=True,
                 local_color_aug=True, test_mapper: Optional[Callable] = None):
        if image_format not in _FORMATS:
            raise ValueError(f"image_format must be one of {_FORMATS} (colour augmentations need three "
                             f"colour channels), got {image_format!r}")
        self.is_train = bool(is_train)
        self.image_format = image_format
        self.global_size = _check_positive_int(global_size, "global_size")
        self.global_flip = bool(global_flip)
        self.num_local_crops = _check_positive_int(num_local_crops, "num_local_crops")
        self.local_size = _check_positive_int(local_size, "local_size")
        self.local_scale = _check_range(local_scale, "local_scale", 0.0, 1.0)
        self.local_ratio = _check_range(local_ratio, "local_ratio", 0.0, None)
        self.local_flip = bool(local_flip)
        self.local_color_aug = bool(local_color_aug)
        if not self.is_train and test_mapper is None:
            from detectron2.data import transforms as T

            test_mapper = DatasetMapper(is_train=False, augmentations=[T.ResizeShortestEdge(800, 1333)],
                                        image_format=image_format)
        self.test_mapper = test_mapper

    @classmethod
    def from_config(cls, cfg, is_train=True):
        if "OAP" not in cfg.INPUT:
            raise ValueError("cfg.INPUT.OAP is missing: call hiseg_oap.add_oap_config(cfg) before building "
                             "OAPMultiCropDatasetMapper")
        c = cfg.INPUT.OAP
        return {
            "is_train": is_train,
            "image_format": cfg.INPUT.FORMAT,
            "global_size": c.GLOBAL_SIZE,
            "global_flip": c.GLOBAL_FLIP,
            "num_local_crops": c.NUM_LOCAL_CROPS,
            "local_size": c.LOCAL_SIZE,
            "local_scale": tuple(c.LOCAL_SCALE),
            "local_ratio": tuple(c.LOCAL_RATIO),
            "local_flip": c.LOCAL_FLIP,
            "local_color_aug": c.LOCAL_COLOR_AUG,
            "test_mapper": None if is_train else DatasetMapper(cfg, False),
        }

    # ------------------------------------------------------------------ views
    def _read_rgb(self, dataset_dict) -> np.ndarray:
        if "file_name" not in dataset_dict:
            raise ValueError(f"dataset dict has no 'file_name' (keys: {sorted(dataset_dict)})")
        path = dataset_dict["file_name"]
        try:
            check_image_file(path)
        except InputError as e:
            raise ValueError(str(e)) from e
        try:
            image = read_image(path, format="RGB")  # hiseg.image_io: the one reader (EXIF, 16-bit)
        except Exception as e:  # PIL's errors for a file that is not an image
            raise ValueError(f"{path}: cannot be read as an image ({e})") from e
        utils.check_image_size(dataset_dict, image)  # SizeMismatchError is a ValueError
        return image

    def global_view(self, image: torch.Tensor) -> torch.Tensor:
        """(3, H, W) uint8 -> (3, G, G): shortest edge to G, random G x G crop, optional flip."""
        g = self.global_size
        h, w = image.shape[1:]
        if h <= w:
            size = [g, max(g, int(round(w * g / h)))]
        else:
            size = [max(g, int(round(h * g / w))), g]
        if size != [h, w]:
            image = TF.resize(image, size, interpolation=InterpolationMode.BILINEAR, antialias=True)
        y0 = _randint(0, size[0] - g)
        x0 = _randint(0, size[1] - g)
        image = image[:, y0:y0 + g, x0:x0 + g]
        if self.global_flip and _rand() < 0.5:
            image = image.flip(-1)
        return image.contiguous()

    def local_views(self, view: torch.Tensor):
        """Local views of a (3, G, G) uint8 RGB global view: (images, boxes, flips)."""
        g = view.shape[1]
        s = self.local_size
        images = torch.empty(self.num_local_crops, 3, s, s, dtype=torch.uint8)
        boxes = torch.empty(self.num_local_crops, 4, dtype=torch.float32)
        flips = torch.zeros(self.num_local_crops, dtype=torch.bool)
        for n in range(self.num_local_crops):
            x0, y0, x1, y1 = sample_crop_box(g, view.shape[2], self.local_scale, self.local_ratio)
            crop = TF.resize(view[:, y0:y1, x0:x1], [s, s], interpolation=InterpolationMode.BILINEAR,
                             antialias=True)
            if self.local_flip and _rand() < 0.5:
                crop = crop.flip(-1)
                flips[n] = True
            if self.local_color_aug:
                crop = dino_photometric_augment(crop)
            images[n] = crop
            boxes[n] = torch.tensor([x0, y0, x1, y1], dtype=torch.float32)
        return images, boxes, flips

    def _to_format(self, chw_rgb: torch.Tensor) -> torch.Tensor:
        if self.image_format == "BGR":
            chw_rgb = chw_rgb.flip(-3)
        return chw_rgb.contiguous()

    def __call__(self, dataset_dict) -> dict:
        if not self.is_train:
            return self.test_mapper(dataset_dict)
        d = copy.deepcopy(dataset_dict)
        image = torch.from_numpy(np.ascontiguousarray(self._read_rgb(d).transpose(2, 0, 1)))
        for k in _GT_KEYS:
            d.pop(k, None)
        view = self.global_view(image)
        local_images, local_boxes, local_flips = self.local_views(view)
        d["image"] = self._to_format(view)
        d["local_images"] = self._to_format(local_images)
        d["local_boxes"] = local_boxes
        d["local_flips"] = local_flips
        return d
