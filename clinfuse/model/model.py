"""`FusionModel`: image encoder + note encoder -> fusion -> pooled (B, D) -> logits (B, L).

`forward` takes tensors and returns one logits tensor so captum can drive it; the richer
outputs (per-side tokens, pooled features, attention maps) come from `forward_intermediates`.
One config key, `fusion.mode`, chooses the model or one of its baselines:

- `cross_attention` (default): intermediate bidirectional cross-attention, then pooling;
- `late`: each side pooled on its own, the two pooled vectors concatenated;
- `image_only` / `text_only`: one side, pooled.

A study may lack its image or its note: a learned token stands in for the missing side, and
modality dropout in training (`fusion.modality_dropout`) teaches the model to use either side
alone. With side heads (`fusion.side_loss` > 0), each encoder also has its own head, trained
on that side's tokens before fusion; a study with one side only is answered by that side's
head (times its evidence weight, below), so losing a side leaves about a single-side model; a
study with neither side gets a learned prior (the base rate: the modality Shapley values'
empty set).
With `fusion.combine="naive_bayes"` a study with both sides gets image head + note head - prior
(the sides' naive-Bayes log-odds) plus the fused head's correction; after training, each
label's weights of the image's evidence (image head - prior), the note's evidence and the
correction are fitted on validation (`evidence_weights`), so a side that tells a label nothing
drops out of its answer.

Like torchxrayvision, the model knows its label names and carries its per-label temperature,
offset and decision thresholds as buffers, so the checkpoint alone is enough to predict.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from clinfuse.config import ModelConfig
from clinfuse.model.fusion import BlockAttention, Fusion
from clinfuse.model.image_encoder import ImageEncoder
from clinfuse.model.text_encoder import NoteTokenizer, TextEncoder


@dataclass
class Intermediates:
    """Everything `forward` computes on the way to the logits."""

    text_tokens: torch.Tensor  # (B, Nt, D) after fusion (or encoding, without fusion)
    image_tokens: torch.Tensor  # (B, Ni, D)
    text_valid: torch.Tensor  # (B, Nt) bool
    image_valid: torch.Tensor  # (B, Ni) bool
    image_used: torch.Tensor  # (B,) bool: the image side was real (not the missing token)
    note_used: torch.Tensor  # (B,) bool
    pooled: torch.Tensor  # (B, D) with mean pooling, (B, L, D) with label attention
    logits: torch.Tensor  # (B, L)
    attention: list[BlockAttention]  # one per fusion block when asked for, else empty
    # (B, 3, L) with side heads: the image and note heads on unfused tokens, and the prior
    side_logits: torch.Tensor | None = None
    # (B, L) with combine="naive_bayes": the fused head's correction, before its weight
    correction: torch.Tensor | None = None

    @property
    def evidence(self) -> torch.Tensor | None:
        """(B, 3, L) the terms the evidence weights weigh: image head - prior, note head -
        prior, the correction; None without combine="naive_bayes"."""
        if self.correction is None or self.side_logits is None:
            return None
        prior = self.side_logits[:, 2:3]  # (B, 1, L)
        return torch.cat([self.side_logits[:, :2] - prior, self.correction[:, None]], dim=1)


def masked_mean(tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B, N, D), (B, N) -> (B, D) mean over the valid tokens."""
    weights = valid.to(tokens.dtype).unsqueeze(-1)  # (B, N, 1)
    return (tokens * weights).sum(1) / weights.sum(1).clamp(min=1.0)


class LabelHeads(nn.Module):
    """One logit a label: a linear map of the pooled features, shared (B, D) or per label
    (B, L, D) with label attention."""

    def __init__(self, width: int, n_labels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_labels, width))
        self.bias = nn.Parameter(torch.zeros(n_labels))
        nn.init.normal_(self.weight, std=width**-0.5)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        if pooled.dim() == 2:  # (B, D) -> (B, L)
            return pooled @ self.weight.T + self.bias
        return (pooled * self.weight).sum(-1) + self.bias  # (B, L, D) -> (B, L)


