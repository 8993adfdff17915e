"""The modules beside the encoder in released CAST files, mapped onto ours where ours is the same.

* **Block fusion** (``block_fusion.proj_blocks``: ``BatchNorm1d(4D)`` -> ``Dropout(0.2)`` ->
  ``Linear(4D, D)``; ``cast_models/modules.py`` ``BlockFusion``, github twke18/CAST ec85adf), in
  the segmentation models (``cast_seg.py``, ``cast_seg_deit.py``): Alg. 2's fully connected
  layer over the concatenated levels. Ours (``CASTBackbone.fuse``) is the ``Linear`` alone.
  At evaluation the BatchNorm is a fixed per-channel affine map (running statistics) and the
  dropout the identity, so folding the BatchNorm into the linear layer gives exactly the
  released function: ``W' = W diag(g / sqrt(v + eps))``, ``b' = b + W (beta - m g / sqrt(v + eps))``
  (eps 1e-5, BatchNorm1d's default). Fine-tuning from the folded layer is not the released
  fine-tuning: there the BatchNorm normalises with each batch's statistics.
* **Segmenter's mask transformer** (``segmenter/segm/model/decoder.py`` ``MaskTransformer``):
  ``proj_dec``, ``blocks.i`` (LayerNorm eps 1e-5, qkv with bias, heads = width / 64), ``cls_emb``
  (1, K, D), ``proj_patch``, ``proj_classes``, ``decoder_norm``, ``mask_norm``. Ours
  (``hiseg_cast.modeling.heads.MaskTransformerDecoder``) has the same tensors under the same names except
  ``cls_emb`` -> ``class_embed.weight`` (K, D), and computes the same function on every token the
  released decoder sees, with one difference: ours leaves padded token slots out of the decoder's
  attention (a batch whose images have different superpixel counts), the released decoder
  attends to them. On an image alone, or a batch of equal counts, the two are equal (tested).
* **Classifier** (``head``, ``Linear(D, K)`` on the final-normed class token): DeiT's trained
  classifier and the linear probe of ``main_lincls_suppix.py``, the same as ``CASTClassifier``'s
  and ``CASTLinearProbe``'s ``head`` (without ``PROBE_BN``).

Each is returned as a :class:`~.common.Part`; the converter writes a part only where the target
model has that module with the same shapes (``fit_parts``), and says so.
"""
from collections import OrderedDict
from typing import Dict, List, Mapping, Optional, Tuple

import torch

from hiseg.checkpoint.prefixes import strip_prefix

from .common import CheckpointConversionError, Part, _require

__all__ = ["fold_block_fusion", "segmenter_decoder_part", "classifier_part", "BLOCK_FUSION_EPS"]

BLOCK_FUSION_EPS = 1e-5  # nn.BatchNorm1d's default, as in the released BlockFusion
_FUSION_BN = "block_fusion.proj_blocks.0.norm."
_FUSION_FC = "block_fusion.proj_blocks.2."


