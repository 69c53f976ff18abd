"""Run exports: `predictions.parquet`, `predictions.csv`, `failures.csv`, written from the store.

Each file is written to a temporary name and renamed into place, so an interrupted write never
leaves a corrupt file behind; the store stays the source of truth and a rerun rewrites them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from clinfuse.store import Store


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


def _commit(tmp: Path, path: Path) -> None:
    """Flush `tmp` to disk, then rename it over `path`: after a crash or a power cut the reader
    finds the old file or the whole new one, never a renamed file whose data was not written."""
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    tmp.replace(path)


def write_exports(store: Store, run_id: int, run_dir: Path) -> list[Path]:
    """Write the run's tables into `run_dir`; returns the paths written."""
    parquet, csv = run_dir / "predictions.parquet", run_dir / "predictions.csv"
    parquet_tmp, csv_tmp = run_dir / ".predictions.parquet.tmp", run_dir / ".predictions.csv.tmp"
    writer = None
    try:
        for i, chunk in enumerate(store.iter_predictions(run_id)):
            chunk = _typed(chunk)
            table = pa.Table.from_pandas(chunk, preserve_index=False)
            if writer is None:
                writer = pq.ParquetWriter(parquet_tmp, table.schema)
            writer.write_table(table.cast(writer.schema))
            chunk.to_csv(csv_tmp, mode="w" if i == 0 else "a", header=i == 0, index=False)
    finally:
        if writer is not None:
            writer.close()
    if writer is None:  # an empty run still gets (empty) files
        pd.DataFrame(columns=["study_id", "status"]).to_parquet(parquet_tmp)
        pd.DataFrame(columns=["study_id", "status"]).to_csv(csv_tmp, index=False)
    _commit(parquet_tmp, parquet)
    _commit(csv_tmp, csv)
    failures, failures_tmp = run_dir / "failures.csv", run_dir / ".failures.csv.tmp"
    store.failures(run_id).to_csv(failures_tmp, index=False)
    _commit(failures_tmp, failures)
    return [parquet, csv, failures]
