"""The manifest: the one input contract (DESIGN.md, "The manifest").

A CSV, Parquet or JSONL table, one row a study; paths relative to the manifest's folder.
`load_manifest` checks the whole structure up front and raises one `ManifestError` naming the
row and column of the first problem; per-file problems (a corrupt DICOM, an unreadable note)
are not structural and are found later, study by study, by `validate` or the pipelines.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from clinfuse.errors import ManifestError

RESERVED = ("study_id", "patient_id", "image", "note", "note_path", "split")
SPLITS = ("train", "val", "test")
INPUT_COLUMNS = ("image", "note", "note_path")
_TRUE = {"1", "1.0", "1,0", "true"}  # "1,0": a decimal-comma locale's spreadsheet
_FALSE = {"0", "0.0", "0,0", "false"}
# 1 or 0 as spreadsheets write them: any zeros after a decimal point, one or two after a
# decimal comma ("1,000" is a thousand where the comma groups digits)
_ONE, _ZERO = r"\+?1(?:\.0*|,0{1,2})?", r"[+-]?0(?:\.0*|,0{1,2})?"
_SUFFIXES = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl"}
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PatientSplit:
    """A seeded patient-level split: every study of a patient lands in the same split.

    The split of a patient depends only on (seed, patient_id), so adding rows to a manifest
    never moves an existing patient to another split.
    """

    val: float = 0.15
    test: float = 0.15
    seed: int = 0

    def assign(self, patient_id: str) -> str:
        digest = hashlib.sha256(f"{self.seed}:{patient_id}".encode()).hexdigest()
        u = int(digest[:16], 16) / 2**64  # uniform in [0, 1)
        if u < self.test:
            return "test"
        return "val" if u < self.test + self.val else "train"


@dataclass(frozen=True)
class StudyRow:
    """One manifest row, resolved: absolute paths, a split, labels as float (NaN = unknown)."""

    row: int  # 1-based data row, as a spreadsheet numbers it below the header
    study_id: str
    patient_id: str
    image: Path | None
    note: str | None
    note_path: Path | None
    split: str
    labels: np.ndarray  # (L,) float32: 1.0, 0.0 or NaN


@dataclass
class Manifest:
    """A checked manifest: the normalised table plus where it lives and which labels it has."""

    path: Path
    labels: tuple[str, ...]
    table: pd.DataFrame  # one row a study; every cell a str ("" = empty); labels as float columns

    @property
    def root(self) -> Path:
        return self.path.parent

    def __len__(self) -> int:
        return len(self.table)

    def __iter__(self) -> Iterator[StudyRow]:
        yield from self.rows()

    def rows(self, split: str | None = None) -> Iterator[StudyRow]:
        """The rows, optionally of one split, in manifest order."""
        table = self.table if split is None else self.table[self.table["split"] == split]
        label_values = table[list(self.labels)].to_numpy(dtype=np.float32)
        for i, record in enumerate(table.itertuples(index=False)):
            yield StudyRow(
                row=int(record.row),
                study_id=record.study_id,
                patient_id=record.patient_id,
                image=self.root / record.image if record.image else None,
                note=record.note or None,
                note_path=self.root / record.note_path if record.note_path else None,
                split=record.split,
                labels=label_values[i],
            )

    def label_matrix(self, split: str | None = None) -> np.ndarray:
        """(N, L) float32 labels with NaN for unknown."""
        table = self.table if split is None else self.table[self.table["split"] == split]
        return table[list(self.labels)].to_numpy(dtype=np.float32)


def label_problem(labels: np.ndarray, splits: np.ndarray, names: Sequence[str]) -> str:
    """Why these rows' labels cannot train a model ("" when they can): the train split needs a
    known label cell, and the val split a label with a positive and a negative (early stopping,
    calibration and the thresholds are fitted there). `labels` (N, L) float, NaN = unknown;
    `splits` (N,) each row's split; `names` the L label names."""
    train, val = labels[splits == "train"], labels[splits == "val"]
    if not (~np.isnan(train)).any():
        return "no known label in the train split (every label cell of its rows is empty)"
    untaught = [repr(n) for j, n in enumerate(names) if np.isnan(train[:, j]).all()]
    if untaught:  # its head would be trained on nothing, then calibrated and called
        many = len(untaught) > 1
        return (
            f"label{'s' * many} {', '.join(untaught)} {'have' if many else 'has'} no known value "
            "in the train split, so a model could not learn "
            f"{'them' if many else 'it'}: fill {'them' if many else 'it'} in, or choose the "
            "labels to train on (data.labels=[...]; validate --labels)"
        )
    both = [n for j, n in enumerate(names) if {0.0, 1.0} <= set(val[:, j][~np.isnan(val[:, j])])]
    if not both:
        return (
            "no label of the val split has both a positive and a negative, so early stopping, "
            "calibration and the decision thresholds could not be fitted"
        )
    return ""


