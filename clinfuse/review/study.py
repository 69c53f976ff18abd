"""One study under review: what the model said and why (`study_view`), the study's image and
note found through the run's manifest (`manifest_index`), and the reviewer's verdict saved as
an append-only event (`save_review`).

Nothing returned here names a patient: the store holds pseudonyms, and the manifest index
keeps no patient id.
"""

from __future__ import annotations

import functools
import numbers
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa

from clinfuse.data.identifiers import Identifiers
from clinfuse.data.manifest import PatientSplit, file_sha256, read_chunks
from clinfuse.data.study import masked_note
from clinfuse.errors import ClinfuseError, ManifestError, without_path
from clinfuse.store import ReviewEvent, Store, StoreError
from clinfuse.store.schema import Failure, Prediction, Study


@dataclass(frozen=True)
class ManifestEntry:
    """Where a study's inputs are: absolute paths and any inline note (the patient id only
    among the identifiers its note is masked with)."""

    row: int  # 1-based data row of the manifest
    study_id: str
    image: Path | None
    note: str | None  # inline note text
    note_path: Path | None
    identifiers: Identifiers = field(default=Identifiers(), repr=False, compare=False)
    split: str = ""  # the manifest's split cell, "" when it gives none
    # where the split cell is empty: the default seeded split of the patient's real id (the id
    # itself is not kept), the split `clinfuse train` would give the study
    seeded_split: str = ""


@dataclass
class StudyView:
    """Everything the study page shows; `failure` is (reason, detail) for a failed study."""

    run_id: int
    study_id: str
    status: str  # 'predicted' | 'failed'
    patient_pseudonym: str
    modalities: str
    model_version: str
    labels: list[dict[str, Any]]  # {label, probability, threshold, decision}, model label order
    explanation: dict[str, Any] | None  # Explanation.to_record(), when stored
    explanation_path: str | None  # its full .npz (Explanation.load_npz)
    image_path: Path | None
    note: str | None
    failure: tuple[str, str] | None
    history: list[dict[str, Any]] = field(default_factory=list)  # review events, oldest first
    source_error: str | None = None  # why the image or note could not be located or read


def manifest_index(manifest_path: str | Path) -> Mapping[str, ManifestEntry]:
    """study_id -> `ManifestEntry` of a manifest (read-only), cached until the file changes."""
    return _indexed(manifest_path)[0]


def run_manifest_index(run: Mapping[str, Any]) -> Mapping[str, ManifestEntry]:
    """`manifest_index` of the manifest a run scored (`Store.run`), refusing one that is gone or
    has changed since: its rows could now point a study at another study's image and note, and
    a reviewer would see them beside this study's scores."""
    manifest = run["manifest"]
    try:
        entries, sha256 = _indexed(manifest)
    except OSError as exc:
        raise ManifestError(
            manifest,
            f"the manifest run {run['id']} scored cannot be read ({exc.strerror or exc})",
            hint="restore it at this path (the store keeps its path, not its rows)",
        ) from exc
    if sha256 != run["manifest_sha256"]:
        raise ManifestError(
            manifest,
            f"has changed since run {run['id']} scored it, so its rows may now name other files",
            hint="restore the manifest the run scored, or run `clinfuse infer` on the new one",
        )
    return entries


