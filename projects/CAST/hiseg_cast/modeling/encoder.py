"""The CAST encoder (Sec. 3, Alg. 2): segment tokens, ViT blocks and graph pooling, fine to coarse.

One module covers the paper's models and its Table 3a ablations:
  * CAST-S/B (and the deep variants): ``tokens="segment"``, ``pooling=True``;
  * "Segment tokens, no pooling": ``tokens="segment"``, ``pooling=False`` (all blocks on S_0);
  * "Patch tokens (with / without pooling)": pass square patch cells as the label map
    (``hiseg_cast.superpixels.patch_superpixels``), e.g. 16x16 cells = ViT's 196 tokens at 224.
Blocks are timm ViT blocks (qkv bias, LayerNorm eps 1e-6), numbered flat as in the released code.
"""
import logging
from functools import partial
from typing import Dict, List, Optional, Sequence

import torch
from timm.models.vision_transformer import Block
from torch import nn

from hiseg.modeling.activation_checkpointing import maybe_checkpoint
from hiseg.modeling.attention_taps import class_attention_from_qkv, tap_qkv

from .graph_pool import GraphPool, key_padding_bias
from .segment_ops import count_segments, grid_to_segment_matrix, image_extents
from .stem import ConvStem, sincos_position_embedding

logger = logging.getLogger(__name__)

__all__ = ["CASTEncoder", "compose_hierarchy", "EMPTY_TOKEN_MODES", "POS_RESIZE_MODES"]

# What happens to a segment with no support on the feature grid (a superpixel that vanishes in
# the nearest resize of TOKEN_POOL_MODE "nearest", or a label number no pixel carries):
#   "attend": the released code's behaviour. It becomes an all-zero token (features and position
#             encoding) that takes part in every block's attention, in the centroid block's
#             attention and token mean and in the pooling sums; only FPS leaves it out (padded
#             tokens are filled with the mean of the valid ones). Official weights need this.
#   "mask":   our option. It is masked out of all of these, as if it did not exist.
# Either way, tokens that only pad a batch (labels beyond an image's own count) are masked, so an
# image gives the same result alone or in a batch.
# Token count: an image makes max(label) + 1 tokens, from its full-resolution label map. The
# released classification / MoCo code sizes its tokens by max(label) + 1 of the label maps
# *after* the nearest resize to the stem grid, over the whole batch (segment_mean_nd; github
# twke18/CAST ec85adf). Its batched evaluation (ImageNet, batches of 256) therefore gives every
# image the batch's count, which equals ours whenever some image of the batch keeps its largest
# label on the grid; run on one image alone, it makes fewer tokens when that image's largest
# labels vanish on the grid (195 instead of 196 on some BSDS500 images), and the missing
# all-zero tokens change its output. We keep the batch-independent count: it is the function
# of the released batched evaluation, which made the published numbers
# (tests/hiseg_cast/test_cast_released_reference.py::test_token_count_is_the_released_batched_count).
EMPTY_TOKEN_MODES = ("attend", "mask")

# How the position encodings reach the segments with bilinear token pooling (nearest pooling
# always reads the encoding of the stem grid, which is the released classification code's table
# at 224x224, the only size it accepts):
#   "stretch": the released segmentation code's. The POS_GRID table (sin-cos over POS_GRID, or the
#              learned grid) is resized bicubically over the image's own extent at pixel
#              resolution and averaged per segment. Official weights need this.
#   "grid":    our option. The encoding of the image's own stem grid (sin-cos of the absolute cell
#              position; a learned grid resized to the image's extent on the stem grid) is
#              averaged with the features' bilinear weights.
POS_RESIZE_MODES = ("stretch", "grid")


def compose_hierarchy(superpixels: torch.Tensor, assignments: Sequence[torch.Tensor]) -> torch.Tensor:
    """Eq. 2: S_l = S_0 x P_1 x ... x P_l with hard (argmax) assignments.

    Args:
        superpixels: (B, H, W) int64 S_0, -1 = padding.
        assignments: per level l >= 1 a (B, M_{l-1}) int64 tensor: the level-l segment of each
            level-(l-1) segment.
    Returns:
        (B, L+1, H, W) int64 label maps; level l's labels index level l's tokens. Nested by
        construction: two pixels in one level-l segment share every coarser segment.
    """
    flat = superpixels.flatten(1)
    keep = flat >= 0
    maps = [superpixels]
    seg_to_level = None  # (B, M_0) level-l index of each superpixel
    for a in assignments:
        seg_to_level = a if seg_to_level is None else a.gather(1, seg_to_level)
        lvl = seg_to_level.gather(1, flat.clamp(min=0))
        maps.append(torch.where(keep, lvl, torch.full_like(lvl, -1)).view_as(superpixels))
    return torch.stack(maps, dim=1)


