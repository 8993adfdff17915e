"""Heads on CAST's segment tokens: the 2-layer 1x1-conv head of the semantic transfer
(:mod:`.pixel_head`, Appx. E.5) and Segmenter's decoders (:mod:`.segmenter_decoders`, Table 3b/c)."""
from .pixel_head import PixelHead, superpixel_cross_entropy
from .segmenter_decoders import LinearDecoder, MaskTransformerDecoder

__all__ = ["PixelHead", "superpixel_cross_entropy", "LinearDecoder", "MaskTransformerDecoder"]
