"""One manifest row -> one `Sample`: the single path by which a study's files are read."""

from __future__ import annotations

import hashlib
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from clinfuse.data.dicom import DicomImage, read_dicom, read_header
from clinfuse.data.identifiers import Identifiers, header_identifiers, redact
from clinfuse.data.manifest import StudyRow
from clinfuse.data.notes import read_note
from clinfuse.errors import ClinfuseError, DicomError, ImageWarning, without_path

_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def file_stem(study_id: str) -> str:
    """A file name stem for a study's own files (explanations, FHIR, SR): the id itself when it
    is safe as a name, else its safe characters (at most 80) and a hash of the whole id, so an
    id such as "../x", "2024/00123" or 300 characters long stays one file inside its folder."""
    if _SAFE_NAME.fullmatch(study_id):
        return study_id
    digest = hashlib.sha256(study_id.encode("utf-8")).hexdigest()[:12]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", study_id).strip("._")[:80]
    return f"{stem}-{digest}" if stem else digest


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
    """Read a row's image and note, the note with the study's own identifiers masked
    (`study_identifiers`); raises `DicomError` or `NoteError` naming the file."""
    image = None
    if row.image is not None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ImageWarning)  # each study's, not once a process
            image = read_dicom(row.image)
        for said in caught:  # named by the row: a folder name may hold the patient's name
            text = str(said.message).replace(str(row.image), f"manifest row {row.row}'s image")
            if said.category is ImageWarning:
                text = f"manifest row {row.row}'s image: {text}"
            warnings.warn(text, said.category, stacklevel=2)
    note = study_note(row, image)
    return Sample(study_id=row.study_id, image=image, note=note, labels=row.labels, split=row.split)


def study_note(row: StudyRow, image: DicomImage | None = None) -> str | None:
    """The row's note (`read_note`; a repair names the manifest row, not the file), with the
    study's own identifiers masked (`study_identifiers`: of `image` once read, else of the
    header of the row's image file). What the tokenizer, the model and explanations read."""
    return masked_note(
        row.row, row.note, row.note_path, image or row.image, Identifiers.of_ids(row.patient_id)
    )


def masked_note(
    row: int,
    text: str | None,
    path: Path | None,
    image: DicomImage | Path | None,
    identifiers: Identifiers,
) -> str | None:
    """Manifest row `row`'s note (inline `text` or the file at `path`), its repairs named by
    the row, masked with `identifiers` and those of `image` (`study_identifiers`)."""
    note = read_note(text, path, source=f"manifest row {row}'s note")
    if not note:
        return note
    return redact(note, study_identifiers(image) | identifiers)


def failure_text(row: StudyRow, exc: ClinfuseError) -> str:
    """Why a row cannot be read, as `<side>:<reason>: manifest row N's <side>: <detail>`, never
    its file's path (`without_path`; the row leads to the file): what validate, train,
    evaluate and infer record."""
    side = "image" if isinstance(exc, DicomError) else "note"
    what = f"manifest row {row.row}'s {side}"
    return f"{side}:{without_path(exc, what)}"


def study_identifiers(
    image: DicomImage | Path | None, patient_id: str | None = None
) -> Identifiers:
    """What a study's note must not show (`clinfuse.data.identifiers`): the patient id of its
    manifest row and the names, ids and birth date of its image's header (read from the header
    alone when `image` is a path: every file of a series folder but hidden ones, as
    `read_dicom` reads them; none from a file that cannot be read, which reading the image
    reports)."""
    found = Identifiers.of_ids(patient_id)
    if isinstance(image, DicomImage):
        return found | image.identifiers
    if image is not None:
        for header in _image_headers(image):
            found |= header_identifiers(header)
    return found


def header_unreadable(image: Path | None) -> bool:
    """True when a row names an image none of whose headers can be read: the names, ids and
    birth date such a header may give cannot mask the study's note (`study_identifiers`)."""
    return image is not None and next(_image_headers(image), None) is None


def _image_headers(image: Path) -> Iterator[Dataset]:
    """The readable headers of an image path's files (a series folder: every file but hidden
    ones, as `read_dicom` reads them), read one at a time."""
    try:
        files = [image]
        if image.is_dir():
            files = sorted(f for f in image.iterdir() if not f.name.startswith("."))
    except OSError:
        files = []
    for file in files:
        try:
            yield read_header(file)
        except (DicomError, OSError):
            continue
