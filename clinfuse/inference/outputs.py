"""Run exports: `predictions.parquet`, `predictions.csv`, `failures.csv`, written from the store.

Every file is written to a temporary name first, then they are renamed into place one after
another: an interrupted or failed write never leaves a corrupt file behind, and a table that
cannot be written leaves the three as they were. The store stays the source of truth and a
rerun rewrites them. The Parquet file's metadata says what the scores are (`NOTICE`); every
row names its model version.
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import BinaryIO

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from clinfuse.atomic import open_temporary, sweep_temporaries
from clinfuse.exports.files import check_writable_file
from clinfuse.model.checkpoint import NOTICE
from clinfuse.spreadsheet import formula_safe
from clinfuse.store import Store

EXPORTS = ("predictions.parquet", "predictions.csv", "failures.csv")


def check_exports(run_dir: Path) -> None:
    """Before any study is scored: each export of `run_dir` can be written (a folder in its
    place, or a read-only file, is an error naming it, not a failure after the whole run)."""
    for name in EXPORTS:
        check_writable_file(run_dir / name)


def _typed(frame: pd.DataFrame) -> pd.DataFrame:
    """Stable column types whatever a chunk holds (failed rows have no probabilities)."""
    frame = frame.copy()
    for column in frame.columns:
        if column.startswith("p_"):
            frame[column] = frame[column].astype("float64")
        elif column.startswith("decision_"):
            frame[column] = frame[column].astype("boolean")
        else:
            frame[column] = frame[column].astype("string")
    return frame


def write_exports(store: Store, run_id: int, run_dir: Path) -> list[Path]:
    """Write the run's tables into `run_dir`; returns the paths written. Each goes to a
    temporary created for it (`open_temporary`: never a file or link already there, which a
    fixed name would have let anyone who can write the folder aim elsewhere), is flushed to
    disk, and only then renamed into place: after a crash the reader finds the old file or the
    whole new one."""
    paths = [run_dir / name for name in EXPORTS]
    for name in EXPORTS:  # what a killed earlier run was writing
        sweep_temporaries(run_dir, name)
    temporaries: list[Path] = []
    handles: list[BinaryIO] = []
    csv_text, writer = None, None
    try:
        for path in paths:  # each opened inside the try: one that fails leaves none behind
            tmp, handle = open_temporary(path)
            temporaries.append(tmp)
            handles.append(handle)
        parquet_file, csv_file, failures_file = handles
        csv_text = io.TextIOWrapper(csv_file, encoding="utf-8", newline="")
        for i, chunk in enumerate(store.iter_predictions(run_id)):
            chunk = _typed(chunk)
            table = pa.Table.from_pandas(chunk, preserve_index=False)
            if writer is None:
                writer = pq.ParquetWriter(parquet_file, _described(table.schema))
            writer.write_table(table.cast(writer.schema))
            formula_safe(chunk).to_csv(csv_text, header=i == 0, index=False)
        if writer is None:  # an empty run still gets (empty) files
            empty = pd.DataFrame(columns=["study_id", "status"])
            table = pa.Table.from_pandas(empty, preserve_index=False)
            pq.write_table(table.cast(_described(table.schema)), parquet_file)
            empty.to_csv(csv_text, index=False)
        else:
            writer.close()
            writer = None
        csv_text.detach()  # flushed; the handle is closed below, with the others
        failures = formula_safe(store.failures(run_id)).to_csv(index=False)
        failures_file.write(failures.encode("utf-8"))
        for handle in handles:
            handle.flush()
            os.fsync(handle.fileno())
            handle.close()
        for tmp, path in zip(temporaries, paths, strict=True):
            tmp.replace(path)
    finally:
        if writer is not None:
            writer.close()
        with contextlib.suppress(ValueError, AttributeError):  # detached already, or never made
            csv_text.detach()
        for handle in handles:
            handle.close()
        for tmp in temporaries:
            tmp.unlink(missing_ok=True)
    return paths


def _described(schema: pa.Schema) -> pa.Schema:
    """`schema` with clinfuse's notice in its metadata (each row names its model version)."""
    return schema.with_metadata({**(schema.metadata or {}), b"clinfuse.notice": NOTICE.encode()})
