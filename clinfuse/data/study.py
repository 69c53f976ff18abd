"""One manifest row -> one `Sample`: the single path by which a study's files are read."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from clinfuse.data.dicom import DicomImage, read_dicom
from clinfuse.data.manifest import StudyRow
from clinfuse.data.notes import read_note


def modality_name(image: bool, note: bool) -> str:
    """The sides a study has or a prediction used: "image+note", "image", "note" or ""."""
    return "+".join(side for side, present in (("image", image), ("note", note)) if present)


@dataclass
class Sample:
    """A study ready for preprocessing: either side may be missing, labels NaN = unknown."""

    study_id: str
    image: DicomImage | None
    note: str | None
    labels: np.ndarray  # (L,) float32
    split: str

    @property
    def modalities(self) -> str:
        """Which inputs the study has (see `modality_name`)."""
        return modality_name(self.image is not None, self.note is not None)


def load_study(row: StudyRow) -> Sample:
    """Read a row's image and note; raises `DicomError` or `NoteError` naming the file."""
    image = read_dicom(row.image) if row.image is not None else None
    note = read_note(row.note, row.note_path)
    return Sample(study_id=row.study_id, image=image, note=note, labels=row.labels, split=row.split)
