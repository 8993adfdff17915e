"""Convert released CAST, DINO and timm ViT weights to Detectron2 checkpoints.

Layouts read (command line: ``tools/convert_cast_checkpoint.py``):

* ``cast-moco``: the authors' MoCo-v3 ``checkpoint_0099.pth.tar`` = {epoch, arch, state_dict,
  optimizer, scaler}. ``module.base_encoder.*`` is kept without ``head``; the momentum encoder and
  the predictor are dropped. Classification variants store each block twice, ``blocks.{i}`` and
  ``blocks{k}.{i}`` (group k, original flat numbering): the flat copy is kept after checking that
  both are identical. The fixed sin-cos ``pos_embed`` is checked against ours and dropped.
* ``cast-seg-moco``: the authors' COCO MoCo-v3 pre-training of the *segmentation* model
  (``-a cast_seg_small_pretrain``, ``checkpoint_0149.pth.tar`` / ``checkpoint_0399.pth.tar``),
  the start of their VOC fine-tuning: same wrapper as ``cast-moco``, blocks numbered within
  each group only (``blocks1.0-2``, ``blocks2.0-2``, ...; renumbered to ``blocks.i``), no final
  ``norm``, and ``block_fusion.*`` (folded into the backbone's ``fuse``, see
  :mod:`.released_heads`).
* ``cast-lincls``: ``main_lincls_suppix.py``'s ``checkpoint.pth.tar`` = {epoch, arch,
  state_dict, best_acc1, optimizer}; ``state_dict`` is the whole classification model under
  ``module.`` (DDP), with the trained linear classifier as ``head``.
* ``cast-segmenter``: ``segm/train_cast.py``'s ``checkpoint.pth`` = {model, optimizer, n_cls,
  lr_scheduler, epoch[, loss_scaler]}; ``model`` holds ``encoder.*`` (``cast_seg_deit.py``:
  flat and grouped blocks, learned ``pos_embed`` (1, 1+HW, D), an unused ``norm`` and 1000-class
  ``head``, ``block_fusion.*``) and ``decoder.*`` (Segmenter's mask transformer, mapped onto
  ``CASTSegmenter``'s ``head``).
* ``cast-deit``: the authors' DeiT ``best_checkpoint.pth`` = {model, optimizer, lr_scheduler,
  epoch, model_ema, scaler, args}; ``args`` is an ``argparse.Namespace``, allowed explicitly in a
  ``weights_only`` load (nothing else is unpickled). Its learned ``pos_embed`` (1, 1+HW, D) is
  split into ``pe_token`` and a (1, HW, D) grid: the model needs ``MODEL.CAST.POS_EMBED: learned``.
* ``dino`` / ``timm-vit``: plain ViT state dicts (``cls_token``, ``pos_embed``,
  ``patch_embed.proj``, ``blocks.i.*``, ``norm``; ``.pth`` or ``.safetensors``) for
  :class:`hiseg.modeling.ViTBackbone`, whose transformer sits at ``backbone.vit.*``.

CAST renames: ``patch_embed.proj.N`` -> ``stem.proj.N``, ``pool{k}.pool_block.X`` ->
``pools.{k-1}.X``; ``cls_token``, ``pe_token``, ``blocks.i``, ``norm`` keep their names. Every
converted state dict is checked against a freshly built encoder of the inferred size (missing /
unexpected keys, shapes), so a file that converts also loads. Heads and the block fusion are
*parts*: written where the target model has the same module (``--config-file``), reported
otherwise. The authors' MoCo-v3 ViT baselines (``vit_conv_small`` / ``vit_conv_base``: a
convolutional stem before 11 blocks) are refused with that reason: our ViT has a linear patch
embedding.

Modules: :mod:`.common` (formats, result types, key checks), :mod:`.reading` (files, layout
detection), :mod:`.cast_weights` (the CAST encoder), :mod:`.released_heads` (block fusion,
Segmenter decoder, classifiers), :mod:`.vit_weights` (ViT), :mod:`.convert` (one call, Detectron2
checkpoints).
"""

from .cast_weights import convert_cast_state_dict, merge_duplicate_blocks
from .common import (CAST_FORMATS, DEFAULT_PREFIX, FORMATS, MODELS, CheckpointConversionError, ConversionResult,
                     Part)
from .convert import (add_prefix, convert_checkpoint, describe_needed_config, find_prefix, parts_for_model,
                      save_detectron2_checkpoint, to_detectron2_checkpoint, verify_against_model)
from .reading import detect_format, extract_state_dict, load_checkpoint_file
from .released_heads import classifier_part, fit_parts, fold_block_fusion, part_prefix, segmenter_decoder_part
from .vit_weights import convert_vit_state_dict

__all__ = [
    "FORMATS", "CAST_FORMATS", "MODELS", "DEFAULT_PREFIX", "CheckpointConversionError", "ConversionResult", "Part",
    "load_checkpoint_file", "detect_format", "extract_state_dict", "merge_duplicate_blocks",
    "convert_cast_state_dict", "convert_vit_state_dict", "convert_checkpoint", "add_prefix",
    "to_detectron2_checkpoint", "save_detectron2_checkpoint", "find_prefix", "verify_against_model",
    "describe_needed_config", "parts_for_model", "fold_block_fusion", "segmenter_decoder_part", "classifier_part",
    "part_prefix", "fit_parts",
]
