"""MONAI's `Transchex` behind clinfuse's model interface, built offline.

Transchex (Hatamizadeh et al.) patch-embeds a 3-channel 2D image of a fixed size, runs BERT
layers over the note and over the patches, then mixed (cross-attention) layers, and classifies
the pooled [CLS] token. It loads its BERT weights from `bert-base-uncased` on the hub; here a
small `BertConfig` with randomly initialised weights is written to a local folder instead
(`write_offline_bert`), so nothing is downloaded.

The architecture is MONAI's, unchanged; only its inputs are adapted, in `TranschexClassifier`:

- images come from clinfuse's own transforms with `in_channels=3` (the grey channel repeated)
  at `img_size`; an absent image becomes a black image (the normalised value of intensity 0);
- Transchex attends to every token (its forward builds an all-ones attention mask), so notes
  are padded to one fixed length, as MONAI's tutorial does, and a study's score does not depend
  on the batch it came in; an absent note becomes the empty note `[CLS] [SEP]`;
- segment ids are all zero (one sentence).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from monai.networks.nets import Transchex
from torch import nn
from transformers import BertConfig, BertModel, PreTrainedTokenizerBase

from clinfuse.config import Config, ModelConfig
from clinfuse.model.text_encoder import NoteTokenizer

WEIGHTS_FILE = "pytorch_model.bin"  # the file name Transchex's loader reads with torch.load


class TranschexConfig(Config):
    """Transchex's sizes (MONAI's argument names in comments); defaults ~ clinfuse `small`."""

    img_size: int = 96  # img_size=(img_size, img_size)
    patch_size: int = 16  # 96 / 16 = 6x6 patch tokens, the grid clinfuse small's DenseNet ends on
    hidden: int = 64  # hidden_size
    heads: int = 4  # num_attention_heads
    intermediate: int = 128  # intermediate_size
    language_layers: int = 2  # num_language_layers
    vision_layers: int = 3  # num_vision_layers
    mixed_layers: int = 2  # num_mixed_layers
    max_position_embeddings: int = 128
    drop_out: float = 0.1  # dropout before the classification head
    hidden_dropout: float = 0.1  # hidden_dropout_prob (MONAI's default)
    attention_dropout: float = 0.1  # attention_probs_dropout_prob (MONAI's default)


def bert_config(cfg: TranschexConfig, vocab_size: int) -> BertConfig:
    """The BERT whose weights Transchex loads: the sizes Transchex is built with."""
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden,
        num_hidden_layers=cfg.language_layers,
        num_attention_heads=cfg.heads,
        intermediate_size=cfg.intermediate,
        max_position_embeddings=cfg.max_position_embeddings,
        hidden_dropout_prob=cfg.hidden_dropout,
        attention_probs_dropout_prob=cfg.attention_dropout,
    )


def write_offline_bert(
    folder: str | Path, cfg: TranschexConfig, tokenizer: PreTrainedTokenizerBase
) -> Path:
    """A randomly initialised small BERT + tokenizer in `folder`, in place of the hub download.

    `save_pretrained` writes config, safetensors and tokenizer; Transchex's loader reads a
    pickled state dict with `torch.load(weights_only=True)`, so `pytorch_model.bin` is written
    beside them.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    bert = BertModel(bert_config(cfg, len(tokenizer)), add_pooling_layer=False)
    bert.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    torch.save(bert.state_dict(), folder / WEIGHTS_FILE)
    return folder


