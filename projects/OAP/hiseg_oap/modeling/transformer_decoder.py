"""OAP's masked-attention transformer decoder with level-specific object queries.

The mask decoder of OAP (Sec. 4.1) is Mask2Former's (Cheng et al. 2022, "official setting",
Sec. 5.1): learnable query features and query positional embeddings are refined by
``dec_layers`` layers that visit the pixel decoder's three scales round-robin (coarsest first),
each layer being

    masked cross-attention -> self-attention -> FFN      (post-norm, or pre-norm with ``pre_norm``)

The cross-attention of a layer reads only the pixels inside the mask predicted before it,
resized to the layer's scale (``sigmoid(logit) < 0.5`` is masked; a query whose mask is empty
at that scale attends everywhere, see :func:`masked_attention_mask`). Every scale has a sine
position code and a learned level embedding. Predictions (after a final LayerNorm, shared by
all of them) are made from the learnable query features before the first layer and after every
layer: an objectness head ``Linear(hidden, 2)`` (Mask2Former's class head with a single
"object" class plus "no object") and a 3-layer mask-embedding MLP whose output is dotted with
the per-pixel mask features.

**Level-specific object queries** (Sec. 4.3): the ``Q = S + I`` queries are split into ``S``
semantic queries (first) and ``I`` instance queries (Sec. 5.1: 50 and 150) that share every
decoder parameter and head. Two learnable tokens ``[SEM]`` and ``[INS]`` (rows 0 and 1 of
:attr:`LevelQueryTransformerDecoder.level_tokens`) "are added to the respective query features
at each decoder layer". The paper does not say where; we add the token to the *query
positional embedding* that every attention of every layer adds to its queries (the queries and
keys of self-attention, the queries of cross-attention). So the token is present at every layer
with the same value, it does not accumulate in the residual stream, and it is not part of the
attended values or of the heads' input (the prediction before the first layer, made from the
raw query features, does not see it). With the two tokens equal, the decoder is equivariant to
permuting its queries: the tokens are then the only thing that tells the two groups apart
beyond their own learned rows.

Other choices (the papers are silent): the tokens are initialised like Mask2Former's query
embeddings (``nn.Embedding``'s N(0, 1)) so they are on the scale of what they are added to;
the attention layers have no dropout (Mask2Former uses 0.0 in its decoder).
"""
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import Conv2d
from fvcore.nn import weight_init
from torch import nn

from .pixel_decoder import NUM_MULTI_SCALE_LEVELS, sine_position_embedding

__all__ = ["LevelQueryTransformerDecoder", "MLP", "masked_attention_mask", "SEM_TOKEN", "INS_TOKEN"]

#: Rows of ``LevelQueryTransformerDecoder.level_tokens``.
SEM_TOKEN, INS_TOKEN = 0, 1


def masked_attention_mask(mask_logits: torch.Tensor, size: Sequence[int], nheads: int) -> torch.Tensor:
    """Mask2Former's attention mask for masked cross-attention, from the previous mask logits.

    Args:
        mask_logits: (B, Q, H, W) mask logits.
        size: (h, w) of the scale the next layer attends to; the logits are resized to it
            bilinearly (align_corners=False).
        nheads: attention heads; the mask is repeated per head.

    Returns:
        (B * nheads, Q, h * w) bool, detached, True = "may not attend" (``nn.MultiheadAttention``'s
        convention), batch-major (index ``b * nheads + head``). A pixel is masked where
        ``sigmoid(logit) < 0.5``; a query whose mask is empty at this scale (every pixel masked)
        gets an all-False row, i.e. it attends to the whole map instead of producing NaN.
    """
    if mask_logits.dim() != 4:
        raise ValueError(f"mask_logits must be (B, Q, H, W), got {tuple(mask_logits.shape)}")
    if len(size) != 2 or min(int(s) for s in size) < 1:
        raise ValueError(f"size must be (h, w) with h, w >= 1, got {tuple(size)}")
    size = (int(size[0]), int(size[1]))
    with torch.no_grad():
        resized = F.interpolate(mask_logits.detach(), size=size, mode="bilinear", align_corners=False)
        masked = (resized.sigmoid() < 0.5).flatten(2)  # (B, Q, hw)
        masked = masked & ~masked.all(-1, keepdim=True)
        return masked.repeat_interleave(nheads, dim=0)


