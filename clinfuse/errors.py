"""Typed errors a user can cause, each saying what is wrong, where, and what to do.

Every error a user can trigger (a bad manifest, a corrupt file, a wrong config key) is one of
these, so a caller (a batch pipeline, `clinfuse validate`) can catch it, record its `reason`
and carry on with the next study.
"""

from __future__ import annotations

import re
from pathlib import Path

_UNPRINTABLE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def printable(text: str, limit: int = 500) -> str:
    """`text` fit for a log line, a CSV cell and a PostgreSQL text column: control characters
    (NUL among them) as U+FFFD, undecodable bytes of a file name (lone surrogates) as \\xNN,
    at most `limit` characters."""
    text = _UNPRINTABLE.sub("\ufffd", text)
    try:  # a file name's undecodable bytes come back as the bytes they were
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate of another origin
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


class ClinfuseError(Exception):
    """Base of every error clinfuse raises on purpose."""


class DicomError(ClinfuseError):
    """A file that cannot become an image.

    `reason` is a short machine-readable code, one of `REASONS`; the message names the file.
    """

    REASONS = (
        "missing",  # the path does not exist
        "not_dicom",  # no DICOM preamble/meta and not parseable as a raw data set
        "truncated",  # the file ends before its declared data does
        "no_pixel_data",  # a DICOM object without an image (SR, presentation state, ...)
        "no_decoder",  # compressed with a transfer syntax no installed plugin decodes
        "unsupported_photometric",  # e.g. PALETTE COLOR without a LUT, or unknown
        "decode_failed",  # a decoder was found but failed on the data
        "inconsistent_series",  # a folder whose files cannot stack into one volume
        "empty_series",  # a folder holding no readable DICOM image
        "wrong_dimensions",  # a volume given to a 2D model, or a single image to a 3D model
    )

    def __init__(self, path: str | Path, reason: str, detail: str, hint: str = "") -> None:
        if reason not in self.REASONS:
            raise ValueError(f"unknown DicomError reason {reason!r}")
        self.path = str(path)
        self.reason = reason
        self.detail = printable(detail)  # it may quote a damaged header or a file name
        self.hint = hint
        message = f"{self.path}: {reason}: {self.detail}"
        super().__init__(f"{message}. {hint}" if hint else message)


class ManifestError(ClinfuseError):
    """A manifest that breaks the contract in DESIGN.md; names the row and/or column."""

    def __init__(
        self,
        path: str | Path,
        problem: str,
        *,
        row: int | None = None,
        column: str | None = None,
        hint: str = "",
    ) -> None:
        self.path = str(path)
        self.row = row  # 1-based data row (the header is row 0), as a spreadsheet shows it
        self.column = column
        self.problem = problem
        where = self.path
        if row is not None:
            where += f" row {row}"
        if column is not None:
            where += f" column {column!r}"
        message = f"{where}: {problem}"
        super().__init__(f"{message}. {hint}" if hint else message)


class ConfigError(ClinfuseError):
    """A configuration with an unknown, mistyped or missing key, or a command-line option
    ("--name") with a wrong value; names the key or option."""

    def __init__(self, key: str, problem: str, hint: str = "") -> None:
        self.key = key
        self.problem = problem
        message = (
            f"option {key}: {problem}" if key.startswith("--") else f"config key {key!r}: {problem}"
        )
        super().__init__(f"{message}. {hint}" if hint else message)


class ModelFolderError(ClinfuseError):
    """A path given as a model folder that is not one (no config.json); names the path."""

    def __init__(self, path: str | Path, problem: str, hint: str) -> None:
        self.path = str(path)
        super().__init__(f"{self.path}: {problem}. {hint}")


class NoteError(ClinfuseError):
    """A note file named in the manifest that cannot be read as a note: missing, a folder,
    unreadable ("note_unreadable"), or not text at all ("not_text": a document, an image)."""

    def __init__(
        self,
        path: str | Path,
        detail: str,
        reason: str = "note_unreadable",
        hint: str = "Fix the note_path, or leave it empty for a study without a note",
    ) -> None:
        self.path = str(path)
        self.reason = reason
        self.detail = detail
        self.hint = hint
        super().__init__(f"{self.path}: {reason}: {detail}. {self.hint}")


def without_path(exc: ClinfuseError, what: str) -> str:
    """A `DicomError` or `NoteError` as `<reason>: <what>: <detail>. <hint>`, its file's path
    replaced by `what` ("manifest row 4's image"): an export laid out by patient puts names
    and record numbers in its folder names, which must not reach the store, logs or pages."""
    path, detail = getattr(exc, "path", ""), getattr(exc, "detail", "") or str(exc)
    if path:
        detail = detail.replace(path, f"the file of {what}")
    hint = getattr(exc, "hint", "")
    text = f"{getattr(exc, 'reason', 'error')}: {what}: {detail}"
    return f"{text}. {hint}" if hint else text


class NoteWarning(UserWarning):
    """A note was readable but had to be repaired (invalid UTF-8 bytes, control characters)."""


class ImageWarning(UserWarning):
    """An image was read, but not as a reader of standard views expects it (stored mirrored)."""


def unreadable_split(
    manifest: str | Path, split: str, rows: int, failures: dict[str, str]
) -> ClinfuseError:
    """The error for a split none of whose studies could be read: how many, the first reason."""
    first = next(iter(sorted(failures.items())), None)
    reason = f" (the first, {first[0]}: {first[1]})" if first else ""
    return ClinfuseError(
        f"none of the {rows} studies ({split}) could be read{reason}. "
        f"`clinfuse validate {manifest}` gives every row's reason"
    )
