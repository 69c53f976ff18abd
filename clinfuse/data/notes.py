"""Clinical-note ingestion: inline text or a text file, repaired rather than rejected.

A note is never a reason to lose a study: a file in UTF-16 or Windows-1252 is read as such,
other invalid UTF-8 bytes become U+FFFD, and control characters become spaces (so character
offsets into the returned text stay valid), each with a `NoteWarning`. An empty or missing
note means "no note", which is not an error.
"""

from __future__ import annotations

import codecs
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


def decode_note(raw: bytes, source: str) -> str:
    """A note file's bytes as text: UTF-8 (BOM allowed), or UTF-16 when the file says so (a
    BOM, or the NUL byte of every other position that UTF-16 gives English text). Bytes that
    are not UTF-8 are read as Windows-1252 (Latin-1's superset) when nothing in the file is
    UTF-8 beyond ASCII, else replaced by U+FFFD; both with a `NoteWarning` naming the file."""
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return raw.decode("utf-16")
    if len(raw) >= 4 and len(raw) % 2 == 0 and raw.count(0) * 2 >= len(raw) * 0.9:
        try:
            return raw.decode("utf-16-be" if raw[0] == 0 else "utf-16-le")
        except UnicodeDecodeError:
            pass  # not UTF-16 after all: decoded below, its NULs become spaces
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        replaced = raw.decode("utf-8-sig", errors="replace")
        if all(c < "\x80" or c == "\ufffd" for c in replaced):
            try:
                text = raw.decode("cp1252")
            except UnicodeDecodeError:
                pass  # a byte Windows-1252 leaves undefined: keep the replacement
            else:
                warnings.warn(
                    f"{source}: not UTF-8 (byte {exc.start}); read as Windows-1252 (Latin-1). "
                    "Save notes as UTF-8 if accented characters look wrong",
                    NoteWarning,
                    stacklevel=3,
                )
                return text
        warnings.warn(
            f"{source}: invalid UTF-8 at byte {exc.start}; replaced undecodable bytes with "
            "U+FFFD. Save notes as UTF-8",
            NoteWarning,
            stacklevel=3,
        )
        return replaced


def read_note_file(path: str | Path) -> str | None:
    """Read a note file (see `decode_note` for its encodings); a typed error if unreadable."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise NoteError(path, exc.strerror or str(exc)) from exc
    return clean_note(decode_note(raw, str(path)), source=str(path))


def read_note(text: str | None = None, path: str | Path | None = None) -> str | None:
    """The note of one study from inline `text` or a file `path`; None when there is none.

    Inline text wins when both are given and non-empty.
    """
    if text is not None and str(text).strip():
        return clean_note(str(text))
    if path is not None and str(path).strip():
        return read_note_file(path)
    return None