def manifest_kind(path: Path) -> str:
    """ "csv", "parquet" or "jsonl" of a manifest file that exists; else a `ManifestError`."""
    kind = _SUFFIXES.get(path.suffix.lower())
    if path.is_dir():  # an export's folder, given for its manifest
        inside = sorted(p.name for p in path.iterdir() if p.suffix.lower() in _SUFFIXES)
        raise ManifestError(
            path,
            "is a folder, not a manifest file",
            hint=f"give the manifest inside it ({', '.join(inside[:3])})"
            if inside
            else "give the manifest file (.csv, .parquet or .jsonl)",
        )
    if kind is None:
        raise ManifestError(
            path, f"unsupported manifest type {path.suffix!r}", hint="use .csv, .parquet or .jsonl"
        )
    if not path.is_file():
        raise ManifestError(path, "manifest file not found", hint="check the path")
    return kind


def _text_table(path: Path, table: pd.DataFrame) -> pd.DataFrame:
    """Every cell as text (`_as_text`; a list or an object in a reserved column is refused);
    a column with no name is dropped while empty (a trailing separator) and refused when it
    holds values (taken for a label, its values would be trained on)."""
    table.columns = _unique_columns(path, table.columns)
    for column in [c for c in RESERVED if c in table.columns] if len(table) else []:
        nested = table[column].map(lambda v: isinstance(v, (dict, list, tuple, np.ndarray)))
        if nested.any():  # elsewhere its JSON text is kept (a label's then fails its parse)
            kind = type(table[column][nested].iloc[0]).__name__
            raise ManifestError(
                path,
                f"holds a {kind} where a text is expected",
                column=column,
                hint="give each cell as text, a number or empty",
            )
    text = table.map(_as_text) if len(table) else table.astype(str)
    unnamed = [i for i, c in enumerate(text.columns) if not c or re.fullmatch(r"Unnamed: \d+", c)]
    for i in unnamed:  # by position: two blank names are one name
        if (text.iloc[:, i] != "").any():
            raise ManifestError(
                path,
                f"column {i + 1} has no name in the header but holds values",
                hint="name it in the header, or remove the column",
            )
    return text.iloc[:, [i for i in range(text.shape[1]) if i not in unnamed]]


def _unique_columns(path: Path, names: Iterable[object]) -> list[str]:
    """Column names stripped; one named twice is an error (it would hide one column's values)."""
    stripped = [str(name).strip() for name in names]
    if "row" in stripped:  # the manifest's own row numbers take that name
        raise ManifestError(
            path,
            "a column named 'row' is reserved for the row numbers clinfuse reports",
            column="row",
            hint="rename it (for example source_row)",
        )
    seen: set[str] = set()
    for name in stripped:
        if name in seen and name and _reads_as_data(stripped):
            raise ManifestError(path, _NO_HEADER, hint=_HEADER_HINT)
        if name in seen and name:  # empty names (a trailing separator) are pandas' "Unnamed"
            raise ManifestError(
                path,
                "column named twice in the header",
                column=name,
                hint="rename or remove one of them",
            )
        seen.add(name)
    return stripped


_NO_HEADER = (
    "its first line reads as a data row (a number or a path among its cells), so the header row "
    "seems to be missing; its cells are not repeated here: they may identify a patient"
)
_HEADER_HINT = (
    "add the header row first: study_id, patient_id, image, note or note_path, split, then one "
    "column per label"
)


def _reads_as_data(names: Iterable[object]) -> bool:
    """A header line none of whose cells is a reserved column name and some of whose cells are
    numbers or paths: a data row where the header should be (a header-less export)."""
    cells = [str(name).strip() for name in names]
    if {c.lower() for c in cells} & set(RESERVED):
        return False
    return any(re.fullmatch(r"[-+.,0-9]+", c) or "/" in c or "\\" in c for c in cells)


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes: what a model or a run records of the manifest it read
    (read a megabyte at a time: a manifest of millions of rows is never held whole)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def read_table(path: str | Path) -> pd.DataFrame:
    """Read a CSV, Parquet or JSONL manifest with every cell as text ("" for empty)."""
    return next(read_chunks(path, chunk_rows=None))


