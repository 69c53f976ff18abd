"""Clinical-note ingestion: inline text or a UTF-8 file, repaired rather than rejected.

A note is never a reason to lose a study: invalid UTF-8 bytes become U+FFFD and control
characters become spaces (so character offsets into the returned text stay valid), each with
a `NoteWarning`. An empty or missing note means "no note", which is not an error.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

from clinfuse.errors import NoteError, NoteWarning

# C0/C1 control characters except tab, newline and carriage return.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def clean_note(text: str, source: str = "note") -> str | None:
    """Replace control characters by spaces (length-preserving); blank text -> None."""
    cleaned, n_control = _CONTROL.subn(" ", text)
    if n_control:
        warnings.warn(
            f"{source}: replaced {n_control} control character(s) with spaces",
            NoteWarning,
            stacklevel=3,
        )
    return cleaned if cleaned.strip() else None


def read_note_file(path: str | Path) -> str | None:
    """Read a note file as UTF-8 (BOM allowed); invalid bytes become U+FFFD with a warning."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise NoteError(path, exc.strerror or str(exc)) from exc
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        text = raw.decode("utf-8-sig", errors="replace")
        warnings.warn(
            f"{path}: invalid UTF-8 at byte {exc.start}; replaced undecodable bytes with U+FFFD",
            NoteWarning,
            stacklevel=2,
        )
    return clean_note(text, source=str(path))


def read_note(text: str | None = None, path: str | Path | None = None) -> str | None:
    """The note of one study from inline `text` or a file `path`; None when there is none.

    Inline text wins when both are given and non-empty.
    """
    if text is not None and str(text).strip():
        return clean_note(str(text))
    if path is not None and str(path).strip():
        return read_note_file(path)
    return None
