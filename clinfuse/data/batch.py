"""Studies -> typed batches: a `StudyDataset` that never raises, and a `Collator`.

A study whose files cannot be read does not stop a DataLoader: its item carries the failure
(`<side>:<reason>: <message>`), and the collator moves it into `Batch.failures` so the caller
records it. Missing sides are zero tensors with their `*_present` flag off.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from clinfuse.config import ModelConfig
from clinfuse.data.manifest import StudyRow
from clinfuse.data.study import failure_text, load_study
from clinfuse.data.transforms import Preprocess, build_transforms
from clinfuse.errors import ClinfuseError
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
    patient_ids: dict[str, str] = field(default_factory=dict)  # study_id -> patient_id, failed too
    image_paths: dict[str, str] = field(default_factory=dict)  # study_id -> DICOM path, failed too
    note_truncated: torch.Tensor | None = None  # (B,) bool: part of the note did not fit

    def select(self, indices: Sequence[int]) -> Batch:
        """The sub-batch of these studies (failures, patients and paths are not carried)."""
        index = torch.as_tensor(list(indices), dtype=torch.long)
        chosen = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                chosen[f.name] = value[index]
            elif isinstance(value, list) and f.name != "failures":
                chosen[f.name] = [value[i] for i in indices]
        return Batch(**chosen)

    def __len__(self) -> int:
        return len(self.study_ids)

    def __reduce__(self) -> tuple[Any, tuple[dict[str, Any]]]:
        """Pickle tensors as numpy arrays, so a batch leaving a DataLoader worker travels inside
        the pipe. As tensors, each would pass as a shared-memory handle fetched from the worker's
        resource-sharer thread, a round trip that waits for the worker's GIL while it decodes
        the next batch (measured: ~a quarter of a CPU run's time)."""
        state = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                state[name] = value.detach().cpu().numpy()
        return (_batch_from_state, (state,))

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


def _batch_from_state(state: dict[str, Any]) -> Batch:
    """Unpickle a `Batch`: its numpy arrays become tensors again."""
    return Batch(
        **{k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in state.items()}
    )


class StudyDataset(Dataset):
    """Manifest rows -> items; a row that fails to load yields an item with `failure` set.

    With `cache=True` each study is decoded and fitted once, then kept in this process's
    memory (one (C, *spatial_size) float32 image per study); later reads only augment and
    normalise it. Items are the same with and without the cache. With DataLoader workers each
    worker keeps its own copy for the life of the loader.

    With `seed` (training), a study's random augmentation is drawn from (seed, `epoch`, its
    index) alone: the same whatever the number of workers, the process that reads it, or where
    an interrupted run resumed. Set `epoch` before each epoch's loader is made.
    """

    def __init__(
        self,
        rows: Sequence[StudyRow],
        cfg: ModelConfig,
        train: bool = False,
        cache: bool = False,
        seed: int | None = None,
    ) -> None:
        self.rows = list(rows)
        self.transforms = build_transforms(cfg.preprocess, cfg.image.in_channels, train=train)
        self.cache: dict[int, dict[str, Any]] | None = {} if cache else None
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self.seed is not None and self.transforms.augment is not None:
            self.transforms.set_random_state(derived_seed(self.seed, self.epoch, index))
        if self.cache is None:
            return load_item(self.rows[index], self.transforms)
        fitted = self.cache.get(index)
        if fitted is None:
            fitted = self.cache[index] = load_item(self.rows[index], self.transforms, finish=False)
        return finish_item(fitted, self.transforms)


def derived_seed(*keys: int) -> int:
    """A 32-bit seed drawn from a tuple of non-negative integers (numpy's `SeedSequence`):
    independent streams for, say, (seed, epoch, index) or (seed, rank, step)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


def load_item(row: StudyRow, transforms: Preprocess, finish: bool = True) -> dict[str, Any]:
    """One row -> a collatable item; a row that cannot be read carries its `failure`.

    `finish=False` stops after the fixed stage of the transforms (see `finish_item`).
    """
    item: dict[str, Any] = {
        "study_id": row.study_id,
        "patient_id": row.patient_id,
        "labels": row.labels,
        "image": None,
        "note": None,
        "original_shape": None,
        "failure": None,
        "image_path": str(row.image) if row.image is not None else "",
    }
    try:
        sample = load_study(row)
        item["note"] = sample.note
        if sample.image is not None:
            item["original_shape"] = tuple(sample.image.pixels.shape[1:])
            data = transforms.run_fit({"image": sample.image, "path": str(row.image)})
            item["image"] = data["image"]  # (C, *spatial) in [0, 1]
        if sample.image is None and sample.note is None:
            item["failure"] = "no_input: the row has neither an image nor a note"
    except ClinfuseError as exc:
        item["failure"] = failure_text(row, exc)
    return finish_item(item, transforms) if finish else item


def finish_item(item: dict[str, Any], transforms: Preprocess) -> dict[str, Any]:
    """A fitted item -> a new item whose image is the model input; `item` is not changed."""
    if item["image"] is None:
        return item
    return {**item, "image": transforms.run_finish({"image": item["image"]})["image"]}


class Collator:
    """Items -> `Batch`: stack images, tokenize notes, set presence flags, set failures aside."""

    def __init__(self, tokenizer: NoteTokenizer, cfg: ModelConfig) -> None:
        self.tokenizer = tokenizer
        self.image_shape = (cfg.image.in_channels, *cfg.preprocess.spatial_size)

    def __call__(self, items: list[dict[str, Any]]) -> Batch:
        patient_ids = {it["study_id"]: it["patient_id"] for it in items}
        image_paths = {it["study_id"]: it["image_path"] for it in items}
        failures = [(it["study_id"], it["failure"]) for it in items if it["failure"]]
        items = [it for it in items if not it["failure"]]
        # an all-failed batch still tokenizes one empty note, then keeps none of it
        notes = self.tokenizer([it["note"] for it in items] or [None])
        n = len(items)
        zeros = torch.zeros(self.image_shape)
        image = torch.stack(
            [it["image"] if it["image"] is not None else zeros for it in items] or [zeros]
        )[:n]  # (B, C, *spatial)
        labels = (
            torch.from_numpy(np.stack([it["labels"] for it in items]))  # a copy: the rows'
            # label arrays may be read-only views of the manifest's table
            if items
            else torch.zeros(0, 0)
        )
        return Batch(
            study_ids=[it["study_id"] for it in items],
            image=image,  # (B, C, *spatial)
            image_present=torch.tensor([it["image"] is not None for it in items], dtype=torch.bool),
            input_ids=notes.input_ids[:n],
            attention_mask=notes.attention_mask[:n],
            note_present=notes.note_present[:n],
            offsets=notes.offsets[:n],
            note_truncated=notes.truncated[:n],
            labels=labels.float(),
            notes=[it["note"] for it in items],
            original_shapes=[it["original_shape"] for it in items],
            failures=failures,
            patient_ids=patient_ids,
            image_paths=image_paths,
        )