def read_chunks(path: str | Path, chunk_rows: int | None = 4096) -> Iterator[pd.DataFrame]:
    """The manifest as text tables of at most `chunk_rows` rows (None: one table)."""
    path = Path(path)
    kind = manifest_kind(path)
    try:
        sep = _csv_header(path)[0] if kind == "csv" else ","
        if kind == "csv":
            _check_first_row(path, sep)  # pandas would take a longer first row's extra cell
            # for an index column and shift every column; later long rows it refuses
            chunks = pd.read_csv(
                path,
                sep=sep,
                dtype=str,
                keep_default_na=False,
                encoding="utf-8-sig",
                chunksize=chunk_rows,
                index_col=False,
            )
        elif kind == "parquet":
            batches = pq.ParquetFile(path).iter_batches(batch_size=chunk_rows or 1 << 30)
            # columns only: an index pandas saved in the file would come back as the index,
            # hiding a column (study_id) or repeating row labels; an unnamed one is dropped
            chunks = (
                _without_saved_index(batch.to_pandas(ignore_metadata=True)) for batch in batches
            )
        else:
            chunks = _json_chunks(path, chunk_rows)
        if chunk_rows is None:
            chunks = [chunks] if kind == "csv" else [pd.concat(list(chunks))]
        empty, first_row = True, 1
        for chunk in chunks:
            empty = False
            if kind == "csv":
                _check_swallowed_rows(path, chunk, sep, first_row)
            first_row += len(chunk)
            yield _text_table(path, chunk)
        if empty:
            yield _text_table(
                path,
                pd.read_csv(path, sep=sep, dtype=str, nrows=0, encoding="utf-8-sig")
                if kind == "csv"
                else pd.DataFrame(columns=["study_id"]),
            )
    except ManifestError:
        raise
    except pd.errors.EmptyDataError:
        raise ManifestError(
            path, "is empty: no header and no rows", hint='README, "The manifest"'
        ) from None
    except UnicodeDecodeError as exc:
        raise ManifestError(
            path,
            f"not UTF-8 text ({exc.reason}{_first_non_utf8(path)})",
            hint='save it as UTF-8 (a spreadsheet\'s "CSV UTF-8")',
        ) from exc
    except Exception as exc:  # pandas/pyarrow raise many types for a malformed file
        long = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", str(exc))
        if long:
            width, line, cells = long.groups()
            raise ManifestError(  # pandas counts the header as line 1
                path,
                f"has {cells} cells where the header has {width}",
                row=int(line) - 1,
                hint=_QUOTE_HINT,
            ) from exc
        raise ManifestError(path, f"cannot parse as {kind}: {exc}") from exc