def _indexed(manifest_path: str | Path) -> tuple[Mapping[str, ManifestEntry], str]:
    # absolute, not resolved: a manifest reached through a link reads its rows' paths from
    # the link's folder, as `clinfuse infer` read them (`Manifest.root`)
    path = Path(manifest_path).expanduser().absolute()
    stat = path.stat()
    return _index(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _index(path: str, mtime_ns: int, size: int) -> tuple[Mapping[str, ManifestEntry], str]:
    root, entries, row = Path(path).parent, {}, 0
    for chunk in read_chunks(path):
        for record in chunk.to_dict("records"):  # every cell is text, "" when empty
            row += 1
            cell = {name: str(value) for name, value in record.items()}
            study_id = cell.get("study_id", "")
            if not study_id or study_id in entries:
                continue  # the run refused such a manifest; keep the first row
            image, note_path = cell.get("image", ""), cell.get("note_path", "")
            entries[study_id] = ManifestEntry(
                row=row,
                study_id=study_id,
                image=root / image if image else None,
                note=cell.get("note") or None,
                note_path=root / note_path if note_path else None,
                identifiers=Identifiers.of_ids(cell.get("patient_id")),
                split=cell.get("split", ""),
                seeded_split=PatientSplit().assign(cell.get("patient_id", "")),
            )
    return MappingProxyType(entries), file_sha256(Path(path))


def study_view(store: Store, run_id: int, study_id: str) -> StudyView:
    """The study's scores against thresholds, explanation, inputs, failure and review history."""
    run = store.run(run_id)
    with store.engine.connect() as conn:
        study = (
            conn.execute(
                sa.select(Study.status, Study.patient_pseudonym, Study.modalities).where(
                    Study.run_id == run_id, Study.study_id == study_id
                )
            )
            .mappings()
            .first()
        )
        if study is None:
            raise StoreError(f"run {run_id} has no study {study_id!r}")
        scores = {
            row.label: row
            for row in conn.execute(
                sa.select(
                    Prediction.label,
                    Prediction.probability,
                    Prediction.threshold,
                    Prediction.decision,
                ).where(Prediction.run_id == run_id, Prediction.study_id == study_id)
            )
        }
        failed = conn.execute(
            sa.select(Failure.reason, Failure.detail).where(
                Failure.run_id == run_id, Failure.study_id == study_id
            )
        ).first()
    labels = [
        dict(
            label=name,
            probability=float(scores[name].probability),
            threshold=float(scores[name].threshold),
            decision=bool(scores[name].decision),
        )
        for name in run["labels"]
        if name in scores
    ]
    explanation = store.explanation(run_id, study_id)
    image, note, problem = _inputs(run, study_id)
    return StudyView(
        run_id=run_id,
        study_id=study_id,
        status=study["status"],
        patient_pseudonym=study["patient_pseudonym"],
        modalities=study["modalities"],
        model_version=run["model_version"],
        labels=labels,
        explanation=None if explanation is None else explanation["record"],
        explanation_path=None if explanation is None else explanation["path"],
        image_path=image,
        note=note,
        failure=None if failed is None else (failed.reason, failed.detail),
        history=store.reviews(run_id, study_id),
        source_error=problem,
    )


def _inputs(run: Mapping[str, Any], study_id: str) -> tuple[Path | None, str | None, str | None]:
    """(image path, note text, problem) of a study, through the run's manifest."""
    try:
        entry = run_manifest_index(run).get(study_id)
    except ClinfuseError as exc:
        return None, None, str(exc)
    if entry is None:
        return (
            None,
            None,
            f"study {study_id!r} is no longer in the run's manifest {run['manifest']}",
        )
    try:
        with warnings.catch_warnings():  # a repaired note is still shown
            warnings.simplefilter("ignore")
            note = entry_note(entry)
    except ClinfuseError as exc:  # never the note's path: it may hold a patient's name
        return entry.image, None, without_path(exc, f"manifest row {entry.row}'s note")
    return entry.image, note, None


def entry_note(entry: ManifestEntry) -> str | None:
    """The study's note masked as the model read it (`study_note`): the manifest's patient
    id and its image's identifiers. Raises NoteError where the note cannot be read."""
    return masked_note(entry.row, entry.note, entry.note_path, entry.image, entry.identifiers)


def save_review(
    store: Store,
    run_id: int,
    study_id: str,
    reviewer: str,
    verdict: str,
    labels_after: Mapping[str, int | bool | None],
    comment: str = "",
) -> int:
    """Append a review event (never overwriting one); returns its id.

    labels_before = the model's decisions for the study. labels_after holds 1, 0 or None
    (unknown) per model label; a label left out is the model's decision with 'agree', the
    study's current label with 'corrected' (the reviewer changed the labels given; current:
    the latest review's, else the model's decision, so a revision keeps earlier corrections)
    and unknown with 'disagree'. 'agree' with labels that differ from the model's, or on a
    study the model did not score (it failed), is refused, and so are 'corrected' and
    'disagree' with none that differ from the model's (unknown differs).
    """
    reviewer, comment = str(reviewer).strip(), str(comment or "").strip()
    ReviewEvent(run_id, study_id, reviewer, verdict, comment=comment).check()  # before any query
    run = store.run(run_id)
    labels = list(run["labels"])
    unknown = sorted(set(labels_after) - set(labels))
    if unknown:
        raise ValueError(f"labels {unknown} are not the run's labels {labels}")
    with store.engine.connect() as conn:
        decisions = dict(
            conn.execute(
                sa.select(Prediction.label, Prediction.decision).where(
                    Prediction.run_id == run_id, Prediction.study_id == study_id
                )
            ).all()
        )
    before = {name: int(bool(decisions[name])) for name in labels if name in decisions}
    current = current_labels(store.reviews(run_id, study_id), before)
    left_out = {"agree": before, "corrected": current}
    after = {}
    for name in labels:
        if name in labels_after:
            after[name] = _label_value(name, labels_after[name])
        else:
            after[name] = left_out.get(verdict, {}).get(name)
    changed = any(after[n] != before.get(n) for n in labels)
    if verdict == "agree" and not before:
        raise ValueError(
            f"study {study_id!r} was not scored (it failed): there is no call to agree with; "
            "give its labels with 'corrected'"
        )
    if verdict == "agree" and changed:
        raise ValueError(
            "verdict 'agree' with labels that differ from the model's: use 'corrected'"
        )
    if verdict == "corrected" and not changed:
        raise ValueError("verdict 'corrected' needs at least one label changed from the model's")
    if verdict == "disagree" and before and not changed:  # it would train on what it rejects
        raise ValueError(
            "verdict 'disagree' with every label as the model called it: change the labels you "
            "disagree with, or set them to unknown"
        )
    event = ReviewEvent(
        run_id=run_id,
        study_id=study_id,
        reviewer=reviewer,
        verdict=verdict,
        labels_before=before,
        labels_after=after,
        comment=comment,
        model_version=run["model_version"],
    )
    return store.add_review(event)


def current_labels(
    history: list[dict[str, Any]], called: Mapping[str, int | None]
) -> dict[str, int | None]:
    """A study's labels as they stand: its latest review's `labels_after` (`history`: its
    review events, oldest first), else the model's decisions `called`. What a revision starts
    from."""
    return dict(history[-1]["labels_after"]) if history else dict(called)


def _label_value(name: str, value: Any) -> int | None:
    """1, 0 or None (unknown) from 1/0/True/False/1.0/0.0, numpy's and pandas' too, and None,
    NaN or pandas' NA for unknown: a column read with pandas saves as it reads."""
    if value is None or value is pd.NA or (isinstance(value, numbers.Real) and value != value):
        return None
    if isinstance(value, (numbers.Real, np.bool_)) and value in (0, 1):
        return int(value)
    raise ValueError(f"label {name!r}: {value!r} is not 1, 0 or None (unknown)")
