"""Write a study's standards exports into a run folder, each file atomically.

    out_dir/fhir/<study_id>.json   FHIR R4 DiagnosticReport (clinfuse.exports.fhir)
    out_dir/sr/<study_id>.dcm      DICOM Comprehensive SR (clinfuse.exports.sr, needs highdicom)

A file is written to a hidden temporary name beside its target, flushed to disk, then renamed
over the target, so a reader (or a run killed at any moment) sees the old file or the new one,
never half of one. Same inputs and `issued` give byte-identical files, so a resumed run that
writes a study again changes nothing.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING

import pydicom
from pydicom import Dataset
from pydicom.uid import UID

from clinfuse.atomic import write_atomic
from clinfuse.data.dicom import read_header
from clinfuse.data.study import file_stem
from clinfuse.errors import ClinfuseError, DicomError
from clinfuse.exports.fhir import diagnostic_report

if TYPE_CHECKING:
    from clinfuse.store import PredictionRecord

log = logging.getLogger(__name__)
FORMATS = frozenset({"fhir", "sr"})
# a run folder's files named by study: kind -> (folder, suffix)
STUDY_FILES = {
    "explanation": ("explanations", ".npz"),
    "fhir": ("fhir", ".json"),
    "sr": ("sr", ".dcm"),
}


def study_file(run_dir: str | Path, kind: str, study_id: str) -> Path:
    """Where a run folder keeps a study's file of `kind` (`STUDY_FILES`), named by `file_stem`."""
    folder, suffix = STUDY_FILES[kind]
    return Path(run_dir) / folder / f"{file_stem(study_id)}{suffix}"


# What a report needs of an image to reference it.
EVIDENCE_ATTRIBUTES = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


def check_writable(folder: Path) -> None:
    """Make `folder` and write (and remove) a file in it, so a command that writes there at
    the end fails at its start, not after all its work: an `OSError` naming the folder, or a
    `ClinfuseError` when it is a file."""
    if folder.exists() and not folder.is_dir():
        raise ClinfuseError(f"{folder}: is a file, not a folder; choose a folder to write into")
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=folder):
        pass


@contextmanager
def new_folder(folder: Path) -> Iterator[Path]:
    """`check_writable(folder)` for a block that writes there; if the block fails, the folders
    that did not exist before it and are still empty are removed, so a command stopped by bad
    input (a wrong model folder, an unknown study id) leaves no empty output folder behind."""
    made = [path for path in (folder, *folder.parents) if not path.exists()]  # deepest first
    try:
        check_writable(folder)
        yield folder
    except BaseException:
        for path in made:
            try:
                path.rmdir()
            except FileNotFoundError:  # never made: its parent may have been
                continue
            except OSError:  # something was written there: it and its parents are kept
                break
        raise


def check_writable_file(path: Path) -> None:
    """`check_writable` for one file that a command writes at its end: an existing file must
    be writable, a new one's folder must exist and take a file (nothing is created)."""
    if path.is_dir():
        raise ClinfuseError(f"{path}: is a folder; name a file to write")
    if path.exists():
        if not os.access(path, os.W_OK):
            raise PermissionError(errno.EACCES, "cannot be written", str(path))
        return
    if not path.parent.exists():
        raise ClinfuseError(f"{path.parent}: no such folder; create it, or choose another path")
    check_writable(path.parent)  # it exists, so nothing is created


def referable(sources: Sequence[Dataset], study_id: str) -> list[Dataset]:
    """The source headers a report can reference (all of `EVIDENCE_ATTRIBUTES`); a warning names
    the study when some cannot be, and without any the exports stand in a study of their own."""
    kept = [s for s in sources if all(_valid_uid(s, k) for k in EVIDENCE_ATTRIBUTES)]
    if len(kept) < len(sources):
        log.warning(
            "study %s: %d of its %d source DICOM file(s) lack a valid %s, so its exports do not "
            "reference %s",
            study_id,
            len(sources) - len(kept),
            len(sources),
            " or ".join(EVIDENCE_ATTRIBUTES),
            "them" if kept else "the image (they stand in a study of their own)",
        )
    return kept


def _valid_uid(ds: Dataset, keyword: str) -> bool:
    """Whether the header holds `keyword` as a valid UID (non-empty, at most 64 characters of
    digits and dots): a report must not copy an empty or malformed one into its evidence."""
    try:
        # unchecked: pydicom's warning on an invalid UID would quote it (a damaged header's
        # UID can hold the patient's name)
        return UID(str(ds.get(keyword) or ""), validation_mode=pydicom.config.IGNORE).is_valid
    except Exception:
        return False


def read_source(path: Path) -> list[Dataset]:
    """The header(s) of the image a prediction was made from: one file or a series folder."""
    path = Path(path)
    if not path.exists():
        raise DicomError(path, "missing", "the source image named for the export does not exist")
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    headers = []
    for file in files:
        try:
            headers.append(read_header(file))  # as scoring read it: a raw data set too
        except DicomError:
            if not path.is_dir():
                raise
        except OSError as error:
            if not path.is_dir():
                raise DicomError(file, "not_dicom", str(error)) from error
    if not headers:
        raise DicomError(path, "empty_series", "the folder holds no readable DICOM file")
    return headers


def _sr_bytes(
    pred: PredictionRecord,
    labels: Sequence[str],
    sources: Sequence[Dataset],
    issued: datetime,
) -> bytes:
    try:
        from clinfuse.exports.sr import comprehensive_sr
    except ImportError as error:
        raise ClinfuseError(
            f"DICOM SR export needs {error.name or 'highdicom'}: "
            "pip install 'clinfuse[standards]', or leave 'sr' out of the export formats"
        ) from error
    buffer = BytesIO()
    pydicom.dcmwrite(
        buffer,
        comprehensive_sr(pred, labels, sources or None, issued=issued),
        enforce_file_format=True,
    )
    return buffer.getvalue()


def write_study_exports(
    out_dir: str | Path,
    pred: PredictionRecord,
    labels: Sequence[str],
    source_path: Path | None,
    formats: set[str],
    *,
    issued: datetime | None = None,
) -> list[Path]:
    """Write the study's exports in `formats` ('fhir', 'sr') under `out_dir`; returns the paths.

    `source_path` is the study's DICOM file or series folder (None for a study without an
    image). `issued` stamps both files; pass the run's start time so that a rerun writes
    byte-identical files (None means now).
    """
    unknown = set(formats) - FORMATS
    if unknown:
        raise ValueError(
            f"unknown export format(s) {sorted(unknown)}; choose from {sorted(FORMATS)}"
        )
    issued = issued or datetime.now(timezone.utc)
    sources = read_source(source_path) if source_path is not None and formats else []
    sources = referable(sources, pred.study_id)
    study_uid = str(sources[0].StudyInstanceUID) if sources else None
    written = []
    if "fhir" in formats:
        report = diagnostic_report(pred, labels, issued, study_uid)
        path = study_file(out_dir, "fhir", pred.study_id)
        report_bytes = (json.dumps(report, indent=2, ensure_ascii=False) + "\n").encode()
        write_atomic(path, report_bytes, sweep=False)  # swept once a run (`sweep_temporaries`)
        written.append(path)
    if "sr" in formats:
        path = study_file(out_dir, "sr", pred.study_id)
        write_atomic(path, _sr_bytes(pred, labels, sources, issued), sweep=False)
        written.append(path)
    return written
