"""Masked-language-model pretraining of the built-in note encoder on the export's own notes.

Offline domain-adaptive pretraining (Gururangan et al., ACL 2020, "Don't stop pretraining"):
before the supervised run, the small BERT that clinfuse builds when no `text.pretrained`
encoder is given learns to fill in masked word pieces of the training notes, so each token's
representation carries its context ("left" next to "crackles at the ... base" is not "left" in
"left knee replacement") before any label asks for it. A borrowed MLM head (tied to the token
embeddings) is dropped afterwards; only the encoder's weights carry over.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn
from transformers import DataCollatorForLanguageModeling
from transformers.models.bert.modeling_bert import BertOnlyMLMHead

from clinfuse.errors import ConfigError
from clinfuse.model.model import FusionModel

log = logging.getLogger(__name__)


def pretrain_note_encoder(
    model: FusionModel,
    notes: Sequence[str],
    epochs: int,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
) -> list[float]:
    """Train `model`'s note encoder as a masked language model on `notes` for `epochs`
    passes (15 % of word pieces masked, BERT's 80/10/10 rule); the mean loss per epoch."""
    if model.text_encoder is None or not notes or epochs <= 0:
        return []
    encoder = model.text_encoder.model
    if encoder.config.model_type != "bert":
        raise ConfigError(
            "model.text.mlm_epochs",
            f"masked-language pretraining needs a BERT encoder, not {encoder.config.model_type!r}",
            hint="set model.text.mlm_epochs=0 for this encoder",
        )
    device = next(encoder.parameters()).device
    tokenizer = model.note_tokenizer.tokenizer
    head = BertOnlyMLMHead(encoder.config).to(device)
    head.predictions.decoder.weight = encoder.get_input_embeddings().weight  # tied, as in BERT
    collate = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15, return_tensors="pt")
    encoded = tokenizer(list(notes), truncation=True, max_length=model.note_tokenizer.max_length)[
        "input_ids"
    ]
    params = list(encoder.parameters()) + [
        p for n, p in head.named_parameters() if not n.endswith("decoder.weight")
    ]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    was_training = encoder.training
    encoder.train()
    for epoch in range(epochs):
        torch.manual_seed(seed * 1_000_003 + epoch)  # the collator masks with torch's RNG
        order = torch.randperm(len(encoded), generator=generator).tolist()
        total, count = 0.0, 0
        for start in range(0, len(order), batch_size):
            batch = collate([{"input_ids": encoded[i]} for i in order[start : start + batch_size]])
            batch = {k: v.to(device) for k, v in batch.items()}
            if not bool((batch["labels"] != -100).any()):  # no piece masked: nothing to learn
                continue  # (a step on a NaN loss would still move AdamW's moments)
            hidden = encoder(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).last_hidden_state  # (B, T, H)
            logits = head(hidden)  # (B, T, V)
            loss = nn.functional.cross_entropy(
                logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            total, count = total + loss.item() * len(batch["labels"]), count + len(batch["labels"])
        losses.append(total / count if count else float("nan"))
        log.info(
            "note encoder pretraining: epoch %d/%d MLM loss %.3f", epoch + 1, epochs, losses[-1]
        )
    encoder.train(was_training)
    return losses
