"""Is this export usable? Per-row verdicts and a summary (`clinfuse validate`).

Every row gets one verdict: `ok` (image and note), `image_only`, `note_only`, or `failed` with
the reason (`<input>:<reason>: <detail>`), and its image's dimensionality (2 for an image, 3 for
a volume). An input the user gave that cannot be read fails the row rather than silently
turning it into a single-modality study.
"""

from __future__ import annotations

import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from clinfuse.data.manifest import (
    SPLITS,
    Manifest,
    PatientSplit,
    StudyRow,
    label_problem,
    listed_rows,
    load_manifest,
    short_rows,
)
from clinfuse.data.study import failure_text, load_study
from clinfuse.errors import ClinfuseError

STATUSES = ("ok", "image_only", "note_only", "failed")
VERDICT_COLUMNS = ("row", "study_id", "split", "status", "reason", "warning", "image_dims")


def check_row(row: StudyRow) -> dict[str, object]:
    """The verdict for one row; never raises for a problem in the row's files."""
    verdict: dict[str, object] = {"row": row.row, "study_id": row.study_id, "split": row.split}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            sample = load_study(row)
        except ClinfuseError as exc:
            return {
                **verdict,
                "status": "failed",
                "reason": failure_text(row, exc),
                "warning": _joined(caught),
            }
    if sample.image is None and sample.note is None:
        status, reason = "failed", "no_input: the row has neither an image nor a note"
    elif sample.image is None:
        status, reason = "note_only", ""
    elif sample.note is None:
        status, reason = "image_only", ""
    else:
        status, reason = "ok", ""
    if sample.image is not None:  # a model takes 2D images or volumes, not both
        verdict["image_dims"] = sample.image.spatial_dims
    said = [_joined(caught)]
    if row.note and row.note_path:  # not at each read: a training epoch would say it again
        said.append("note given inline and as note_path: the inline note is read, the file not")
    if status != "failed" and np.isnan(row.labels).all():
        said.append("all labels unknown (usable for inference, not for training)")
    return {**verdict, "status": status, "reason": reason, "warning": "; ".join(filter(None, said))}


def _joined(caught: list[warnings.WarningMessage]) -> str:
    return "; ".join(str(w.message) for w in caught)