class MLP(nn.Module):
    """``num_layers`` Linear layers with ReLU between them (none after the last)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


def _xavier_matrices(module: nn.Module):
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)


class _AttentionLayer(nn.Module):
    """Residual multi-head attention + LayerNorm (post-norm, or pre-norm); batch-first tensors.

    The queries are ``tgt + query_pos``; the keys ``memory + pos`` (``memory = tgt`` and ``pos =
    query_pos`` for self-attention); the values ``memory`` without position.
    """

    def __init__(self, d_model: int, nhead: int, pre_norm: bool):
        super().__init__()
        self.attn = nn.MultiheadAttention(d_model, nhead, dropout=0.0, batch_first=True)
        self.norm = nn.LayerNorm(d_model)
        self.pre_norm = pre_norm
        _xavier_matrices(self)

    def forward(self, tgt: torch.Tensor, query_pos: torch.Tensor, memory: Optional[torch.Tensor] = None,
                pos: Optional[torch.Tensor] = None, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.norm(tgt) if self.pre_norm else tgt
        if memory is None:  # self-attention
            memory, pos = x, query_pos
        q = x + query_pos
        k = memory if pos is None else memory + pos
        out = self.attn(q, k, memory, attn_mask=attn_mask, need_weights=False)[0]
        tgt = tgt + out
        return tgt if self.pre_norm else self.norm(tgt)


class _FFNLayer(nn.Module):
    """Residual Linear -> ReLU -> Linear + LayerNorm (post-norm, or pre-norm)."""

    def __init__(self, d_model: int, dim_feedforward: int, pre_norm: bool):
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.pre_norm = pre_norm
        _xavier_matrices(self)

    def forward(self, tgt: torch.Tensor) -> torch.Tensor:
        x = self.norm(tgt) if self.pre_norm else tgt
        tgt = tgt + self.linear2(F.relu(self.linear1(x)))
        return tgt if self.pre_norm else self.norm(tgt)


class LevelQueryTransformerDecoder(nn.Module):
    """Mask2Former's masked-attention decoder with OAP's [SEM] / [INS] query groups (module docstring).

    Args:
        in_channels: channels of the pixel decoder's multi-scale maps.
        hidden_dim: query width.
        num_sem_queries, num_ins_queries: S semantic queries (indices ``sem_slice``, first) and I
            instance queries (``ins_slice``).
        nheads, dim_feedforward: attention heads and FFN width.
        dec_layers: decoder layers (Mask2Former's 9 = 3 rounds over the 3 scales).
        pre_norm: pre-norm attention / FFN layers instead of post-norm.
        mask_dim: channels of the mask features (the mask-embedding MLP's output).
        enforce_input_project: a 1x1 conv on each scale even when ``in_channels == hidden_dim``.

    ``forward(x, mask_features)`` returns ``pred_masks`` (B, Q, Hm, Wm) logits, ``pred_objectness``
    (B, Q, 2) logits [object, no-object], ``query_embeds`` (B, Q, hidden_dim) (the normalised final
    queries) and ``aux_outputs``: ``dec_layers`` dicts with the same three keys, the predictions
    before the first layer and after layers 0 .. dec_layers - 2.
    """

    @configurable
    def __init__(self, in_channels: int, *, hidden_dim: int = 256, num_sem_queries: int = 50,
                 num_ins_queries: int = 150, nheads: int = 8, dim_feedforward: int = 2048, dec_layers: int = 9,
                 pre_norm: bool = False, mask_dim: int = 256, enforce_input_project: bool = False):
        super().__init__()
        if num_sem_queries < 0 or num_ins_queries < 0 or num_sem_queries + num_ins_queries < 1:
            raise ValueError(f"need at least one query, got {num_sem_queries} semantic and "
                             f"{num_ins_queries} instance queries")
        if hidden_dim < 2 or hidden_dim % 2:
            raise ValueError(f"hidden_dim must be even (sine position embedding), got {hidden_dim}")
        if hidden_dim % nheads:
            raise ValueError(f"hidden_dim {hidden_dim} is not divisible by nheads {nheads}")
        if dec_layers < 1:
            raise ValueError(f"dec_layers must be >= 1, got {dec_layers}")
        if in_channels < 1 or mask_dim < 1 or dim_feedforward < 1:
            raise ValueError(f"bad sizes: in_channels={in_channels}, mask_dim={mask_dim}, "
                             f"dim_feedforward={dim_feedforward}")
        self.in_channels, self.hidden_dim, self.mask_dim = in_channels, hidden_dim, mask_dim
        self.num_sem_queries, self.num_ins_queries = int(num_sem_queries), int(num_ins_queries)
        self.num_queries = self.num_sem_queries + self.num_ins_queries
        self.sem_slice = slice(0, self.num_sem_queries)
        self.ins_slice = slice(self.num_sem_queries, self.num_queries)
        self.nheads, self.num_layers = nheads, dec_layers
        self.num_feature_levels = NUM_MULTI_SCALE_LEVELS

        self.cross_attention_layers = nn.ModuleList(
            _AttentionLayer(hidden_dim, nheads, pre_norm) for _ in range(dec_layers))
        self.self_attention_layers = nn.ModuleList(
            _AttentionLayer(hidden_dim, nheads, pre_norm) for _ in range(dec_layers))
        self.ffn_layers = nn.ModuleList(_FFNLayer(hidden_dim, dim_feedforward, pre_norm) for _ in range(dec_layers))
        self.decoder_norm = nn.LayerNorm(hidden_dim)

        self.query_feat = nn.Embedding(self.num_queries, hidden_dim)
        self.query_embed = nn.Embedding(self.num_queries, hidden_dim)
        self.level_tokens = nn.Embedding(2, hidden_dim)  # row 0: [SEM], row 1: [INS]
        groups = torch.full((self.num_queries,), INS_TOKEN, dtype=torch.long)
        groups[self.sem_slice] = SEM_TOKEN
        self.register_buffer("query_groups", groups, persistent=False)

        self.level_embed = nn.Embedding(self.num_feature_levels, hidden_dim)
        self.input_proj = nn.ModuleList()
        for _ in range(self.num_feature_levels):
            if in_channels != hidden_dim or enforce_input_project:
                proj = Conv2d(in_channels, hidden_dim, kernel_size=1)
                weight_init.c2_xavier_fill(proj)
            else:
                proj = nn.Identity()
            self.input_proj.append(proj)

        self.objectness_embed = nn.Linear(hidden_dim, 2)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)

    @classmethod
    def from_config(cls, cfg, in_channels: int):
        d = cfg.MODEL.OAP.DECODER
        return {
            "in_channels": in_channels,
            "hidden_dim": d.HIDDEN_DIM,
            "num_sem_queries": d.NUM_SEM_QUERIES,
            "num_ins_queries": d.NUM_INS_QUERIES,
            "nheads": d.NHEADS,
            "dim_feedforward": d.DIM_FEEDFORWARD,
            "dec_layers": d.DEC_LAYERS,
            "pre_norm": d.PRE_NORM,
            "mask_dim": cfg.MODEL.OAP.PIXEL_DECODER.MASK_DIM,
            "enforce_input_project": d.ENFORCE_INPUT_PROJ,
        }

    def query_positions(self) -> torch.Tensor:
        """(Q, hidden_dim): the query positional embeddings plus each query's [SEM] / [INS] token."""
        return self.query_embed.weight + self.level_tokens(self.query_groups)

    def _check_inputs(self, x: List[torch.Tensor], mask_features: torch.Tensor):
        if not isinstance(x, (list, tuple)) or len(x) != self.num_feature_levels:
            n = len(x) if isinstance(x, (list, tuple)) else type(x).__name__
            raise ValueError(f"x must be a list of {self.num_feature_levels} multi-scale maps, got {n}")
        if mask_features.dim() != 4 or mask_features.shape[1] != self.mask_dim:
            raise ValueError(f"mask_features must be (B, {self.mask_dim}, H, W), got {tuple(mask_features.shape)}")
        b = mask_features.shape[0]
        for i, f in enumerate(x):
            if f.dim() != 4 or f.shape[0] != b or f.shape[1] != self.in_channels or min(f.shape[-2:]) < 1:
                raise ValueError(f"x[{i}] must be ({b}, {self.in_channels}, h, w) with h, w >= 1, "
                                 f"got {tuple(f.shape)}")

    def _predict(self, output: torch.Tensor, mask_features: torch.Tensor) -> Dict[str, torch.Tensor]:
        queries = self.decoder_norm(output)
        masks = torch.einsum("bqc,bchw->bqhw", self.mask_embed(queries), mask_features)
        return {"pred_masks": masks, "pred_objectness": self.objectness_embed(queries), "query_embeds": queries}

    def forward(self, x: List[torch.Tensor], mask_features: torch.Tensor) -> Dict:
        """x: the pixel decoder's 3 maps (coarsest first); mask_features: (B, mask_dim, Hm, Wm)."""
        self._check_inputs(x, mask_features)
        b = mask_features.shape[0]
        srcs, pos, sizes = [], [], []
        for i, f in enumerate(x):
            h, w = f.shape[-2:]
            sizes.append((h, w))
            src = self.input_proj[i](f).flatten(2).transpose(1, 2)  # (B, hw, hidden)
            srcs.append(src + self.level_embed.weight[i])
            p = sine_position_embedding(h, w, self.hidden_dim, device=f.device, dtype=src.dtype)
            pos.append(p.flatten(1).t().unsqueeze(0).expand(b, -1, -1))

        query_pos = self.query_positions().unsqueeze(0).expand(b, -1, -1)
        output = self.query_feat.weight.unsqueeze(0).expand(b, -1, -1)
        predictions = [self._predict(output, mask_features)]
        for i in range(self.num_layers):
            level = i % self.num_feature_levels
            attn_mask = masked_attention_mask(predictions[-1]["pred_masks"], sizes[level], self.nheads)
            output = self.cross_attention_layers[i](output, query_pos, srcs[level], pos[level], attn_mask)
            output = self.self_attention_layers[i](output, query_pos)
            output = self.ffn_layers[i](output)
            predictions.append(self._predict(output, mask_features))
        out = dict(predictions[-1])
        out["aux_outputs"] = predictions[:-1]
        return out
