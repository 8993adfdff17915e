"""Pseudo-masks as COCO-format files: making them from images, writing, filtering and evaluating them.

Pseudo-mask generation stands apart from training, as CutLER's ``maskcut/`` does from
``cutler/``: the two meet only through COCO JSON (a results list, or a full annotation file to
train a detector on). ``tools/generate_pseudo_masks.py`` parses its flags and calls this package;
each part is usable on its own.

Files (COCO results, the format of CutLER's pseudo-labels and of ``COCO.loadRes``):

* :mod:`.encoding`: one binary mask at image size <-> one result entry (``image_id``,
  ``category_id`` 1, RLE ``segmentation`` with ``counts`` as ``str``, ``bbox`` xywh computed from
  the mask, ``score``, plus any extra fields such as ``level`` / ``layer``);
* :mod:`.levels`: which OAP layers and kinds to export (``instance``, ``semantic:-1``, ``all:0-2``);
* :mod:`.scoring`: the score given to a mask (:func:`coherence_scores`);
* :mod:`.export`: one :class:`~hiseg_oap.pooling.PseudoMasks` -> result entries;
* :mod:`.filtering`: the export filters (masks covering most of the image, a maximum per image);
* :mod:`.io`: :func:`validate_results`, :func:`write_results` (atomic), :func:`load_results`,
  :func:`results_to_coco_dataset` (a full annotation file to train on, as CutLER's
  ``imagenet_train_fixsize480_tau0.15_N3.json``);
* :mod:`.evaluate`: detectron2's ``COCOEvaluator`` on a ground truth whose categories are
  collapsed into one (``fg``), with AR added to AP.

Making them (the tool's library):

* :mod:`.inputs`: the images (files, folders, patterns or a registered dataset) and the ground truth;
* :mod:`.preprocess`: an image file -> the network input;
* :mod:`.feature_sources`: a ViT's attention keys, a detectron2 backbone's output, or the
  pretrained EfficientNet-Lite0's maps; :mod:`.vit_weights`: the ViT (random or converted weights);
* :mod:`.generate`: the per-image loop; :mod:`.overlays`: pictures of the masks.
"""
from .encoding import bbox_from_mask, decode_segmentation, encode_mask, mask_to_result, masks_to_results, rle_for_api
from .evaluate import evaluate_results, format_metrics, load_ground_truth
from .export import UPSAMPLE_PIXELS, pseudo_masks_to_results
from .filtering import DEFAULT_MAX_AREA_FRACTION, DEFAULT_MAX_PER_IMAGE, filter_results, mask_area_fraction
from .generate import Generated, build_pseudo_mask_generator, generate_results
from .io import load_results, results_to_coco_dataset, validate_results, write_results
from .levels import KINDS, parse_level_specs, resolve_levels
from .scoring import SCORES, coherence_scores

__all__ = [
    "KINDS", "SCORES",
    "encode_mask", "rle_for_api", "decode_segmentation", "bbox_from_mask", "mask_to_result", "masks_to_results",
    "parse_level_specs", "resolve_levels", "coherence_scores", "UPSAMPLE_PIXELS", "pseudo_masks_to_results",
    "DEFAULT_MAX_AREA_FRACTION", "DEFAULT_MAX_PER_IMAGE", "mask_area_fraction", "filter_results",
    "validate_results", "write_results", "load_results", "results_to_coco_dataset",
    "load_ground_truth", "evaluate_results", "format_metrics",
    "build_pseudo_mask_generator", "Generated", "generate_results",
]