@dataclass
class ValidationReport:
    """Verdicts for every row of a manifest, and what they add up to."""

    manifest: Manifest
    verdicts: pd.DataFrame  # columns VERDICT_COLUMNS, one row per manifest row, manifest order
    short: dict[int, tuple[int, int]] = field(default_factory=dict)  # `short_rows`

    @property
    def usable(self) -> pd.Series:
        return self.verdicts["status"] != "failed"

    @property
    def untrainable(self) -> str:
        """Why `clinfuse train` would refuse this manifest ("" when it would not): it needs
        a usable row with a known label, and usable rows in the train and the val split."""
        usable = self.usable.to_numpy()
        if not (~np.isnan(self.manifest.label_matrix()).all(axis=1) & usable).any():
            return "no usable row with a known label"
        splits = self.verdicts["split"].to_numpy()
        empty = [split for split in ("train", "val") if not (usable & (splits == split)).any()]
        if empty:
            return (
                f"no usable row in the {' or '.join(map(repr, empty))} split; training needs "
                "both (fix the split column, or leave it empty for a seeded patient-level split "
                "with --val and --test shares that leave patients to both)"
            )
        labels = self.manifest.label_matrix()[usable]
        return label_problem(labels, splits[usable], self.manifest.labels)

    @property
    def trainable(self) -> bool:
        return not self.untrainable

    def failures_by_reason(self) -> dict[str, int]:
        failed = self.verdicts.loc[~self.usable, "reason"]
        return failed.str.split(":", n=2).str[:2].str.join(":").value_counts().to_dict()

    def prevalence(self) -> pd.DataFrame:
        """Per split and label: positives / known among usable rows."""
        labels = self.manifest.label_matrix()[self.usable.to_numpy()]
        splits = self.verdicts.loc[self.usable, "split"].to_numpy()
        rows = []
        for split in SPLITS:
            chosen = labels[splits == split]
            for j, name in enumerate(self.manifest.labels):
                known = ~np.isnan(chosen[:, j])
                rows.append(
                    {
                        "split": split,
                        "label": name,
                        "known": int(known.sum()),
                        "positive": int(np.nansum(chosen[:, j])),
                    }
                )
        return pd.DataFrame(rows)

    def image_dims(self) -> dict[int, int]:
        """Rows with a readable image, by its dimensionality: {2: images, 3: volumes}."""
        counts = self.verdicts["image_dims"].dropna().value_counts().sort_index()
        return {int(d): int(n) for d, n in counts.items()}

    def summary(self) -> dict[str, object]:
        counts = self.verdicts["status"].value_counts()
        return {
            "rows": len(self.verdicts),
            "image_dims": self.image_dims(),
            "usable": int(self.usable.sum()),
            **{status: int(counts.get(status, 0)) for status in STATUSES},
            "failed_by_reason": self.failures_by_reason(),
            "split_rows": self.verdicts.loc[self.usable, "split"].value_counts().to_dict(),
            "trainable": self.trainable,
        }

    def format_summary(self) -> str:
        """The summary as a person reads it on a terminal."""
        s = self.summary()
        lines = [
            f"manifest: {self.manifest.path}",
            f"rows: {s['rows']}  usable: {s['usable']}  (image+note {s['ok']}, "
            f"image only {s['image_only']}, note only {s['note_only']})  failed: {s['failed']}",
        ]
        lines += [f"  failed {reason}: {n}" for reason, n in s["failed_by_reason"].items()]
        if self.short:
            lines.append(
                f"rows with fewer cells than the header: {len(self.short)} "
                f"(rows {listed_rows(self.short)}); "
                "their missing cells read as empty (labels unknown): see their warnings"
            )
        dims = s["image_dims"]
        if len(dims) > 1:
            lines.append(
                f"images: {dims.get(2, 0)} 2D, {dims.get(3, 0)} volumes (3D). A model takes one "
                "kind (model.image.spatial_dims); the other kind's rows fail with "
                "image:wrong_dimensions: split the manifest into one per kind"
            )
        table = self.prevalence()
        table["prevalence"] = (table["positive"] / table["known"].where(table["known"] > 0)).round(
            3
        )
        wide = table.pivot(index="label", columns="split", values="prevalence")
        wide = wide.reindex(index=list(self.manifest.labels), columns=list(SPLITS))
        usable_per_split = ", ".join(f"{k} {s['split_rows'].get(k, 0)}" for k in SPLITS)
        lines += [
            f"usable rows per split: {usable_per_split}",
            "label prevalence (positive / known) per split:",
            wide.to_string(na_rep="-"),
        ]
        lines.append("trainable: yes" if s["trainable"] else f"trainable: NO ({self.untrainable})")
        return "\n".join(lines)


def validate_manifest(
    path: str | Path,
    labels: list[str] | None = None,
    split: PatientSplit | None = None,
    workers: int = 1,
) -> ValidationReport:
    """Check every row of a manifest; raises `ManifestError` only for structural problems."""
    manifest = load_manifest(path, labels=labels, split=split, warn_short_rows=False)
    rows = list(manifest.rows())
    if workers > 1 and len(rows) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            verdicts = list(pool.map(check_row, rows, chunksize=max(1, len(rows) // (8 * workers))))
    else:
        verdicts = [check_row(row) for row in rows]
    table = pd.DataFrame(verdicts, columns=list(VERDICT_COLUMNS))
    short = short_rows(path)
    notes = table["row"].map(
        {
            row: f"the row has {cells} of the header's {width} cells; the missing ones are empty"
            for row, (cells, width) in short.items()
        }
    )
    table["warning"] = [
        "; ".join(filter(None, (w, n))) if isinstance(n, str) else w
        for w, n in zip(table["warning"], notes, strict=True)
    ]
    table["image_dims"] = table["image_dims"].astype("Int64")  # empty without a readable image
    return ValidationReport(manifest, table, short)
