"""Reviews flowing back: the reviewed studies as a training manifest, and how often reviewers
agreed with the model.

Both read the LATEST review event of each study: an event is never changed, a later one
supersedes it. The manifest names patients by the store's pseudonym, never by their id.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd
import sqlalchemy as sa

from clinfuse.atomic import write_atomic
from clinfuse.data.study import header_unreadable
from clinfuse.errors import ClinfuseError, without_path
from clinfuse.review.study import ManifestEntry, entry_note, run_manifest_index
from clinfuse.spreadsheet import formula_safe
from clinfuse.store import Store, StoreError
from clinfuse.store.schema import Review, Study

log = logging.getLogger(__name__)
AGREEMENT_COLUMNS = [
    "label",
    "reviewed",  # studies whose latest review gives this label (1 or 0) and the model scored it
    "agreed",  # ... where the reviewer's label is the model's decision
    "agreement",  # agreed / reviewed
    "false_positives",  # the model said 1, the reviewer 0
    "false_negatives",  # the model said 0, the reviewer 1
]


def latest_reviews(store: Store, run_id: int) -> dict[str, dict[str, Any]]:
    """study_id -> its latest review event (see `Store.reviews`), for the run's reviewed studies."""
    latest: dict[str, dict[str, Any]] = {}
    for event in store.reviews(run_id):  # oldest first: the last one of a study wins
        latest[event["study_id"]] = event
    return latest


def export_reviewed_manifest(store: Store, run_id: int, out_path: str | Path) -> Path:
    """Write the run's reviewed studies as a manifest `clinfuse train` accepts (CSV, or Parquet
    for a .parquet name).

    Columns: study_id, patient_id (the pseudonym), image (the absolute path from the run's
    manifest), note_path, note, split (the run manifest's split cell; where it gave none, the
    patient's split in another of its rows, else the seeded patient-level split of the
    patient's real id with the default `PatientSplit`, as `clinfuse train` gives it by
    default: a split seeded by the pseudonym could part a patient's studies), then one column per
    model label holding the latest review's label (1, 0, or empty = unknown). A study whose
    latest review leaves every label unknown is left out (logged): it would train nothing.
    The note is written inline as the model read it, identifiers masked
    (`entry_note`): the manifest's patient id is replaced by the pseudonym, so the next run
    could not mask it; a note that cannot be read keeps its path, so that run reports it.
    Studies no longer in the run's manifest are left out (logged).
    Written atomically; raises StoreError when the run has no reviewed study and ManifestError
    when the run's manifest is gone or has changed since it was scored.
    """
    run = store.run(run_id)
    labels = list(run["labels"])
    latest = latest_reviews(store, run_id)
    others = other_reviewed_runs(store, run_id, bool(latest))
    if others:  # each run's reviews are exported on their own: none is merged in silently
        log.warning(
            "runs %s also have reviews; this export holds run %d's only (export each with --run)",
            others,
            run_id,
        )
    if Path(out_path).expanduser().resolve() == Path(run["manifest"]).expanduser().resolve():
        raise ClinfuseError(
            f"{out_path}: is the manifest run {run_id} scored; the export would replace it "
            "(and the run's inputs with it). Give --out another file"
        )
    reviewed = sa.select(Review.study_id).where(Review.run_id == run_id).distinct()
    query = (
        sa.select(Study.study_id, Study.patient_pseudonym)
        .where(Study.run_id == run_id, Study.study_id.in_(reviewed))
        .order_by(Study.study_id)
    )
    with store.engine.connect() as conn:
        patients = dict(conn.execute(query).all())
    index = run_manifest_index(run)
    rows, seeded, missing, unknown = [], {}, 0, 0
    for study_id, pseudonym in patients.items():
        if study_id not in latest:  # its first review was saved since: the next export has it
            continue
        entry = index.get(study_id)
        if entry is None:
            missing += 1
            continue
        event = latest[study_id]
        cells = {name: _cell(event, name) for name in labels}
        seeded[study_id] = entry.seeded_split
        if not any(cells.values()):
            unknown += 1
            continue
        rows.append(
            {
                "study_id": study_id,
                "patient_id": pseudonym or f"unknown-{study_id}",  # its own patient group
                "image": str(entry.image or ""),
                **_note_cells(entry),
                "split": entry.split.lower(),
                **cells,
            }
        )
    given = {row["patient_id"]: row["split"] for row in rows if row["split"]}
    for row in rows:  # an empty cell: the patient's given split, else the seeded one
        row["split"] = row["split"] or given.get(row["patient_id"]) or seeded[row["study_id"]]
    if missing:
        log.warning("%d reviewed studies are no longer in %s: left out", missing, run["manifest"])
    if unknown:
        log.warning("%d reviewed studies leave every label unknown: left out", unknown)
    if not rows:  # nothing to train on: an error, as a run without reviews is
        why = [f"{unknown} leave every label unknown"] * bool(unknown) + [
            f"{missing} are no longer in its manifest"
        ] * bool(missing)
        raise StoreError(
            f"run {run_id} has no reviewed study with a known label to export "
            f"({'; '.join(why) or 'none reviewed yet'}): give labels with 'corrected', or "
            "agree with the model's calls"
        )
    columns = ["study_id", "patient_id", "image", "note_path", "note", "split", *labels]
    return write_table(pd.DataFrame(rows, columns=columns), Path(out_path))


