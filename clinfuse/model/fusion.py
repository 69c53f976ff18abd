"""Intermediate fusion: a stack of bidirectional cross-attention blocks.

In each block the text tokens attend to the image tokens and the image tokens attend to the
text tokens. Every sub-layer is pre-norm with a residual around it: without the residual a
token could only carry what it read from the other side, and a label that depends on the
note alone could not be learned.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from clinfuse.config import FusionConfig


class FeedForward(nn.Sequential):
    def __init__(self, width: int, ratio: float, dropout: float) -> None:
        hidden = int(width * ratio)
        super().__init__(
            nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, width)
        )


@dataclass
class BlockAttention:
    """Attention weights of one block, averaged over heads."""

    text_to_image: torch.Tensor  # (B, Nt, Ni): what each text token read in the image
    image_to_text: torch.Tensor  # (B, Ni, Nt): what each image token read in the note


class CrossAttentionBlock(nn.Module):
    """text <- image and image <- text cross-attention, then a feed-forward layer per side."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.norm_text = nn.LayerNorm(width)
        self.norm_image = nn.LayerNorm(width)
        self.text_reads_image = nn.MultiheadAttention(width, heads, batch_first=True)
        self.image_reads_text = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm_text_ff = nn.LayerNorm(width)
        self.norm_image_ff = nn.LayerNorm(width)
        self.ff_text = FeedForward(width, mlp_ratio, dropout)
        self.ff_image = FeedForward(width, mlp_ratio, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(
        self,
        text: torch.Tensor,  # (B, Nt, D)
        image: torch.Tensor,  # (B, Ni, D)
        text_valid: torch.Tensor,  # (B, Nt) bool, True = a real token
        image_valid: torch.Tensor,  # (B, Ni) bool
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, BlockAttention | None]:
        t, i = self.norm_text(text), self.norm_image(image)
        t_read, t_weights = self.text_reads_image(
            t, i, i, key_padding_mask=~image_valid, need_weights=need_weights
        )  # (B, Nt, D), (B, Nt, Ni)
        i_read, i_weights = self.image_reads_text(
            i, t, t, key_padding_mask=~text_valid, need_weights=need_weights
        )  # (B, Ni, D), (B, Ni, Nt)
        text = text + self.drop(t_read)
        image = image + self.drop(i_read)
        text = text + self.drop(self.ff_text(self.norm_text_ff(text)))
        image = image + self.drop(self.ff_image(self.norm_image_ff(image)))
        attention = BlockAttention(t_weights, i_weights) if need_weights else None
        return text, image, attention


class Fusion(nn.Module):
    """`depth` cross-attention blocks, then a final norm on each side."""

    def __init__(self, cfg: FusionConfig) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            CrossAttentionBlock(cfg.width, cfg.heads, cfg.mlp_ratio, cfg.dropout)
            for _ in range(cfg.depth)
        )
        self.norm_text = nn.LayerNorm(cfg.width)
        self.norm_image = nn.LayerNorm(cfg.width)

    def forward(
        self,
        text: torch.Tensor,
        image: torch.Tensor,
        text_valid: torch.Tensor,
        image_valid: torch.Tensor,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, list[BlockAttention]]:
        maps = []
        for block in self.blocks:
            text, image, attention = block(text, image, text_valid, image_valid, need_weights)
            if attention is not None:
                maps.append(attention)
        return self.norm_text(text), self.norm_image(image), maps
