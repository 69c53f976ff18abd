"""`TextEncoder` and `NoteTokenizer`: clinical notes -> tokens (B, Nt, D).

The encoder is any transformers `AutoModel` (a local folder or a hub name such as
Bio_ClinicalBERT or RadBERT, used only when the user supplies it) or, the offline default, a
small BERT built from an in-memory config with a WordPiece tokenizer trained on the training
notes. Nothing is downloaded at run time unless the user names a hub model.

Long notes: with `long_notes="truncate"` (default) a note longer than `max_length` tokens is
cut, with a warning naming how many notes were cut; with `long_notes="chunk"` it is split into
up to `max_chunks` windows of `max_length` tokens, each encoded on its own and concatenated, so
the fusion sees up to `max_chunks * max_length` tokens (anything beyond is cut with a warning).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer, decoders
from tokenizers.models import WordPiece
from tokenizers.normalizers import BertNormalizer
from tokenizers.pre_tokenizers import BertPreTokenizer
from tokenizers.processors import TemplateProcessing
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, BertConfig, PreTrainedTokenizerFast

from clinfuse.config import TextConfig
from clinfuse.errors import ConfigError

log = logging.getLogger(__name__)
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def train_tokenizer(
    notes: Iterable[str | tuple[str, str]], vocab_size: int, min_patients: int = 1
) -> PreTrainedTokenizerFast:
    """A lower-casing WordPiece tokenizer whose vocabulary comes from `notes` (offline default).

    `notes` are texts or (patient id, text) pairs. Deterministic (the `tokenizers` trainer
    breaks frequency ties in hash order, so two runs could disagree): the special tokens, every
    character seen (alone and as a `##` piece, so any word can be spelled), then whole words
    found in the notes of at least `min_patients` patients (a text without a patient counts as
    its own), by frequency, ties alphabetical, up to `vocab_size`. The vocabulary is saved with
    the model, so a word only one patient's notes hold (a name, a record number) must stay out.
    """
    normalizer, pre_tokenizer = BertNormalizer(lowercase=True), BertPreTokenizer()
    counts: Counter[str] = Counter()
    holders: dict[str, set[Any]] = {}  # word -> the patients whose notes hold it
    for i, item in enumerate(notes):
        patient, note = item if isinstance(item, tuple) else (i, item)
        if note:
            words = [w for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(note))]
            counts.update(words)
            for word in words:
                holders.setdefault(word, set()).add(patient)
    alphabet = sorted({char for word in counts for char in word})
    vocab = [*SPECIAL_TOKENS, *alphabet, *(f"##{char}" for char in alphabet)]
    known = set(vocab)
    shared = {w: n for w, n in counts.items() if len(holders[w]) >= min_patients}
    by_frequency = sorted(shared.items(), key=lambda item: (-item[1], item[0]))
    vocab += [w for w, _ in by_frequency if w not in known][: max(0, vocab_size - len(vocab))]
    backend = Tokenizer(WordPiece({token: i for i, token in enumerate(vocab)}, unk_token="[UNK]"))
    backend.normalizer, backend.pre_tokenizer = normalizer, pre_tokenizer
    backend.decoder = decoders.WordPiece()
    backend.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]",
        special_tokens=[(t, backend.token_to_id(t)) for t in ("[CLS]", "[SEP]")],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=1_000_000,
    )


# the files a tokenizer is saved in: a folder without any holds none (transformers would build an
# empty one from config.json alone, and every note would be read as [UNK])
TOKENIZER_FILES = (
    "tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "spm.model", "tokenizer.model",
    "sentencepiece.bpe.model",
)  # fmt: skip


def pretrained_source(name_or_path: str) -> str:
    """A `text.pretrained` value as transformers should be given it: a local folder's path
    with `~` expanded, else the value (a hub name)."""
    folder = Path(name_or_path).expanduser()
    return str(folder) if name_or_path.startswith("~") or folder.exists() else name_or_path


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerFast:
    """A fast tokenizer from a folder or hub name (fast: character offsets are required); a
    `ConfigError` for a folder that holds none, or one with no word beyond its special tokens."""
    source = pretrained_source(name_or_path)
    folder = Path(source)
    looks_like_path = name_or_path.startswith((".", "/", "~")) or folder.exists()
    if looks_like_path and not folder.is_dir():
        raise ConfigError("model.text.pretrained", f"{name_or_path}: no such folder")
    if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ConfigError(
            "model.text.pretrained",
            f"{name_or_path} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)})",
            hint="save the encoder's tokenizer into the folder: tokenizer.save_pretrained(folder)",
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise ConfigError(
            "model.text.pretrained",
            f"cannot load a tokenizer from {name_or_path!r} ({str(error).splitlines()[0]})",
            hint="give a local folder holding the encoder and its tokenizer, or a hub name in "
            "the local cache",
        ) from error
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(
            "model.text.pretrained",
            f"{name_or_path}: clinfuse needs a fast tokenizer (tokenizer.json): character "
            "offsets map its tokens back to the note",
        )
    if tokenizer.pad_token_id is None:  # notes are padded to a batch, and the explanations'
        # reference note is made of it
        raise ConfigError(
            "model.text.pretrained",
            f"{name_or_path}: its tokenizer has no padding token",
            hint="give it one and save it again: tokenizer.pad_token = '[PAD]' (a token of its "
            "vocabulary); tokenizer.save_pretrained(folder)",
        )
    if len(tokenizer) <= len(set(tokenizer.all_special_ids)):
        raise ConfigError(
            "model.text.pretrained",
            f"{name_or_path}: its tokenizer knows no word beyond its {len(tokenizer)} special "
            "tokens, so every note would be read as unknown tokens",
        )
    return tokenizer


@dataclass
class TokenizedNotes:
    """A batch of notes as encoder input; windows of `max_length` tokens laid side by side."""

    input_ids: torch.Tensor  # (B, K*T) long; K windows of T <= max_length tokens
    attention_mask: torch.Tensor  # (B, K*T) long, 1 = real token
    offsets: torch.Tensor  # (B, K*T, 2) long character span of each token in its note
    note_present: torch.Tensor  # (B,) bool
    truncated: torch.Tensor  # (B,) bool: part of the note did not fit


class NoteTokenizer:
    """Notes (str or None) -> `TokenizedNotes`, honouring the long-note policy of `TextConfig`."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast, cfg: TextConfig) -> None:
        self.tokenizer = tokenizer
        self.max_length = cfg.max_length
        self.windows = cfg.max_chunks if cfg.long_notes == "chunk" else 1
        self.cut = 0  # notes cut so far, reported once as a warning, then at debug level
        self.warned = False

    @property
    def num_tokens(self) -> int:
        return self.windows * self.max_length

    def __call__(self, notes: Sequence[str | None]) -> TokenizedNotes:
        texts = [note or "" for note in notes]
        enc = self.tokenizer(
            texts,
            max_length=self.max_length,
            truncation=True,
            padding="longest",  # to the longest window in the batch, not to max_length
            # (a multiple of 8 where max_length is one: the tokenizer refuses it otherwise)
            pad_to_multiple_of=8 if self.max_length % 8 == 0 else None,
            return_overflowing_tokens=True,
            return_offsets_mapping=True,
        )  # lists of W windows over all notes, each padded to T; overflow_to_sample_mapping
        # says whose. Lists, filled into numpy below: 3x faster than the tokenizer's tensors.
        windows = enc["input_ids"]
        B, K, T = len(texts), self.windows, len(windows[0]) if windows else 0
        input_ids = np.full((B, K, T), self.tokenizer.pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((B, K, T), dtype=np.int64)
        offsets = np.zeros((B, K, T, 2), dtype=np.int64)
        seen = [0] * B
        for w, b in enumerate(enc["overflow_to_sample_mapping"]):
            k = seen[b]
            seen[b] += 1
            if k < K:
                input_ids[b, k] = windows[w]
                attention_mask[b, k] = enc["attention_mask"][w]
                offsets[b, k] = enc["offset_mapping"][w]
        truncated = torch.tensor([n > K for n in seen], dtype=torch.bool)
        if truncated.any():
            self.cut += int(truncated.sum())
            level = logging.DEBUG if self.warned else logging.WARNING
            self.warned = True
            log.log(
                level,
                "notes longer than %d tokens are cut (text.long_notes=%s; %d so far); raise "
                "%s to keep more",
                K * self.max_length,
                "chunk" if K > 1 else "truncate",
                self.cut,
                "text.max_chunks or text.max_length"
                if K > 1
                else "text.max_length or use text.long_notes=chunk",
            )
        present = torch.tensor([bool(t.strip()) for t in texts], dtype=torch.bool)
        return TokenizedNotes(
            input_ids=torch.from_numpy(input_ids).view(B, K * T),
            attention_mask=torch.from_numpy(attention_mask).view(B, K * T) * present[:, None],
            offsets=torch.from_numpy(offsets).view(B, K * T, 2),
            note_present=present,
            truncated=truncated,
        )


def build_text_model(cfg: TextConfig, vocab_size: int, saved: dict[str, Any] | None) -> nn.Module:
    """The transformers encoder: rebuilt from a saved config, loaded from `pretrained`, or new."""
    if saved is not None:  # from a clinfuse checkpoint: architecture here, weights in safetensors
        model = AutoModel.from_config(AutoConfig.for_model(**saved))
    elif cfg.pretrained:
        try:  # safetensors only: a pickled pytorch_model.bin is never unpickled
            model = AutoModel.from_pretrained(
                pretrained_source(cfg.pretrained), use_safetensors=True
            )
        except (OSError, ValueError) as error:
            raise ConfigError(
                "model.text.pretrained",
                f"cannot load a transformers encoder with safetensors weights from "
                f"{cfg.pretrained!r} ({str(error).splitlines()[0]})",
                hint="give a local folder holding config.json and model.safetensors (convert a "
                "pickled checkpoint once with `save_pretrained(folder)`) or a hub name in the "
                "local cache",
            ) from error
    else:
        config = BertConfig(
            vocab_size=vocab_size,
            hidden_size=cfg.hidden,
            num_hidden_layers=cfg.layers,
            num_attention_heads=cfg.heads,
            intermediate_size=cfg.intermediate,
            max_position_embeddings=max(cfg.max_length, 16),
            attention_probs_dropout_prob=0.0,  # dropout on attention weights is slow on CPU
        )
        model = AutoModel.from_config(config)
    if getattr(model, "pooler", None) is not None:
        model.pooler = None  # clinfuse pools the fused tokens itself; an unused pooler breaks DDP
    return model


class TextEncoder(nn.Module):
    """Token ids (B, K*T) and mask -> tokens (B, K*T, D) projected to the fusion width."""

    def __init__(
        self,
        cfg: TextConfig,
        width: int,
        vocab_size: int,
        saved: dict[str, Any] | None = None,
        mask_id: int | None = None,
        special_ids: Sequence[int] = (),
    ) -> None:
        super().__init__()
        self.windows = cfg.max_chunks if cfg.long_notes == "chunk" else 1
        self.token_dropout = cfg.token_dropout if mask_id is not None else 0.0
        self.mask_id = mask_id
        self.register_buffer(
            "special_ids",
            torch.tensor(sorted(set(special_ids)), dtype=torch.long),
            persistent=False,
        )
        self.model = build_text_model(cfg, vocab_size, saved)
        embeddings = getattr(self.model, "embeddings", None)
        # RoBERTa's family numbers positions from its padding id on: that many fewer are usable
        self.padding_idx = getattr(embeddings, "padding_idx", None)
        limit = getattr(self.model.config, "max_position_embeddings", cfg.max_length)
        limit -= 0 if self.padding_idx is None else self.padding_idx + 1
        if cfg.max_length > limit:
            raise ConfigError(
                "model.text.max_length",
                f"{cfg.max_length} tokens exceed the {limit} positions the encoder has",
                hint=f"give model.text.max_length={limit} or less",
            )
        if vocab_size > self.model.config.vocab_size:  # an id past its embedding table
            raise ConfigError(
                "model.text.pretrained",
                f"the tokenizer has {vocab_size} tokens but the encoder embeds "
                f"{self.model.config.vocab_size}: they are not one pair",
                hint="give the folder the encoder was saved in with its own tokenizer",
            )
        self.project = nn.Linear(self.model.config.hidden_size, width)

    @property
    def embeddings(self) -> nn.Module:
        """The token embedding layer (layer integrated gradients attribute over it)."""
        return self.model.get_input_embeddings()

    def drop_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, Nt) ids with a random `token_dropout` share of the real word pieces (not
        padding, [CLS], [SEP]) replaced by the mask token."""
        words = attention_mask.bool() & ~torch.isin(input_ids, self.special_ids)
        drop = words & (torch.rand(input_ids.shape, device=input_ids.device) < self.token_dropout)
        return input_ids.masked_fill(drop, self.mask_id)

    def saved_config(self) -> dict[str, Any]:
        return self.model.config.to_dict()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        B, L = input_ids.shape
        if self.training and self.token_dropout > 0:
            input_ids = self.drop_tokens(input_ids, attention_mask)
        T = L // self.windows
        windows_ids = input_ids.reshape(B * self.windows, T)  # (B*K, T): each window alone
        windows_mask = attention_mask.reshape(B * self.windows, T)
        positions = {}
        if self.padding_idx is not None:  # numbered from the mask, as the model would from the
            # ids: a note and its reference ([PAD] in place of words) read at the same positions
            mask = windows_mask.long()
            positions["position_ids"] = mask.cumsum(1) * mask + self.padding_idx  # (B*K, T)
        hidden = self.model(
            input_ids=windows_ids, attention_mask=windows_mask, **positions
        ).last_hidden_state
        return self.project(hidden.reshape(B, L, -1))  # (B, K*T, D)