def write_table(frame: pd.DataFrame, out: Path, for_people: bool = False) -> Path:
    """Write `frame` to `out` with `write_atomic` (no half-written file): Parquet for a
    .parquet name, else CSV (`for_people`: no cell a spreadsheet would run, `formula_safe`);
    returns `out`."""
    parquet = out.suffix.lower() == ".parquet"
    table = formula_safe(frame) if for_people and not parquet else frame
    data = frame.to_parquet(index=False) if parquet else table.to_csv(index=False).encode()
    write_atomic(out, data)
    return out


def _note_cells(entry: ManifestEntry) -> dict[str, str]:
    """The note and note_path cells: the masked note inline, or (unreadable) its path; not
    inline when the study's image header cannot be read, since the names it may give could
    not be masked (a note file keeps its path, an inline note is left out, with a warning)."""
    if header_unreadable(entry.image):
        kept = "its note_path is exported" if entry.note_path else "its inline note is left out"
        log.warning(
            "study %s: its image's header cannot be read, so the names it may give cannot be "
            "masked in its note: %s (manifest row %d holds it; export again once the image "
            "reads)",
            entry.study_id,
            kept,
            entry.row,
        )
        return {"note_path": str(entry.note_path or ""), "note": ""}
    try:
        note = entry_note(entry)
    except ClinfuseError as exc:
        problem = without_path(exc, f"manifest row {entry.row}'s note")  # a path may name someone
        log.warning("study %s: %s; its note_path is exported as it is", entry.study_id, problem)
        return {"note_path": str(entry.note_path or ""), "note": ""}
    return {"note_path": "", "note": note or ""}


def _cell(event: dict[str, Any], name: str) -> str:
    """A label cell of the latest review: "1", "0" or "" (unknown); a `StoreError` naming the
    event for any other value (written to the store by other means than `save_review`)."""
    value = event["labels_after"].get(name)
    if value is None:
        return ""
    if isinstance(value, (bool, int, float)) and value in (0, 1):
        return str(int(value))
    raise StoreError(
        f"study {event['study_id']}: review event {event['id']} gives label {name!r} the value "
        f"{value!r}, not 1, 0 or unknown; save a new review of the study with its labels"
    )


def other_reviewed_runs(store: Store, run_id: int, reviewed: bool = True) -> str:
    """The other runs of the store that have reviews ("2, 5"); with `reviewed` False (run
    `run_id` has none), a StoreError naming them, for an export that would hold nothing."""
    with store.engine.connect() as conn:
        runs = list(conn.scalars(sa.select(Review.run_id).distinct().order_by(Review.run_id)))
    others = ", ".join(str(r) for r in runs if r != run_id)
    if not reviewed:
        hint = f": runs with reviews: {others} (choose one with --run)" if others else ""
        raise StoreError(f"run {run_id} has no reviewed study to export{hint}")
    return others


def review_agreement(store: Store, run_id: int) -> pd.DataFrame:
    """Per model label, how the latest reviews compare with the model's decisions.

    One row a label (see AGREEMENT_COLUMNS); empty when the run has no review. A label the
    reviewer left unknown, or the model did not score (a failed study), is not counted.
    """
    labels = list(store.run(run_id)["labels"])
    latest = latest_reviews(store, run_id)
    if not latest:
        return pd.DataFrame(columns=AGREEMENT_COLUMNS)
    rows = []
    for name in labels:
        pairs = [
            (int(e["labels_before"][name]), int(e["labels_after"][name]))
            for e in latest.values()
            if e["labels_before"].get(name) is not None and e["labels_after"].get(name) is not None
        ]
        reviewed = len(pairs)
        agreed = sum(model == human for model, human in pairs)
        rows.append(
            {
                "label": name,
                "reviewed": reviewed,
                "agreed": agreed,
                "agreement": agreed / reviewed if reviewed else float("nan"),
                "false_positives": sum(model == 1 and human == 0 for model, human in pairs),
                "false_negatives": sum(model == 0 and human == 1 for model, human in pairs),
            }
        )
    return pd.DataFrame(rows, columns=AGREEMENT_COLUMNS)