class FusionModel(nn.Module):
    """Multimodal multi-label classifier; see the module docstring."""

    def __init__(
        self,
        cfg: ModelConfig,
        tokenizer: PreTrainedTokenizerBase,
        text_saved: dict | None = None,
    ) -> None:
        super().__init__()
        if not cfg.labels:
            raise ValueError("a model needs at least one label (ModelConfig.labels)")
        self.cfg = cfg
        self.labels = tuple(cfg.labels)
        self.note_tokenizer = NoteTokenizer(tokenizer, cfg.text)
        width, mode = cfg.fusion.width, cfg.fusion.mode
        self.uses_image = mode != "text_only"
        self.uses_text = mode != "image_only"
        self.image_encoder = (
            ImageEncoder(cfg.image, cfg.preprocess.spatial_size, width) if self.uses_image else None
        )
        self.text_encoder = (
            TextEncoder(
                cfg.text,
                width,
                len(tokenizer),
                text_saved,
                mask_id=tokenizer.mask_token_id
                if tokenizer.mask_token_id is not None
                else tokenizer.unk_token_id,
                special_ids=tokenizer.all_special_ids,
            )
            if self.uses_text
            else None
        )
        # learned stand-ins for an absent image / note (only for the sides this mode uses)
        self.missing_image = (
            nn.Parameter(0.02 * torch.randn(1, 1, width)) if self.uses_image else None
        )
        self.missing_text = (
            nn.Parameter(0.02 * torch.randn(1, 1, width)) if self.uses_text else None
        )
        self.fusion = Fusion(cfg.fusion) if mode == "cross_attention" else None
        self.width = width
        n_labels = len(self.labels)
        self.label_attention = None
        if cfg.fusion.pooling == "label_attention":
            self.label_queries = nn.Parameter(0.02 * torch.randn(n_labels, width))
            self.label_attention = nn.MultiheadAttention(width, cfg.fusion.heads, batch_first=True)
        pooled_in = width * (int(self.uses_image) + int(self.uses_text))
        self.pool = nn.Sequential(
            nn.LayerNorm(pooled_in),
            nn.Linear(pooled_in, width),
            nn.GELU(),
            nn.Dropout(cfg.fusion.dropout),
        )
        self.head = LabelHeads(width, n_labels)  # one logit a label
        self.side_heads = (
            nn.ModuleList([LabelHeads(width, n_labels), LabelHeads(width, n_labels)])
            if cfg.fusion.side_loss > 0 and self.uses_image and self.uses_text
            else None
        )  # image, note: trained by the auxiliary loss only
        # the answer without any evidence (a study with neither side, e.g. the empty coalition
        # of the modality Shapley values): one learned logit a label, the weighted base rate
        self.prior = nn.Parameter(torch.zeros(n_labels)) if self.side_heads is not None else None
        n = len(self.labels)
        self.register_buffer("temperature", torch.ones(n))  # fitted after training
        self.register_buffer("offset", torch.zeros(n))  # fitted with the temperature
        self.register_buffer("thresholds", torch.full((n,), 0.5))  # on calibrated probabilities
        # with combine="naive_bayes": per label, the weights of the image's evidence, the note's
        # evidence and the fused correction (columns), fitted on validation after training
        self.register_buffer("evidence_weights", torch.ones(n, 3))

    # -- the two towers -------------------------------------------------------------------
    def encode_image(
        self, image: torch.Tensor, present: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, *spatial), (B,) -> tokens (B, Ni, D), valid (B, Ni); missing -> learned token."""
        tokens = self.image_encoder(image)  # (B, Ni, D)
        return self._stand_in(tokens, present, self.missing_image)

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, present: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, Nt) ids and mask, (B,) -> tokens (B, Nt, D), valid (B, Nt)."""
        tokens = self.text_encoder(input_ids, attention_mask)  # (B, Nt, D)
        tokens, stand_in_valid = self._stand_in(tokens, present, self.missing_text)
        return tokens, torch.where(present[:, None], attention_mask.bool(), stand_in_valid)

    @staticmethod
    def _stand_in(
        tokens: torch.Tensor, present: torch.Tensor, missing: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Replace an absent side by one valid learned token (position 0), the rest masked."""
        B, N, _ = tokens.shape
        tokens = torch.where(present[:, None, None], tokens, missing.expand(B, N, -1))
        valid = present[:, None].expand(B, N).clone()
        valid[:, 0] = True
        return tokens, valid

    def _modality_dropout(
        self, image_present: torch.Tensor, note_present: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Training only: with both sides present, drop one (chosen at random) with chance p."""
        p = self.cfg.fusion.modality_dropout
        if not self.training or p <= 0 or not (self.uses_image and self.uses_text):
            return image_present, note_present
        both = image_present & note_present
        drop = both & (torch.rand_like(both, dtype=torch.float32) < p)
        drop_image = drop & (torch.rand_like(both, dtype=torch.float32) < 0.5)
        return image_present & ~drop_image, note_present & ~(drop & ~drop_image)

    # -- fusion and heads -----------------------------------------------------------------
    def forward_intermediates(
        self,
        image: torch.Tensor,  # (B, C, *spatial) float
        input_ids: torch.Tensor,  # (B, Nt) long
        attention_mask: torch.Tensor,  # (B, Nt) long
        image_present: torch.Tensor,  # (B,) bool
        note_present: torch.Tensor,  # (B,) bool
        need_weights: bool = False,
    ) -> Intermediates:
        B = image.shape[0]
        image_present, note_present = self._modality_dropout(
            image_present.bool(), note_present.bool()
        )
        width = self.width
        empty = (
            image.new_zeros(B, 1, width),
            torch.ones(B, 1, dtype=torch.bool, device=image.device),
        )
        image_tokens, image_valid = (
            self.encode_image(image, image_present) if self.uses_image else empty
        )
        text_tokens, text_valid = (
            self.encode_text(input_ids, attention_mask, note_present) if self.uses_text else empty
        )
        side_logits = None
        if self.side_heads is not None:
            side_logits = torch.stack(
                [
                    self.side_heads[0](masked_mean(image_tokens, image_valid)),
                    self.side_heads[1](masked_mean(text_tokens, text_valid)),
                    self.prior.expand(B, -1),
                ],
                dim=1,
            )  # (B, 3, L)
        attention: list[BlockAttention] = []
        if self.fusion is not None:
            text_tokens, image_tokens, attention = self.fusion(
                text_tokens, image_tokens, text_valid, image_valid, need_weights
            )
        sides = []
        if self.uses_text:
            sides.append(self._pool_side(text_tokens, text_valid))  # (B, D) or (B, L, D)
        if self.uses_image:
            sides.append(self._pool_side(image_tokens, image_valid))
        pooled = self.pool(torch.cat(sides, dim=-1))  # (B, D) or (B, L, D)
        image_used = image_present & self.uses_image
        note_used = note_present & self.uses_text
        logits = self.head(pooled)  # (B, L)
        correction = None
        if side_logits is not None:
            prior = side_logits[:, 2]  # (B, L)
            image_alone, note_alone = self._evidence(side_logits, prior)  # (B, L) each
            if self.cfg.fusion.combine == "naive_bayes":
                # logit P(y | image, note) = logit P(y) + each side's evidence when the two are
                # independent given y; the head learns what that misses (its correction)
                correction = logits
                logits = image_alone + note_alone - prior + self.evidence_weights[:, 2] * logits
            # one side only: its own head answers; none: the prior
            logits = torch.where((image_used & ~note_used)[:, None], image_alone, logits)
            logits = torch.where((note_used & ~image_used)[:, None], note_alone, logits)
            logits = torch.where((~image_used & ~note_used)[:, None], prior, logits)
        return Intermediates(
            text_tokens=text_tokens,
            image_tokens=image_tokens,
            text_valid=text_valid,
            image_valid=image_valid,
            image_used=image_used,
            note_used=note_used,
            pooled=pooled,
            logits=logits,
            attention=attention,
            side_logits=side_logits,
            correction=correction,
        )

    @property
    def weighs_evidence(self) -> bool:
        """Side heads and combine="naive_bayes": the answer has the three weighed terms."""
        return self.side_heads is not None and self.cfg.fusion.combine == "naive_bayes"

    def _evidence(
        self, side_logits: torch.Tensor, prior: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The image head's and the note head's answers (B, L) each, as the prior plus the
        side's evidence (its logit - the prior) times the label's fitted weight."""
        weights = self.evidence_weights  # (L, 3)
        image = prior + weights[:, 0] * (side_logits[:, 0] - prior)
        note = prior + weights[:, 1] * (side_logits[:, 1] - prior)
        return image, note

    def _pool_side(self, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B, D) masked mean, or (B, L, D): each label's query reads the side."""
        if self.label_attention is None:
            return masked_mean(tokens, valid)
        queries = self.label_queries.expand(tokens.shape[0], -1, -1)  # (B, L, D)
        read, _ = self.label_attention(
            queries, tokens, tokens, key_padding_mask=~valid, need_weights=False
        )
        return read  # (B, L, D)

    def forward(
        self,
        image: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_present: torch.Tensor,
        note_present: torch.Tensor,
        with_sides: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits (B, L); with `with_sides` (training with side heads) also the image head's,
        the note head's and the prior's logits (B, 3, L) and which of them each study really
        used (B, 3) bool: the image, the note, and always the prior."""
        out = self.forward_intermediates(
            image, input_ids, attention_mask, image_present, note_present
        )
        if not with_sides:
            return out.logits
        if out.side_logits is None:
            raise ValueError("this model has no side heads (fusion.side_loss is 0)")
        used = torch.stack([out.image_used, out.note_used, torch.ones_like(out.note_used)], 1)
        return out.logits, out.side_logits, used

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Calibrated probabilities (B, L): sigmoid(logits / temperature + offset), per label."""
        return torch.sigmoid(logits / self.temperature + self.offset)

    def decisions(self, probabilities: torch.Tensor) -> torch.Tensor:
        """(B, L) bool: calibrated probability at or above the label's saved threshold."""
        return probabilities >= self.thresholds