def fold_block_fusion(sd: Mapping[str, torch.Tensor], eps: float = BLOCK_FUSION_EPS) -> Part:
    """``block_fusion.*`` (BatchNorm1d running statistics + Linear) -> ``fuse.{weight,bias}``."""
    keys = [k for k in sd if k.startswith("block_fusion.")]
    known = {_FUSION_BN + n for n in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
    known |= {_FUSION_FC + "weight", _FUSION_FC + "bias"}
    unknown = [k for k in keys if k not in known]
    if unknown:
        raise CheckpointConversionError(f"unknown block-fusion keys {unknown[:6]}: expected {sorted(known)}")
    w = _require(sd, _FUSION_FC + "weight", 2).double()
    b = _require(sd, _FUSION_FC + "bias", 1).double()
    bn = {n: _require(sd, _FUSION_BN + n, 1).double() for n in ("weight", "bias", "running_mean", "running_var")}
    if any(t.shape[0] != w.shape[1] for t in bn.values()):
        raise CheckpointConversionError(
            f"block-fusion BatchNorm has {bn['weight'].shape[0]} channels, its linear layer takes {w.shape[1]}")
    scale = bn["weight"] / torch.sqrt(bn["running_var"] + eps)
    shift = bn["bias"] - bn["running_mean"] * scale
    dtype = sd[_FUSION_FC + "weight"].dtype
    out = OrderedDict([("fuse.weight", (w * scale[None, :]).to(dtype)), ("fuse.bias", (b + w @ shift).to(dtype))])
    return Part(out, "backbone", f"block fusion -> fuse: BatchNorm1d({w.shape[1]}) folded into Linear"
                                 f"({w.shape[1]}, {w.shape[0]}) with its running statistics (exact at evaluation)")


_DECODER_SAME = ("proj_dec.", "blocks.", "decoder_norm.", "mask_norm.")


def segmenter_decoder_part(sd: Mapping[str, torch.Tensor], num_heads: Optional[int] = None) -> Part:
    """``decoder.*`` of the released ``MaskTransformer`` -> ``head.*`` of ``CASTSegmenter``."""
    dec = strip_prefix(sd, "decoder.")
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    for k, v in dec.items():
        if k == "cls_emb":
            if v.dim() != 3 or v.shape[0] != 1:
                raise CheckpointConversionError(f"'decoder.cls_emb' has shape {tuple(v.shape)}, expected (1, K, D)")
            out["head.class_embed.weight"] = v[0].clone()
        elif k in ("proj_patch", "proj_classes") or k.startswith(_DECODER_SAME):
            out["head." + k] = v
        elif k.startswith("head."):
            raise CheckpointConversionError(
                "'decoder.head.*': a Segmenter linear decoder; only the mask transformer is converted")
        else:
            raise CheckpointConversionError(f"unknown Segmenter decoder key 'decoder.{k}'")
    cls_emb = _require(out, "head.class_embed.weight", 2)
    blocks = {int(k.split(".")[2]) for k in out if k.startswith("head.blocks.")}
    if blocks != set(range(len(blocks))):
        raise CheckpointConversionError(f"Segmenter decoder blocks {sorted(blocks)} are not numbered 0..n-1")
    config = {"MODEL.CAST_SEGMENTER.DECODER": "mask",
              "MODEL.CAST_SEGMENTER.NUM_CLASSES": int(cls_emb.shape[0]),
              "MODEL.CAST_SEGMENTER.NUM_LAYERS": len(blocks)}
    return Part(out, "model", f"Segmenter mask transformer -> head ({len(blocks)} blocks, {cls_emb.shape[0]} classes, "
                              f"width {cls_emb.shape[1]}, heads = width / 64 as Segmenter: "
                              f"MODEL.CAST_SEGMENTER.NUM_HEADS 0)", config)


def classifier_part(sd: Mapping[str, torch.Tensor], what: str) -> Optional[Part]:
    """``head.{weight,bias}`` (a Linear on the class token) -> ``head.*`` (``MODEL.CLS.NUM_CLASSES``)."""
    if "head.weight" not in sd or sd["head.weight"].dim() != 2 or "head.bias" not in sd:
        return None
    k, d = sd["head.weight"].shape
    out = OrderedDict([("head.weight", sd["head.weight"]), ("head.bias", sd["head.bias"])])
    return Part(out, "model", f"{what} -> head: Linear({d}, {k})", {"MODEL.CLS.NUM_CLASSES": int(k)})


def part_prefix(part: Part, encoder_prefix: str) -> str:
    """Where a part's keys go, given where the encoder went (``"backbone.encoder."`` ->
    ``"backbone."`` for anchor ``"backbone"``, ``""`` for ``"model"``)."""
    if part.anchor == "model":
        return ""
    if part.anchor == "backbone":
        if encoder_prefix.endswith("encoder."):
            return encoder_prefix[:-len("encoder.")]
        raise CheckpointConversionError(
            f"cannot place {part.what!r}: the encoder prefix {encoder_prefix!r} does not end in 'encoder.'")
    raise ValueError(f"unknown part anchor {part.anchor!r}")


def fit_parts(parts: Mapping[str, Part], model_sd: Mapping[str, torch.Tensor],
              encoder_prefix: str) -> Tuple[Dict[str, Part], List[str]]:
    """The parts whose every tensor exists in ``model_sd`` with the same shape (and no model
    tensor under the part's module left without one), and a line for each part left out."""
    kept, msgs = {}, []
    for name, part in parts.items():
        prefix = part_prefix(part, encoder_prefix)
        keys = {prefix + k: v for k, v in part.state_dict.items()}
        bad = [k for k, v in keys.items() if k not in model_sd or tuple(model_sd[k].shape) != tuple(v.shape)]
        roots = {k.rsplit(".", 1)[0].split(".")[0] for k in part.state_dict}
        modules = tuple(prefix + r + "." for r in roots)
        extra = [k for k in model_sd if k.startswith(modules) and k not in keys and not k.endswith("num_batches_tracked")]
        if bad or extra:
            why = (f"{bad[0]!r} " + ("is not in the model" if bad[0] not in model_sd else
                                     f"has shape {tuple(model_sd[bad[0]].shape)} in the model, "
                                     f"{tuple(keys[bad[0]].shape)} in the file")) if bad else \
                f"the model's module also has {extra[0]!r}"
            msgs.append(f"not written: {part.what} (the model has no such module: {why})")
            continue
        kept[name] = part
    return kept, msgs
