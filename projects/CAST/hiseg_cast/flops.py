"""FLOP counts of CAST and ViT with fvcore (Table 4, Table 6c of the paper).

Convention: fvcore's, as in the paper (one multiply-add = one flop). fvcore counts matrix
products (linear, matmul, bmm, einsum), convolutions and normalisation layers, and skips every
other operator. Two gaps of fvcore 0.1.5 matter for transformers:

* ``aten::scaled_dot_product_attention`` (what timm's ``Attention`` calls) has no handle, so the
  two attention products ``Q K^T`` and ``A V`` would be silently dropped. :func:`sdpa_flop_jit`
  counts them: ``B * heads * (L * S * E + L * S * Ev)``.
* element-wise operators (softmax, GELU, residual additions, the scale of the logits ...) are not
  counted, by convention. ``elementwise=True`` counts them too (one flop per output element, one
  per input element for reductions) so their share can be seen; it is never part of the headline
  numbers.

Every operator that is still not counted is listed in the report (``skipped``), so nothing is
dropped silently.

The CAST breakdown follows the encoder's modules: conv stem, the superpixel-averaging matmul
(``segment tokens``: done by the encoder itself, not by a sub-module), the blocks of each level,
and each graph pooling, with the share of farthest point sampling counted separately on a
stand-alone trace of :meth:`GraphPool.sample_centroids` with the same shapes.

Command line (markdown tables)::

    python -m hiseg_cast.flops                       # CAST-S/B vs ViT-S/B at 224, 196 superpixels
    python -m hiseg_cast.flops --elementwise          # also count element-wise operators
    python -m hiseg_cast.flops --table6c              # the token-granularity variants of Table 6c
"""
import argparse
import logging
import warnings
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from .modeling.encoder import CASTEncoder
from .modeling.graph_pool import GraphPool
from .superpixels import grid_superpixels

__all__ = ["sdpa_flop_jit", "flop_analysis", "cast_flops", "vit_flops", "FlopReport",
           "CAST_VARIANTS", "VIT_VARIANTS", "PAPER_GFLOPS", "markdown_table"]

logger = logging.getLogger(__name__)

# The two model sizes of Sec. 3.3 (depths [3, 3, 3, 2], segments 64, 32, 16, 8) and their ViTs.
CAST_VARIANTS = {
    "CAST-S": dict(embed_dim=384, num_heads=12),
    "CAST-B": dict(embed_dim=768, num_heads=12),
}
VIT_VARIANTS = {
    "ViT-S/16": "vit_small_patch16_224",
    "ViT-B/16": "vit_base_patch16_224",
}
# Table 4 (CAST-S, ViT-S) and the CAST-B / ViT-B figures quoted with them.
PAPER_GFLOPS = {"CAST-S": 3.4, "ViT-S/16": 4.7, "CAST-B": 12.9, "ViT-B/16": 17.8}


# ------------------------------------------------------------------------------------------------
# fvcore handles
def _shape(value) -> Optional[List[int]]:
    from fvcore.nn.jit_handles import get_shape

    return get_shape(value)


def sdpa_flop_jit(inputs, outputs) -> int:
    """``aten::scaled_dot_product_attention(q, k, v, ...)``: the two batched products.

    q (..., L, E), k (..., S, E), v (..., S, Ev): ``prod(...) * L * S * (E + Ev)`` multiply-adds.
    The softmax and the scaling are element-wise (not counted, as for an explicit softmax).
    """
    q, k, v = (_shape(x) for x in inputs[:3])
    batch = int(np.prod(q[:-2])) if len(q) > 2 else 1
    length, emb = q[-2], q[-1]
    src = k[-2]
    return batch * length * src * (emb + v[-1])


def _sdpa_elementwise_jit(inputs, outputs) -> int:
    """Element-wise work inside SDPA: scale, softmax (one flop per score each)."""
    q, k = _shape(inputs[0]), _shape(inputs[1])
    batch = int(np.prod(q[:-2])) if len(q) > 2 else 1
    return 2 * batch * q[-2] * k[-2]


_POINTWISE_OPS = (
    "aten::add", "aten::add_", "aten::sub", "aten::sub_", "aten::rsub", "aten::mul", "aten::mul_",
    "aten::div", "aten::div_", "aten::gelu", "aten::relu", "aten::relu_", "aten::softmax",
    "aten::exp", "aten::sin", "aten::cos", "aten::pow", "aten::reciprocal", "aten::clamp_min",
    "aten::clamp_min_", "aten::clamp", "aten::clamp_", "aten::minimum", "aten::maximum",
    "aten::where", "aten::masked_fill", "aten::masked_fill_",
)
_REDUCTION_OPS = ("aten::sum", "aten::mean", "aten::argmax", "aten::linalg_vector_norm", "aten::norm")