class CASTEncoder(nn.Module):
    def __init__(
        self,
        embed_dim: int = 384,
        depths: Sequence[int] = (3, 3, 3, 2),
        num_heads: int = 12,
        num_segments: Sequence[int] = (64, 32, 16, 8),
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
        pool_dropout: float = 0.1,
        kappa: float = 5.0,
        pooling: bool = True,
        token_pool_mode: str = "bilinear",
        pos_embed: str = "sincos",
        pos_grid: Sequence[int] = (28, 28),
        pos_row_first: bool = True,
        empty_tokens: str = "attend",
        pos_resize: str = "stretch",
        activation_checkpointing: bool = False,
    ):
        super().__init__()
        if pos_resize not in POS_RESIZE_MODES:
            raise ValueError(f"MODEL.CAST.POS_RESIZE must be one of {POS_RESIZE_MODES}, got {pos_resize!r}")
        if empty_tokens not in EMPTY_TOKEN_MODES:
            raise ValueError(f"MODEL.CAST.EMPTY_TOKENS must be one of {EMPTY_TOKEN_MODES}, got {empty_tokens!r}")
        if len(num_segments) != len(depths):
            raise ValueError(f"need one segment count per block group: depths {list(depths)} vs "
                             f"segments {list(num_segments)} (the last count is read-out only)")
        if any(n <= 0 for n in num_segments):
            raise ValueError(f"segment counts must be positive, got {list(num_segments)}")
        self.embed_dim = embed_dim
        self.depths = list(depths)
        self.num_segments = list(num_segments)
        self.pooling = pooling
        self.token_pool_mode = token_pool_mode
        self.pos_embed_type = pos_embed
        self.pos_row_first = pos_row_first
        self.empty_tokens = empty_tokens
        self.pos_resize = pos_resize
        self.pos_grid = tuple(int(v) for v in pos_grid)
        # MODEL.CAST.ACTIVATION_CHECKPOINTING: each ViT block's activations are recomputed in the
        # backward pass (hiseg.modeling.activation_checkpointing). The blocks hold nearly all of the encoder's
        # activations; the conv stem is left alone (its BatchNorm would update its running
        # statistics twice if recomputed) and so are the graph poolings (a small share).
        self.activation_checkpointing = bool(activation_checkpointing)

        self.stem = ConvStem(embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        nn.init.normal_(self.cls_token, std=1e-6)
        # position of the class token: zero and frozen in the released MoCo models
        self.pe_token = nn.Parameter(torch.zeros(1, 1, embed_dim), requires_grad=False)
        if pos_embed == "learned":  # DeiT-trained CAST: learned grid embedding, resized as needed
            self.pos_embed = nn.Parameter(torch.zeros(1, pos_grid[0] * pos_grid[1], embed_dim))
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
            self.pe_token.requires_grad_(True)
        elif pos_embed != "sincos":
            raise ValueError(f"unknown position embedding {pos_embed!r}: 'sincos' or 'learned'")

        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, drop_path=dpr[i],
                  norm_layer=partial(nn.LayerNorm, eps=1e-6))
            for i in range(sum(depths))])
        self.pools = nn.ModuleList([GraphPool(embed_dim, num_heads, kappa, pool_dropout)
                                    for _ in depths]) if pooling else nn.ModuleList()
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self._warned = False

    # ------------------------------------------------------------------------------------------
    def position_encoding(self, grid, device) -> torch.Tensor:
        if self.pos_embed_type == "sincos":
            return sincos_position_embedding(grid, self.embed_dim, row_first=self.pos_row_first, device=device)
        pe = self.pos_embed
        if tuple(grid) != self.pos_grid:
            pe = pe.reshape(1, *self.pos_grid, -1).permute(0, 3, 1, 2)
            pe = nn.functional.interpolate(pe, size=tuple(grid), mode="bicubic", align_corners=False)
            pe = pe.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)
        return pe[0]

    def position_encoding_batch(self, superpixels: torch.Tensor, grid) -> torch.Tensor:
        """E_pos of each image on the stem grid, ``(B or 1, h*w, D)``.

        The sin-cos encoding is a function of the absolute cell position, so one table serves
        every image. A learned grid embedding is resized to each image's own (unpadded) extent
        on the stem grid and placed at its top-left, zero on padding cells: an image gets the
        same encoding alone or padded in a batch (resizing it to the padded grid would shift
        every position with the padding)."""
        device = superpixels.device
        if self.pos_embed_type == "sincos":
            return self.position_encoding(grid, device).unsqueeze(0)
        b, height, width = superpixels.shape
        h, w = int(grid[0]), int(grid[1])
        last_row, last_col = image_extents(superpixels).unbind(1)
        gh = (last_row * h + height - 1).div(height, rounding_mode="floor").clamp(1, h)
        gw = (last_col * w + width - 1).div(width, rounding_mode="floor").clamp(1, w)
        if bool((gh == h).all() and (gw == w).all()):
            return self.position_encoding((h, w), device).unsqueeze(0)
        out = self.pos_embed.new_zeros(b, h, w, self.embed_dim)
        for a, c in torch.unique(torch.stack([gh, gw], 1), dim=0).tolist():
            idx = ((gh == a) & (gw == c)).nonzero().flatten()
            out[idx, :a, :c] = self.position_encoding((a, c), device).view(a, c, -1)
        return out.flatten(1, 2)

    def segment_tokens(self, images: torch.Tensor, superpixels: torch.Tensor):
        """Z_0 = [X_class; X_s] + [0; E_pos] (Sec. 3.1).

        Returns cls (B, 1, D), tokens (B, N, D), ``valid`` (B, N: the segment reaches the
        feature grid) and ``members`` (B, N: the token takes part in attention and pooling; see
        ``EMPTY_TOKEN_MODES``)."""
        feats = self.stem(images)  # (B, D, h, w)
        b, d, h, w = feats.shape
        own = count_segments(superpixels)  # (B,) each image's own number of segments
        n = int(own.max())
        mat, valid = grid_to_segment_matrix(superpixels, n, (h, w), self.token_pool_mode)
        grid_feats = feats.flatten(2).transpose(1, 2)  # (B, h*w, D)
        if self.pos_resize == "stretch" and self.token_pool_mode != "nearest":
            table = self.position_encoding(self.pos_grid, feats.device).to(feats.dtype)
            pos_mat, _ = grid_to_segment_matrix(superpixels, n, self.pos_grid, "bicubic",
                                                image_extents(superpixels))
            tokens = torch.bmm(mat.to(feats.dtype), grid_feats) + torch.matmul(pos_mat.to(feats.dtype), table)
        else:
            pos = self.position_encoding_batch(superpixels, (h, w)).to(feats.dtype)
            tokens = torch.bmm(mat.to(feats.dtype), grid_feats + pos)
        cls = self.cls_token.expand(b, -1, -1) + self.pe_token
        if self.empty_tokens == "attend":
            members = torch.arange(n, device=own.device)[None] < own[:, None]
        else:
            members = valid
        return cls, tokens, valid, members

    def run_blocks(self, blocks, cls, tokens, members):
        """ViT blocks over [cls; tokens]; keys outside ``members`` (B, M) are masked."""
        x = torch.cat([cls, tokens], dim=1)
        mask = None
        if not bool(members.all()):
            mask = key_padding_bias(torch.cat([members.new_ones(members.shape[0], 1), members], 1), x.dtype)
        for blk in blocks:
            x = maybe_checkpoint(blk, x, attn_mask=mask, enabled=self.activation_checkpointing)
        return x[:, :1], x[:, 1:]

    def forward(self, images: torch.Tensor, superpixels: torch.Tensor,
                num_segments: Optional[Sequence[int]] = None) -> Dict[str, object]:
        """Run CAST.

        Args:
            images: (B, 3, H, W) normalised images.
            superpixels: (B, H, W) int64 label maps 0..n-1 (-1 = padding) at image resolution.
            num_segments: overrides the segment counts at test time (Table 6d).
        Returns a dict with
            ``cls`` (B, D) final LayerNorm of the class token (the recognition output);
            ``levels``: per block group l, tokens (B, M_l, D), ``valid`` (B, M_l: has support)
                and ``members`` (B, M_l: took part in attention and pooling);
            ``logits``: per graph pooling, (B, M_{l-1}, M_l);
            ``hierarchy`` (B, L+1, H, W) label maps (level 0 = superpixels) and
            ``num_segments`` (B, L+1): segments each level has per image (fewer than asked
            when an image has fewer tokens than a level's count).
        """
        if images.dim() != 4 or superpixels.dim() != 3 or images.shape[0] != superpixels.shape[0] \
                or images.shape[-2:] != superpixels.shape[-2:]:
            raise ValueError(f"images (B,3,H,W) and superpixels (B,H,W) must agree; got "
                             f"{tuple(images.shape)} and {tuple(superpixels.shape)}")
        counts = list(num_segments) if num_segments is not None else self.num_segments
        if len(counts) != len(self.depths):
            raise ValueError(f"expected {len(self.depths)} segment counts, got {list(counts)}")
        superpixels = superpixels.long()
        cls, tokens, valid, members = self.segment_tokens(images, superpixels)
        n_per_level = [valid.sum(1)]
        levels, logits, assignments = [], [], []
        start = 0
        for g, depth in enumerate(self.depths):
            cls, tokens = self.run_blocks(self.blocks[start:start + depth], cls, tokens, members)
            start += depth
            levels.append({"tokens": tokens, "valid": valid, "members": members})
            if g == len(self.depths) - 1:
                out_cls = self.norm(cls)[:, 0]
            if not self.pooling:
                continue
            if g < len(self.depths) - 1:
                pooled = self.pools[g](cls, tokens, valid, counts[g], members)
                lg, valid_out = pooled.logits, pooled.valid
                cls, tokens, valid = pooled.cls_token, pooled.tokens, pooled.valid
                members = valid  # every centroid slot that exists is a real token
            else:  # the last pooling is used for the read-out only: no new tokens needed
                lg, _, valid_out = self.pools[g].assignment_logits(tokens, valid, counts[g], members)
            logits.append(lg)
            assignments.append(lg.argmax(-1))
            n_per_level.append(valid_out.sum(1))
        num_segs = torch.stack(n_per_level, dim=1)
        self._report_short_levels(num_segs, counts)
        return {
            "cls": out_cls,
            "levels": levels,
            "logits": logits,
            "assignments": assignments,
            "hierarchy": compose_hierarchy(superpixels, assignments),
            "num_segments": num_segs,
        }

    def _report_short_levels(self, num_segs, counts):
        if self._warned or not self.pooling:
            return
        short = num_segs[:, 1:] < torch.tensor(counts, device=num_segs.device)[None]
        if bool(short.any()):
            self._warned = True
            img, lvl = [int(v) for v in short.nonzero()[0]]
            logger.warning(
                "CAST: an image has fewer segments than level %d asks for (%d < %d); that level "
                "keeps what it has (see output 'num_segments'). Reported once.",
                lvl + 1, int(num_segs[img, lvl + 1]), counts[lvl])

    def unpool_to_superpixels(self, out: Dict[str, object]) -> List[torch.Tensor]:
        """Eq. 4: each block group's tokens scattered back to the superpixels, (B, M_0, D) each."""
        feats = [out["levels"][0]["tokens"]]
        seg_to_level = None
        for g in range(1, len(out["levels"])):
            if self.pooling:
                a = out["assignments"][g - 1]
                seg_to_level = a if seg_to_level is None else a.gather(1, seg_to_level)
                idx = seg_to_level.unsqueeze(-1).expand(-1, -1, self.embed_dim)
                feats.append(out["levels"][g]["tokens"].gather(1, idx))
            else:
                feats.append(out["levels"][g]["tokens"])
        return feats

    # ------------------------------------------------------------------------------------------
    # attention taps (hiseg.modeling.attention_taps; CAST Table 5 figure-ground)
    def attention_blocks(self) -> List[nn.Module]:
        """The ViT blocks, numbered flat over the block groups (as the released code)."""
        return list(self.blocks)

    def block_group(self, block: int) -> int:
        """The block group (hierarchy level with pooling) a python index into the blocks
        belongs to; IndexError when out of range."""
        total = sum(self.depths)
        if not -total <= block < total:
            raise IndexError(f"block {block} out of range for {total} blocks")
        idx, group, start = block % total, 0, 0
        for group, depth in enumerate(self.depths):
            if idx < start + depth:
                break
            start += depth
        return group

    def class_attention_of_pass(self, block: int, qkv: torch.Tensor, out: Dict[str, object]) -> Dict[str, object]:
        """The class token's attention in block ``block`` from its tapped ``attn.qkv`` output and
        the output ``out`` of the same forward pass: ``attn`` (B, heads, M), ``labels`` (B, H, W)
        (the hierarchy level whose labels index those tokens, -1 = padding), ``valid`` (B, M) and
        ``level``. The keys are the tokens the block attended to (``members``: with the released
        behaviour these include the all-zero tokens of segments that vanished on the grid)."""
        group = self.block_group(block)
        valid = out["levels"][group]["valid"]
        level = group if self.pooling else 0
        keys = out["levels"][group].get("members", valid)
        key_valid = torch.cat([keys.new_ones(keys.shape[0], 1), keys], 1)
        attn = class_attention_from_qkv(self.blocks[block].attn, qkv, key_valid, num_prefix=1)
        return {"attn": attn, "labels": out["hierarchy"][:, level], "valid": valid, "level": level}

    @torch.no_grad()
    def class_attention(self, images: torch.Tensor, block: int = -1, *, superpixels: torch.Tensor,
                        num_segments: Optional[Sequence[int]] = None) -> Dict[str, object]:
        """The class token's attention over the segment tokens of one block (default the last),
        from one forward pass (the attention-taps interface, :mod:`hiseg.modeling.attention_taps`):
        :meth:`class_attention_of_pass` and ``output``, the encoder's output of that pass."""
        self.block_group(block)
        with tap_qkv(self.blocks[block], detach=True) as tap:
            out = self(images, superpixels, num_segments=num_segments)
        res = self.class_attention_of_pass(block, tap.qkv, out)
        res["output"] = out
        return res
