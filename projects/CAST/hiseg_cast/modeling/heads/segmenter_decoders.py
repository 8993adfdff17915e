"""Segmenter's decoders (Strudel et al. 2021, Sec. 3.2) on CAST's segment tokens, for
``CASTSegmenter`` (CAST Table 3b/c): (B, N, D_in) tokens + (B, N) valid mask -> (B, N, K) class
logits. The mask transformer (``DECODER: "mask"``) and the linear decoder (``"linear"``)."""
import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

from ..graph_pool import key_padding_bias

__all__ = ["MaskTransformerDecoder", "LinearDecoder"]


def _segmenter_init(m: nn.Module):
    """Segmenter's initialisation: truncated normal (std 0.02) linear weights, zero biases."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


class MaskTransformerDecoder(nn.Module):
    """Segmenter's mask transformer (Strudel et al. 2021, Sec. 3.2) on CAST's segment tokens.

    ``forward(tokens, valid)``: tokens (B, N, in_dim), valid (B, N) bool (padded token slots are
    masked out of the attention and get zero logits). Returns (B, N, num_classes) logits:
    ``mask_norm(<l2n(z_i W_p), l2n(c_k W_c)>)`` after ``num_layers`` joint blocks.
    The class embeddings live in an ``nn.Embedding`` (the project's convention for learnable
    queries: ``SOLVER.WEIGHT_DECAY_EMBED`` applies, as Segmenter exempts ``cls_emb`` from decay).
    """

    def __init__(self, in_dim: int, num_classes: int, dim: int = 0, num_layers: int = 2, num_heads: int = 0,
                 mlp_ratio: float = 4.0, dropout: float = 0.1, drop_path_rate: float = 0.0):
        super().__init__()
        dim = int(dim) or int(in_dim)
        num_heads = int(num_heads) or max(1, dim // 64)
        if num_classes < 1:
            raise ValueError(f"MODEL.CAST_SEGMENTER.NUM_CLASSES must be >= 1, got {num_classes}")
        if num_layers < 1:
            raise ValueError(f"MODEL.CAST_SEGMENTER.NUM_LAYERS must be >= 1 for the mask transformer, got {num_layers}")
        if dim % num_heads:
            raise ValueError(f"MODEL.CAST_SEGMENTER.HIDDEN_DIM {dim} is not divisible by NUM_HEADS {num_heads}")
        if not (0.0 <= dropout < 1.0 and 0.0 <= drop_path_rate < 1.0):
            raise ValueError(f"MODEL.CAST_SEGMENTER.DROPOUT / DROP_PATH_RATE must be in [0, 1), got "
                             f"{dropout} / {drop_path_rate}")
        self.num_classes = int(num_classes)
        self.dim = dim
        self.proj_dec = nn.Linear(in_dim, dim)
        dpr = torch.linspace(0, drop_path_rate, num_layers).tolist()
        self.blocks = nn.ModuleList([
            Block(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, proj_drop=dropout, attn_drop=dropout,
                  drop_path=dpr[i], norm_layer=nn.LayerNorm)
            for i in range(num_layers)])
        self.decoder_norm = nn.LayerNorm(dim)
        self.class_embed = nn.Embedding(num_classes, dim)
        scale = dim ** -0.5
        self.proj_patch = nn.Parameter(scale * torch.randn(dim, dim))
        self.proj_classes = nn.Parameter(scale * torch.randn(dim, dim))
        self.mask_norm = nn.LayerNorm(num_classes)
        self.apply(_segmenter_init)
        trunc_normal_(self.class_embed.weight, std=0.02)

    def forward(self, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        if tokens.dim() != 3 or valid.shape != tokens.shape[:2]:
            raise ValueError(f"expected tokens (B, N, D) and valid (B, N); got {tuple(tokens.shape)} and "
                             f"{tuple(valid.shape)}")
        b, n, _ = tokens.shape
        k = self.num_classes
        x = torch.cat([self.proj_dec(tokens), self.class_embed.weight[None].expand(b, -1, -1)], dim=1)
        mask = None
        if not bool(valid.all()):
            keys = torch.cat([valid, valid.new_ones(b, k)], dim=1)
            mask = key_padding_bias(keys, x.dtype)
        for blk in self.blocks:
            x = blk(x, attn_mask=mask)
        x = self.decoder_norm(x)
        patches = F.normalize(x[:, :n] @ self.proj_patch, dim=-1)
        classes = F.normalize(x[:, n:] @ self.proj_classes, dim=-1)
        masks = self.mask_norm(patches @ classes.transpose(1, 2))
        return torch.where(valid[..., None], masks, torch.zeros_like(masks))


class LinearDecoder(nn.Module):
    """Segmenter-Linear (Strudel et al. 2021, Sec. 3.2 "Linear decoder"): one linear layer per token."""

    def __init__(self, in_dim: int, num_classes: int):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"MODEL.CAST_SEGMENTER.NUM_CLASSES must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.head = nn.Linear(in_dim, num_classes)
        self.apply(_segmenter_init)

    def forward(self, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        logits = self.head(tokens)
        return torch.where(valid[..., None], logits, torch.zeros_like(logits))