def flop_analysis(model: nn.Module, inputs, elementwise: bool = False):
    """A configured ``fvcore.nn.FlopCountAnalysis`` (SDPA handled, quiet)."""
    from fvcore.nn import FlopCountAnalysis
    from fvcore.nn.jit_handles import elementwise_flop_counter

    fa = FlopCountAnalysis(model, inputs)
    handles = {"aten::scaled_dot_product_attention": sdpa_flop_jit}
    if elementwise:
        def sdpa_all(i, o):
            return sdpa_flop_jit(i, o) + _sdpa_elementwise_jit(i, o)

        handles["aten::scaled_dot_product_attention"] = sdpa_all
        handles.update({op: elementwise_flop_counter(0, 1) for op in _POINTWISE_OPS})
        handles.update({op: elementwise_flop_counter(1, 0) for op in _REDUCTION_OPS})
    fa.set_op_handle(**handles)
    fa.unsupported_ops_warnings(False)
    fa.uncalled_modules_warnings(False)
    fa.tracer_warnings("none")
    return fa


# ------------------------------------------------------------------------------------------------
@dataclass
class FlopReport:
    """Per-image flops of one model: total, an ordered per-part breakdown, the skipped ops."""

    name: str
    total: float
    parts: "OrderedDict[str, float]" = field(default_factory=OrderedDict)
    skipped: Counter = field(default_factory=Counter)
    config: Dict[str, object] = field(default_factory=dict)

    @property
    def gflops(self) -> float:
        return self.total / 1e9


class _SampleCentroids(nn.Module):
    """Graph pooling's centroid sampling (mean filling + FPS) alone, for its flop share."""

    def __init__(self, num: int):
        super().__init__()
        self.num = num

    def forward(self, tokens, valid):
        return GraphPool.sample_centroids(tokens, valid, self.num)[0]


def _fps_flops(num_tokens: int, dim: int, num: int, elementwise: bool) -> float:
    tokens = torch.randn(1, num_tokens, dim)
    valid = torch.ones(1, num_tokens, dtype=torch.bool)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(flop_analysis(_SampleCentroids(num), (tokens, valid), elementwise).total())


def _quiet_total(fa) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(fa.total())


def cast_flops(encoder: Optional[CASTEncoder] = None, image_size: int = 224, num_superpixels: int = 196,
               num_segments: Optional[Sequence[int]] = None, elementwise: bool = False,
               name: str = "CAST", **encoder_kwargs) -> FlopReport:
    """Per-image flops of a CAST encoder on a ``image_size`` square image.

    The input superpixels are a regular grid of ``num_superpixels`` cells (the count, not the
    shapes, is what the cost depends on; 196 = 14 x 14 cells of 16 x 16 pixels at 224).
    ``encoder`` defaults to ``CASTEncoder(**encoder_kwargs)`` with nearest token pooling: the
    paper's FLOPs are those of its ImageNet models, whose released code resizes the label map to
    the stem grid (bilinear pooling with the stretched position table adds one averaging matmul,
    0.06 GFLOPs for CAST-S).
    """
    if encoder is None:
        encoder_kwargs.setdefault("token_pool_mode", "nearest")
        encoder = CASTEncoder(**encoder_kwargs)
    encoder = encoder.eval()
    counts = list(num_segments) if num_segments is not None else list(encoder.num_segments)
    dev = next(encoder.parameters()).device
    images = torch.zeros(1, 3, image_size, image_size, device=dev)
    sp = torch.from_numpy(grid_superpixels(image_size, image_size, num_superpixels))[None].to(dev)
    m0 = int(sp.max()) + 1

    class _Run(nn.Module):  # passes the counts through the trace
        def __init__(self, enc):
            super().__init__()
            self.enc = enc

        def forward(self, x, s):
            out = self.enc(x, s, num_segments=counts)
            return out["cls"], out["hierarchy"]

    fa = flop_analysis(_Run(encoder), (images, sp), elementwise)
    with torch.no_grad():
        total = _quiet_total(fa)
    mods = fa.by_module()
    p = "enc."
    parts: "OrderedDict[str, float]" = OrderedDict()
    parts["stem (conv)"] = float(mods.get(p + "stem", 0))
    children = sum(float(mods.get(p + c, 0)) for c in ("stem", "blocks", "pools", "norm"))
    parts["segment tokens (superpixel averaging matmul)"] = total - children
    tokens = [m0] + counts[: len(encoder.depths) - 1]
    start = 0
    for g, depth in enumerate(encoder.depths):
        blocks = sum(float(mods.get(f"{p}blocks.{i}", 0)) for i in range(start, start + depth))
        start += depth
        parts[f"blocks level {g} ({depth} x {tokens[g] + 1} tokens)"] = blocks
        if encoder.pooling:
            pool = float(mods.get(f"{p}pools.{g}", 0))
            fps = _fps_flops(tokens[g], encoder.embed_dim, counts[g], elementwise)
            tag = " (read-out only)" if g == len(encoder.depths) - 1 else ""
            parts[f"graph pool {g + 1} ({tokens[g]} -> {counts[g]}){tag}"] = pool
            parts[f"  of which FPS {g + 1}"] = fps  # included in the line above
    parts["final norm"] = float(mods.get(p + "norm", 0))
    skipped = Counter({k: v for k, v in fa.unsupported_ops().items()})
    cfg = dict(image_size=image_size, num_superpixels=m0, num_segments=counts,
               embed_dim=encoder.embed_dim, depths=list(encoder.depths), elementwise=elementwise)
    return FlopReport(name, total, parts, skipped, cfg)


