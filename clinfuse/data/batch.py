"""Studies -> typed batches: a `StudyDataset` that never raises, and a `Collator`.

A study whose files cannot be read does not stop a DataLoader: its item carries the failure
(`<side>:<reason>: <message>`), and the collator moves it into `Batch.failures` so the caller
records it. Missing sides are zero tensors with their `*_present` flag off.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch.utils.data import Dataset

from clinfuse.config import ModelConfig
from clinfuse.data.manifest import StudyRow
from clinfuse.data.study import load_study
from clinfuse.data.transforms import build_transforms
from clinfuse.errors import ClinfuseError, DicomError
from clinfuse.model.text_encoder import NoteTokenizer


@dataclass
class Batch:
    """Model inputs for B studies plus what explanations and outputs need."""

    study_ids: list[str]
    image: torch.Tensor  # (B, C, *spatial) float32, zeros where absent
    image_present: torch.Tensor  # (B,) bool
    input_ids: torch.Tensor  # (B, Nt) long
    attention_mask: torch.Tensor  # (B, Nt) long
    note_present: torch.Tensor  # (B,) bool
    offsets: torch.Tensor  # (B, Nt, 2) long, character span of each token in its note
    labels: torch.Tensor  # (B, L) float32, NaN = unknown
    notes: list[str | None]
    original_shapes: list[tuple[int, ...] | None]  # each image's own pixel grid (no channels)
    failures: list[tuple[str, str]] = field(default_factory=list)  # (study_id, reason)

    def __len__(self) -> int:
        return len(self.study_ids)

    def model_inputs(self) -> tuple[torch.Tensor, ...]:
        """The positional arguments of `FusionModel.forward`."""
        return (
            self.image,
            self.input_ids,
            self.attention_mask,
            self.image_present,
            self.note_present,
        )

    def to(self, device: torch.device | str) -> Batch:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if isinstance(value, torch.Tensor):
                moved[name] = value.to(device, non_blocking=True)
        return Batch(**moved)


class StudyDataset(Dataset):
    """Manifest rows -> items; a row that fails to load yields an item with `failure` set."""

    def __init__(self, rows: Sequence[StudyRow], cfg: ModelConfig, train: bool = False) -> None:
        self.rows = list(rows)
        self.transforms = build_transforms(cfg.preprocess, cfg.image.in_channels, train=train)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.rows[index]
        item: dict[str, Any] = {
            "study_id": row.study_id,
            "labels": row.labels,
            "image": None,
            "note": None,
            "original_shape": None,
            "failure": None,
        }
        try:
            sample = load_study(row)
            item["note"] = sample.note
            if sample.image is not None:
                item["original_shape"] = tuple(sample.image.pixels.shape[1:])
                data = self.transforms({"image": sample.image, "path": str(row.image)})
                item["image"] = data["image"]  # (C, *spatial)
            if sample.image is None and sample.note is None:
                item["failure"] = "no_input: the row has neither an image nor a note"
        except ClinfuseError as exc:
            side = "image" if isinstance(exc, DicomError) else "note"
            item["failure"] = f"{side}:{getattr(exc, 'reason', 'error')}: {exc}"
        return item


class Collator:
    """Items -> `Batch`: stack images, tokenize notes, set presence flags, set failures aside."""

    def __init__(self, tokenizer: NoteTokenizer, cfg: ModelConfig) -> None:
        self.tokenizer = tokenizer
        self.image_shape = (cfg.image.in_channels, *cfg.preprocess.spatial_size)

    def __call__(self, items: list[dict[str, Any]]) -> Batch:
        failures = [(it["study_id"], it["failure"]) for it in items if it["failure"]]
        items = [it for it in items if not it["failure"]]
        notes = self.tokenizer([it["note"] for it in items])
        zeros = torch.zeros(self.image_shape)
        image = (
            torch.stack([it["image"] if it["image"] is not None else zeros for it in items])
            if items
            else torch.zeros(0, *self.image_shape)
        )
        labels = (
            torch.stack([torch.as_tensor(it["labels"]) for it in items])
            if items
            else torch.zeros(0, 0)
        )
        return Batch(
            study_ids=[it["study_id"] for it in items],
            image=image,  # (B, C, *spatial)
            image_present=torch.tensor([it["image"] is not None for it in items], dtype=torch.bool),
            input_ids=notes.input_ids,
            attention_mask=notes.attention_mask,
            note_present=notes.note_present,
            offsets=notes.offsets,
            labels=labels.float(),
            notes=[it["note"] for it in items],
            original_shapes=[it["original_shape"] for it in items],
            failures=failures,
        )