def build_transchex(
    cfg: TranschexConfig, n_labels: int, vocab_size: int, bert_dir: str | Path
) -> Transchex:
    """MONAI's Transchex with its BERT loaded from the local `bert_dir` (no network)."""
    if not (Path(bert_dir) / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{bert_dir}: no {WEIGHTS_FILE}; write it with write_offline_bert")
    return Transchex(
        in_channels=3,
        img_size=(cfg.img_size, cfg.img_size),
        patch_size=(cfg.patch_size, cfg.patch_size),
        num_classes=n_labels,
        num_language_layers=cfg.language_layers,
        num_vision_layers=cfg.vision_layers,
        num_mixed_layers=cfg.mixed_layers,
        hidden_size=cfg.hidden,
        drop_out=cfg.drop_out,
        attention_probs_dropout_prob=cfg.attention_dropout,
        hidden_dropout_prob=cfg.hidden_dropout,
        intermediate_size=cfg.intermediate,
        max_position_embeddings=cfg.max_position_embeddings,
        num_attention_heads=cfg.heads,
        num_hidden_layers=cfg.language_layers,
        vocab_size=vocab_size,
        path_or_repo_id=str(bert_dir),
        filename=WEIGHTS_FILE,
    )


def data_config(
    model: ModelConfig, cfg: TranschexConfig, labels: tuple[str, ...], seq_len: int
) -> ModelConfig:
    """clinfuse's data settings for Transchex: 3 channels at its img_size, notes of `seq_len`."""
    return model.model_copy(
        update={
            "labels": tuple(labels),
            "image": model.image.model_copy(update={"in_channels": 3}),
            "preprocess": model.preprocess.model_copy(
                update={"spatial_size": (cfg.img_size, cfg.img_size)}
            ),
            "text": model.text.model_copy(update={"max_length": seq_len}),
        }
    )


@dataclass
class PeerOutputs:
    """What `clinfuse.engine.predict` reads from a model's `forward_intermediates`."""

    logits: torch.Tensor  # (B, L)
    image_used: torch.Tensor  # (B,) bool
    note_used: torch.Tensor  # (B,) bool


class TranschexClassifier(nn.Module):
    """Transchex with clinfuse's forward signature, labels, temperature and thresholds.

    Like `FusionModel` it carries its data settings (`cfg`, a `ModelConfig`) and its
    `note_tokenizer`, so clinfuse's `StudyDataset`, `Collator` and `engine.predict` serve it.
    """

    def __init__(
        self,
        net: Transchex,
        cfg: ModelConfig,
        tokenizer: PreTrainedTokenizerBase,
        peer: TranschexConfig,
    ) -> None:
        super().__init__()
        self.net = net
        self.cfg = cfg  # data settings: labels, 3-channel preprocessing, note length
        self.peer = peer
        self.labels = tuple(cfg.labels)
        self.note_tokenizer = NoteTokenizer(tokenizer, cfg.text)
        self.seq_len = cfg.text.max_length
        mean, std = cfg.preprocess.normalize
        self.black = (0.0 - mean) / std  # intensity 0 after clinfuse's normalisation
        self.pad_id = tokenizer.pad_token_id
        empty = torch.full((self.seq_len,), self.pad_id, dtype=torch.long)
        empty[:2] = torch.tensor([tokenizer.cls_token_id, tokenizer.sep_token_id])
        self.register_buffer("empty_note", empty, persistent=False)  # (T,) [CLS] [SEP] pad ...
        n = len(self.labels)
        self.register_buffer("temperature", torch.ones(n))
        self.register_buffer("offset", torch.zeros(n))
        self.register_buffer("thresholds", torch.full((n,), 0.5))

    def fixed_length(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, Nt) -> (B, seq_len): padded (or cut) to the one length Transchex sees."""
        B, N = input_ids.shape
        if N >= self.seq_len:
            return input_ids[:, : self.seq_len]
        return torch.cat([input_ids, input_ids.new_full((B, self.seq_len - N), self.pad_id)], 1)

    def forward_intermediates(
        self,
        image: torch.Tensor,  # (B, 3, H, W) float
        input_ids: torch.Tensor,  # (B, Nt) long
        attention_mask: torch.Tensor,  # (B, Nt) long; Transchex has no use for it
        image_present: torch.Tensor,  # (B,) bool
        note_present: torch.Tensor,  # (B,) bool
    ) -> PeerOutputs:
        image_present, note_present = image_present.bool(), note_present.bool()
        image = torch.where(image_present[:, None, None, None], image, image.new_tensor(self.black))
        ids = torch.where(note_present[:, None], self.fixed_length(input_ids), self.empty_note)
        logits = self.net(
            input_ids=ids, token_type_ids=torch.zeros_like(ids), vision_feats=image
        )  # (B, L)
        return PeerOutputs(logits, image_present, note_present)

    def forward(
        self,
        image: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_present: torch.Tensor,
        note_present: torch.Tensor,
    ) -> torch.Tensor:
        """Logits (B, L), the same inputs as `FusionModel.forward`."""
        return self.forward_intermediates(
            image, input_ids, attention_mask, image_present, note_present
        ).logits


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