def vit_flops(model_name: str = "vit_small_patch16_224", image_size: int = 224, elementwise: bool = False,
              name: Optional[str] = None) -> FlopReport:
    """Per-image flops of a timm ViT without its head (``num_classes=0``)."""
    import timm

    model = timm.create_model(model_name, pretrained=False, num_classes=0, img_size=image_size).eval()
    images = torch.zeros(1, 3, image_size, image_size)
    fa = flop_analysis(model, images, elementwise)
    with torch.no_grad():
        total = _quiet_total(fa)
    mods = fa.by_module()
    parts: "OrderedDict[str, float]" = OrderedDict()
    parts["patch embedding"] = float(mods.get("patch_embed", 0))
    n_tok = (image_size // 16) ** 2 + 1
    parts[f"blocks ({len(model.blocks)} x {n_tok} tokens)"] = float(mods.get("blocks", 0))
    parts["final norm"] = float(mods.get("norm", 0)) + float(mods.get("fc_norm", 0))
    parts["other"] = total - sum(parts.values())
    skipped = Counter(fa.unsupported_ops())
    return FlopReport(name or model_name, total, parts, skipped,
                      dict(image_size=image_size, embed_dim=model.embed_dim, elementwise=elementwise))


# ------------------------------------------------------------------------------------------------
def markdown_table(reports: Sequence[FlopReport]) -> str:
    """Totals against the paper, then the operators each count skipped."""
    lines = ["| model | GFLOPs (ours) | GFLOPs (paper) | ours / paper |", "|---|---:|---:|---:|"]
    for r in reports:
        paper = PAPER_GFLOPS.get(r.name)
        ratio = f"{r.gflops / paper:.3f}" if paper else "-"
        lines.append(f"| {r.name} | {r.gflops:.3f} | {paper if paper is not None else '-'} | {ratio} |")
    lines.append("")
    for r in reports:
        skipped = ", ".join(f"{k.replace('aten::', '')} x{v}" for k, v in sorted(r.skipped.items())) or "none"
        lines.append(f"- {r.name}, operators not counted: {skipped}")
    return "\n".join(lines)


def breakdown_table(report: FlopReport) -> str:
    lines = [f"| {report.name} part | GFLOPs | share |", "|---|---:|---:|"]
    for k, v in report.parts.items():
        lines.append(f"| {k} | {v / 1e9:.4f} | {100.0 * v / report.total:.1f}% |")
    lines.append(f"| **total** | **{report.gflops:.3f}** | 100% |")
    return "\n".join(lines)


def _table6c(elementwise: bool) -> str:
    """Table 6c: CAST-S with other token granularities (tokens per block group)."""
    rows = [((196, 32, 16, 8), 224, 3.0), ((196, 64, 32, 16), 224, 3.4), ((196, 128, 64, 32), 224, 4.3),
            ((324, 64, 32, 16), 224, 4.6), ((324, 128, 64, 32), 224, 5.4),
            ((324, 64, 32, 16), 288, 4.6), ((324, 128, 64, 32), 288, 5.4)]
    lines = ["| tokens per level | image | GFLOPs (ours) | GFLOPs (paper) |", "|---|---:|---:|---:|"]
    for toks, size, paper in rows:
        counts = list(toks[1:]) + [max(1, toks[-1] // 2)]
        r = cast_flops(None, size, toks[0], counts, elementwise, **CAST_VARIANTS["CAST-S"])
        lines.append(f"| {', '.join(map(str, toks))} | {size} | {r.gflops:.3f} | {paper} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--num-superpixels", type=int, default=196)
    ap.add_argument("--elementwise", action="store_true",
                    help="also count element-wise operators (softmax, GELU, additions ...)")
    ap.add_argument("--table6c", action="store_true", help="also the token-granularity rows of Table 6c")
    ap.add_argument("--models", nargs="+", default=["CAST-S", "ViT-S/16", "CAST-B", "ViT-B/16"])
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    reports = []
    for m in args.models:
        if m in CAST_VARIANTS:
            reports.append(cast_flops(None, args.image_size, args.num_superpixels, None, args.elementwise,
                                      name=m, **CAST_VARIANTS[m]))
        elif m in VIT_VARIANTS:
            reports.append(vit_flops(VIT_VARIANTS[m], args.image_size, args.elementwise, name=m))
        else:
            ap.error(f"unknown model {m!r}: choose from {sorted(CAST_VARIANTS) + sorted(VIT_VARIANTS)}")
    conv = "fvcore + SDPA" + (" + element-wise ops" if args.elementwise else "")
    print(f"Per-image flops at {args.image_size}x{args.image_size}, {args.num_superpixels} superpixels "
          f"({conv}; one multiply-add = one flop)\n")
    print(markdown_table(reports))
    for r in reports:
        print()
        print(breakdown_table(r))
    if args.table6c:
        print()
        print(_table6c(args.elementwise))
    return reports


if __name__ == "__main__":
    main()