def _first_non_utf8(path: Path) -> str:
    """Where a file's first byte that is not UTF-8 is: ", first at line N" (the file's own
    line count, from 1), or "" when it cannot be found."""
    with path.open("rb") as file:
        for number, line in enumerate(file, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                return f", first at line {number}"
    return ""


_QUOTE_HINT = 'a cell that holds the separator must be quoted ("Fever, cough"), as CSV writers do'


def _check_swallowed_rows(path: Path, table: pd.DataFrame, sep: str, first_row: int) -> None:
    """Refuse a cell whose quote opened and did not close where the cell ends: the rows after
    it are read into it as lines of text, until the next quote (a stray `"` at the start of a
    note). Such a cell holds lines that read as rows of their own: the study_id and patient_id
    places filled with one word each, and about as many cells as the header."""
    columns = [str(name).strip() for name in table.columns]
    if "study_id" not in columns or "patient_id" not in columns:
        return  # refused by the column checks
    texts = [table.iloc[:, place].astype(str) for place in range(len(columns))]
    broken = {  # column place -> rows of its cells holding a line break (most chunks: none)
        place: rows
        for place, cells in enumerate(texts)
        if len(rows := np.flatnonzero(cells.str.contains("\n")))
    }
    if not broken:
        return
    ids = columns.index("study_id"), columns.index("patient_id")
    # the columns that hold label values in nearly every row (an age or an accession column
    # does not): the lines a stray quote swallowed are told by what they hold there
    labels = [
        i
        for i, name in enumerate(columns)
        if name not in RESERVED and sum(map(_is_label_value, texts[i])) >= 0.9 * len(table)
    ]
    split = columns.index("split") if "split" in columns else None

    def reads_as_row(line: str) -> bool:
        """One word in each id's place, a label value in each label's (a lab panel or a list
        of drugs pasted into a note has about as many cells, but not those), a split or none
        in the split's."""
        cells = [c.strip() for c in next(csv.reader([line], delimiter=sep), [])]
        if not len(columns) - 1 <= len(cells) <= len(columns) + 1:
            return False
        cells += [""] * (len(columns) - len(cells))
        return (
            all(re.fullmatch(r"[^\s\"]+", cells[i]) for i in ids)
            and all(_is_label_value(cells[i]) for i in labels)
            and (split is None or cells[split].lower() in ("", *SPLITS))
        )

    for place, positions in broken.items():
        column, cells = columns[place], texts[place]
        for position in positions:
            lines = cells.iloc[position].splitlines()[1:]
            rows = sum(map(reads_as_row, lines))
            if rows:
                raise ManifestError(
                    path,
                    f"a quote opened in this cell closes only {len(lines)} line(s) later, and "
                    f"{rows} of those lines read as rows of their own: they were taken into "
                    "this cell",
                    row=first_row + int(position),
                    column=str(column),
                    hint="close the quote where the cell ends, or write a quote inside a cell "
                    'twice ("")',
                )


def _check_first_row(path: Path, sep: str) -> None:
    """Refuse a first data row with more cells than the header (see `read_chunks`)."""
    records = _csv_records(path, sep)
    width, first = len(next(records, [])), next(records, [])
    records.close()
    if len(first) > width:
        extra_empty = not any(cell.strip() for cell in first[width:])
        raise ManifestError(
            path,
            f"has {len(first)} cells where the header has {width}",
            row=1,
            hint="the row ends with separators the header lacks: remove them, or end the "
            "header likewise"
            if extra_empty
            else _QUOTE_HINT,
        )


def _json_chunks(path: Path, chunk_rows: int | None) -> Iterator[pd.DataFrame]:
    """A JSONL manifest as tables of at most `chunk_rows` objects (None: one table). A line
    that is not one JSON object, or names a key twice (one value would hide the other, as a
    column named twice in a CSV would), is a ManifestError naming the line."""
    records: list[dict] = []
    seen: dict[str, list[int]] = {}  # key -> the first lines naming it (two are enough)
    objects = 0
    with path.open(encoding="utf-8-sig") as file:
        for number, line in enumerate(file, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line, object_pairs_hook=_once_each)
            except json.JSONDecodeError as exc:
                raise ManifestError(
                    path, f"line {number} is not a JSON object ({exc.msg})"
                ) from None
            except KeyError as exc:
                raise ManifestError(
                    path, f"line {number} names the key {exc.args[0]!r} twice", column=exc.args[0]
                ) from None
            if not isinstance(value, dict):
                problem = f"a {type(value).__name__}"
                raise ManifestError(path, f"line {number} is not a JSON object ({problem})")
            records.append(value)
            objects += 1
            for key in value:
                lines = seen.setdefault(key, [])
                if len(lines) < 2:
                    lines.append(number)
            if chunk_rows and len(records) == chunk_rows:
                yield pd.DataFrame.from_records(records)
                records = []
        _warn_of_lone_keys(path, file, objects, seen)
    if records or not chunk_rows:
        yield pd.DataFrame.from_records(records)


_lone_keys_told: set[tuple[str, int, int]] = set()


def _version(path: Path, stat: os.stat_result) -> tuple[str, int, int]:
    """A file version, for what is told once per version in a process (a run reads its
    manifest more than once): its path, modification time and size."""
    return str(path.resolve()), stat.st_mtime_ns, stat.st_size


def _warn_of_lone_keys(path: Path, file: IO[str], objects: int, seen: dict[str, list[int]]) -> None:
    """A warning, once per file version in this process, naming a key only one of 10 or more
    JSON lines has: where labels are read it is taken for a label, unknown in every other row,
    and it is most likely a typo of another key ("flue": 1)."""
    lone = {k: lines[0] for k, lines in seen.items() if len(lines) == 1 and k not in RESERVED}
    if objects < 10 or not lone:
        return
    told = _version(path, os.fstat(file.fileno()))  # the one read (the path may be renamed)
    if told in _lone_keys_told:
        return
    _lone_keys_told.add(told)
    log.warning(
        "%s: %s only one of its %d lines has (%s): where labels are read and data.labels does "
        "not name them, it is taken for a label, unknown in every other row; if it is a typo, "
        "mend that line",
        path,
        "the key " + repr(next(iter(lone))) if len(lone) == 1 else f"{len(lone)} keys",
        objects,
        ", ".join(f"{k!r} on line {n}" for k, n in list(lone.items())[:5]),
    )


def _once_each(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object's pairs as a dict; KeyError(key) for a key given twice."""
    found: dict[str, Any] = {}
    for key, value in pairs:
        if key in found:
            raise KeyError(key)
        found[key] = value
    return found


def _csv_header(path: Path) -> tuple[str, list[str]]:
    """The CSV's separator and header names. The separator is a comma, unless the header row
    has none and is split by semicolons or tabs, as spreadsheet programs save "CSV" in locales
    whose decimal mark is a comma. The names are checked here, before pandas renames a repeated
    one ("mass.1")."""
    with path.open(encoding="utf-8-sig", errors="replace", newline="") as file:
        header = file.readline()
    if re.fullmatch(r"sep=.?\s*", header):
        raise ManifestError(
            path,
            f"its first line {header.strip()!r} is a spreadsheet's separator hint, not the header",
            row=0,
            hint="remove that line, so the header comes first",
        )
    sep = next((sep for sep in (",", ";", "\t") if sep in header), ",")
    names = next(csv.reader([header], delimiter=sep), [])
    _unique_columns(path, names)
    return sep, names


def short_rows(path: str | Path) -> dict[int, tuple[int, int]]:
    """A CSV manifest's rows with fewer cells than its header: {row: (cells, header cells)}.
    The reader reads their missing cells as empty (labels unknown); `validate` says so."""
    path = Path(path)
    if manifest_kind(path) != "csv":
        return {}
    records = _csv_records(path, _csv_header(path)[0])
    header = next(records, [])
    while header and not header[-1].strip():  # a trailing separator names no column
        header.pop()
    width = len(header)
    return {n: (len(r), width) for n, r in enumerate(records, 1) if len(r) < width}


def _csv_records(path: Path, sep: str) -> Iterator[list[str]]:
    """A CSV's non-blank records, the header first, as Python's csv module splits them."""
    csv.field_size_limit(2**31 - 1)  # a long inline note is one cell, as pandas reads it
    with path.open(encoding="utf-8-sig", errors="replace", newline="") as file:
        yield from (r for r in csv.reader(file, delimiter=sep) if any(c.strip() for c in r))


def listed_rows(rows: Iterable[int], limit: int = 10) -> str:
    """Row numbers for a message: "4, 9, 12" or, past `limit`, the first ones and "..."."""
    rows = list(rows)
    return ", ".join(map(str, rows[:limit])) + (", ..." if len(rows) > limit else "")


_short_rows_seen: dict[tuple[str, int, int], dict[int, tuple[int, int]]] = {}


def report_short_rows(path: str | Path) -> dict[int, tuple[int, int]]:
    """`short_rows`, with a warning naming them, once per file version in this process (a run
    reads its manifest more than once): a row cut short by a broken export would otherwise be
    read, without a word, as a study with no note or with unknown labels."""
    path = Path(path)
    if manifest_kind(path) != "csv":
        return {}
    key = _version(path, path.stat())
    if key in _short_rows_seen:
        return _short_rows_seen[key]
    short = _short_rows_seen[key] = short_rows(path)
    if short:
        names = _csv_header(path)[1]
        first, (cells, width) = next(iter(short.items()))
        where = f"row {first}" if len(short) == 1 else f"{len(short)} rows ({listed_rows(short)})"
        log.warning(
            "%s: %s with fewer cells than the header's %d: the missing cells are read as empty "
            "(row %d has no %s); if that is not meant, fix the export",
            path,
            where,
            width,
            first,
            ", ".join(names[cells:]),
        )
    return short


_LABEL_WORDS = {  # what a spreadsheet holds where a label was meant: safe to quote
    "yes", "no", "y", "n", "pos", "neg", "positive", "negative", "present", "absent", "t", "f",
    "na", "n/a", "nan", "null", "none", "unknown", "?", "x", "-",
}  # fmt: skip


def _is_label_value(cell: str) -> bool:
    """A cell a label column may hold: 1, 0 (as `_ONE` / `_ZERO` write them), true, false or
    empty."""
    value = cell.strip().lower()
    return value in ("", *_TRUE, *_FALSE) or bool(re.fullmatch(f"{_ONE}|{_ZERO}", value))


def _shown(value: str) -> str:
    """A cell for an error message: a number of at most 3 characters or a word of `_LABEL_WORDS`
    as written; other text only by its length (a column taken for a label may hold a patient's
    name, record number or birth date)."""
    if re.fullmatch(r"[-+.,0-9eE]{1,3}|[-+]?[0-9][.,][0-9]{1,4}", value) or (
        value.lower() in _LABEL_WORDS
    ):
        return repr(value)
    return f"(a text of {len(value)} characters, not shown: it may identify a patient)"


def _without_saved_index(table: pd.DataFrame) -> pd.DataFrame:
    """A Parquet table without the column of an unnamed index pandas saved with it."""
    return table.drop(columns=[c for c in table.columns if re.fullmatch(r"__index_level_\d+__", c)])


def _as_text(value: object) -> str:
    """A cell as text: None/NaN/<NA> (Parquet's nulls in nullable columns) -> "", 1.0 -> "1",
    strings stripped, bytes (Parquet binary strings) read as UTF-8, a list or an object as
    its JSON (`_text_table` refuses one in a reserved column)."""
    if value is None or value is pd.NA or value is pd.NaT:
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8").strip()  # UnicodeDecodeError: read_chunks says "not UTF-8"
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (dict, list, tuple)):  # a column no one reads, or a label's error
        return json.dumps(value, default=str)
    if isinstance(value, (bool, np.bool_)):
        return "1" if value else "0"
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return ""
        if float(value).is_integer():
            return str(int(value))
    return str(value).strip()


def load_manifest(
    path: str | Path,
    labels: Sequence[str] | None = None,
    split: PatientSplit | None = None,
    warn_short_rows: bool = True,
    read_labels: bool = True,
) -> Manifest:
    """Read and check a manifest; raise `ManifestError` naming the row/column of a problem.

    `labels` names the label columns; by default every column that is not reserved. With
    `read_labels=False` (labels measured from another table) they are all unknown, whether
    the manifest has the columns or not.
    Rows without a `split` value get the seeded patient-level `split` (default PatientSplit()).
    CSV rows with fewer cells than the header are read with the missing cells empty, and
    named in a warning (`report_short_rows`) unless `warn_short_rows` is False.
    """
    path = Path(path)
    table = read_table(path)
    if not read_labels and labels is not None:
        table = table.assign(**{name: "" for name in labels if name not in RESERVED})
    manifest = check_table(path, table, labels, split or PatientSplit())
    if not len(manifest):
        raise no_rows(path)
    if warn_short_rows:
        report_short_rows(path)
    return manifest


def no_rows(path: Path) -> ManifestError:
    """The error for a manifest with a header and no study row: every command refuses it (a
    run of nothing would look like success)."""
    return ManifestError(
        path,
        "no study rows below the header",
        hint='add one row per study (README, "The manifest")',
    )


def reference_labels(
    path: str | Path, labels: Sequence[str], study_ids: Sequence[str]
) -> np.ndarray:
    """(N, L) float32 labels (NaN = unknown) of `study_ids`, read from a table of `study_id`
    and label columns: adjudicated labels, a reviewed export, or a synthetic export's
    `ground_truth/truth.csv`. Other columns are ignored; a missing column, a bad cell or a
    study the table does not cover is a `ManifestError` naming it."""
    path = Path(path)
    table = read_table(path)
    for column in ("study_id", *labels):
        if column not in table.columns:
            raise ManifestError(
                path, "missing column in the labels file", column=column, hint=_columns_hint(table)
            )
    table.insert(0, "row", np.arange(1, len(table) + 1))
    _check_unique_studies(path, table)
    parsed = _parse_labels(path, table, tuple(labels))
    position = pd.Series(table.index, index=table["study_id"])
    missing = [s for s in study_ids if s not in position.index]
    if missing:
        raise ManifestError(
            path,
            f"{len(missing)} scored studies have no row here (first: {missing[0]!r})",
            column="study_id",
            hint="the labels file must cover every study that is scored",
        )
    return parsed.loc[position[list(study_ids)].to_numpy()].to_numpy(dtype=np.float32)


def iter_manifest(
    path: str | Path, labels: Sequence[str], chunk_rows: int = 4096, read_labels: bool = True
) -> Iterator[StudyRow]:
    """Stream a manifest to score (constant memory): the same checks, chunk by chunk.

    Label columns are optional here (absent ones are unknown); with `read_labels=False` they
    and the split column are not read at all (every label unknown), for scoring, which never
    uses them: a cell of a label or split column cannot stop a run (nor could a patient's
    studies straddling splits, which a check per chunk would see in some files and not in
    others). A study id repeated anywhere in the file is an error naming both rows.
    """
    path = Path(path)
    report_short_rows(path)
    first_rows: dict[str, int] = {}
    offset = 0
    for chunk in read_chunks(path, chunk_rows):
        _check_columns(path, chunk)  # before label columns are added: a hint names the file's
        for name in labels:
            if name not in chunk.columns or not read_labels:
                chunk[name] = ""
        if not read_labels and "split" in chunk.columns:
            chunk["split"] = ""
        manifest = check_table(path, chunk, labels, PatientSplit(), first_row=offset + 1)
        for row in manifest.rows():  # across chunks, also ignoring case (`check_table`)
            earlier = first_rows.setdefault(row.study_id.lower(), row.row)
            if earlier != row.row:
                raise ManifestError(
                    path,
                    f"duplicate study_id {row.study_id!r} (rows {earlier}, {row.row}; also "
                    "ignoring case)",
                    row=row.row,
                    column="study_id",
                    hint="study ids must be unique, also ignoring case",
                )
            yield row
        offset += len(chunk)


def check_table(
    path: Path,
    table: pd.DataFrame,
    labels: Sequence[str] | None,
    split: PatientSplit,
    first_row: int = 1,
) -> Manifest:
    """Check a text table against the contract and normalise it into a `Manifest`."""
    _check_columns(path, table)
    label_names = _label_columns(path, table, labels)
    table = table.copy()
    for column in INPUT_COLUMNS + ("split",):
        if column not in table.columns:
            table[column] = ""
    table.insert(0, "row", np.arange(first_row, first_row + len(table)))

    _check_required_values(path, table)
    _check_unique_studies(path, table)
    table[list(label_names)] = _parse_labels(path, table, label_names, chosen=labels is not None)
    table["split"] = _resolve_splits(path, table, split)
    columns = ["row", *RESERVED, *label_names]
    return Manifest(path=path, labels=label_names, table=table[columns].reset_index(drop=True))


def _check_columns(path: Path, table: pd.DataFrame) -> None:
    """The required columns and an input column are there; else a ManifestError naming the
    columns found (or saying the header seems missing)."""
    for column in ("study_id", "patient_id"):
        if column not in table.columns:
            raise ManifestError(
                path, "missing required column", column=column, hint=_columns_hint(table)
            )
    if not any(c in table.columns for c in INPUT_COLUMNS):
        raise ManifestError(
            path,
            "no input column: a manifest needs 'image', 'note' or 'note_path'",
            hint=_columns_hint(table),
        )


def _columns_hint(table: pd.DataFrame) -> str:
    if _reads_as_data(table.columns):  # never lists a data row's cells
        return f"{_NO_HEADER}; {_HEADER_HINT}"
    found = f"columns found: {', '.join(map(str, table.columns)) or 'none'}"
    if len(table.columns) == 1 and any(sep in str(table.columns[0]) for sep in "|:^"):
        found += " (the header reads as one column: separate columns by commas, semicolons or tabs)"
    return found


def _label_columns(
    path: Path, table: pd.DataFrame, labels: Sequence[str] | None
) -> tuple[str, ...]:
    if labels is None:
        names = tuple(c for c in table.columns if c not in RESERVED)
    else:
        names = tuple(labels)
        for name in names:
            if names.count(name) > 1:
                raise ManifestError(
                    path, "label named twice in --labels / data.labels", column=name
                )
            if name not in table.columns:
                raise ManifestError(
                    path,
                    "no such label column (a label --labels, data.labels or the model names)",
                    column=name,
                    hint=_columns_hint(table),
                )
            if name in RESERVED:
                raise ManifestError(path, "a reserved column cannot be a label", column=name)
    if not names:
        raise ManifestError(
            path, "no label columns", hint="add one column per label (values 1, 0 or empty)"
        )
    return names


_VALUE_CHECKS = (  # (columns, the cells that are wrong, the problem, what to do)
    (
        ("study_id",),
        lambda cells: cells.str.lower() == "study_id",
        "the row repeats the header (two exports joined into one file?)",
        "remove it",
    ),
    (
        ("study_id", "patient_id"),
        lambda cells: cells == "",
        "empty value in a required column",
        "every study needs a study_id and a patient_id",
    ),
    (  # ids go to the store, paths to the file system: neither takes a NUL or a line break
        ("study_id", "patient_id", "image", "note_path"),
        lambda cells: cells.str.contains(r"[\x00-\x1f\x7f]", regex=True),
        "a control character (NUL, tab, line break, ...) in an id or a path",
        "remove it: the export that wrote the manifest may have damaged the cell",
    ),
)


def _check_required_values(path: Path, table: pd.DataFrame) -> None:
    for columns, wrong, problem, hint in _VALUE_CHECKS:
        for column in columns:
            rows = table.loc[wrong(table[column]), "row"]
            if len(rows):
                raise ManifestError(path, problem, row=int(rows.iloc[0]), column=column, hint=hint)


def _check_unique_studies(path: Path, table: pd.DataFrame) -> None:
    """Study ids unique, also ignoring case: an explanation, FHIR or SR file is named by its
    study id, and on a case-insensitive disk (macOS, Windows, a share) S1's would be s1's."""
    folded = table["study_id"].str.lower()  # not casefold: "straße" and "STRASSE" are two
    duplicated = table[folded.duplicated(keep=False)]
    if len(duplicated):
        study_id = duplicated["study_id"].iloc[0]
        first = duplicated[folded[duplicated.index] == study_id.lower()]  # its rows
        rows = first["row"].tolist()
        same = first["study_id"].nunique() == 1
        raise ManifestError(
            path,
            f"duplicate study_id {study_id!r}{'' if same else ' (in other cases)'} "
            f"(rows {', '.join(map(str, rows))})",
            row=int(rows[1]),
            column="study_id",
            hint="study ids must be unique" + ("" if same else ", also ignoring case"),
        )


def _parse_labels(
    path: Path, table: pd.DataFrame, names: tuple[str, ...], chosen: bool = True
) -> pd.DataFrame:
    """Label cells -> float32 1.0 / 0.0 / NaN; any other value is an error naming the cell
    (and, where every other column was taken for a label, how to name the labels instead)."""
    parsed = {}
    for name in names:
        values = table[name].str.lower()
        true = values.isin(_TRUE) | values.str.fullmatch(_ONE)
        false = values.isin(_FALSE) | values.str.fullmatch(_ZERO)
        bad = ~(true | false | (values == ""))
        if bad.any():
            first = bad.idxmax()
            raise ManifestError(
                path,
                f"label value {_shown(table.at[first, name])} is not 1, 0 or empty",
                row=int(table.at[first, "row"]),
                column=name,
                hint="use 1 (present), 0 (absent) or leave empty (unknown)"
                + (
                    ""
                    if chosen
                    else f"; if {name!r} is not a label (every column but the reserved ones is "
                    "taken for one), name the labels: data.labels=[a,b] for train, --labels a,b "
                    "for validate"
                ),
            )
        parsed[name] = np.where(true, 1.0, np.where(values == "", np.nan, 0.0))
    return pd.DataFrame(parsed, index=table.index).astype(np.float32)


def _resolve_splits(path: Path, table: pd.DataFrame, split: PatientSplit) -> pd.Series:
    """Given splits checked, missing ones assigned per patient; no patient straddles splits."""
    given = table["split"].str.lower()
    unknown = ~(given.isin(SPLITS) | (given == ""))
    if unknown.any():
        first = unknown.idxmax()
        raise ManifestError(
            path,
            f"unknown split {table.at[first, 'split']!r}",
            row=int(table.at[first, "row"]),
            column="split",
            hint="use train, val or test, or leave empty for a seeded split",
        )
    resolved = given.where(given != "", table["patient_id"].map(split.assign))
    per_patient = resolved.groupby(table["patient_id"]).nunique()
    straddling = per_patient[per_patient > 1]
    if len(straddling):
        own = table["patient_id"] == straddling.index[0]
        rows = [
            f"{row} ({split})" if split else f"{row} (empty: the seeded split gives {seeded})"
            for row, split, seeded in zip(
                table.loc[own, "row"], table.loc[own, "split"], resolved[own], strict=True
            )
        ]
        raise ManifestError(
            path,
            f"a patient's studies straddle splits (rows {', '.join(rows)})",
            row=int(table.loc[own, "row"].iloc[0]),
            column="split",
            hint="put all of a patient's studies in one split, or leave split empty",
        )
    return resolved
