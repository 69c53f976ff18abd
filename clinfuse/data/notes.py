"""Clinical-note ingestion: inline text or a text file, repaired rather than rejected.

A note is never a reason to lose a study: a UTF-16 file with a byte-order mark is read as
such; a UTF-16 file without one, or a Windows-1252 file, is read as such with a `NoteWarning`;
other invalid UTF-8 bytes become U+FFFD and control characters become spaces (so character
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
    BOM, or NUL in every other byte, as UTF-16 stores English text). Bytes that are not UTF-8
    are read as Windows-1252 (Latin-1's superset) when nothing in the file is UTF-8 beyond
    ASCII, else replaced by U+FFFD; each repair with a `NoteWarning` naming the file."""
    encoding = _utf16(raw)
    if encoding:
        if encoding != "utf-16":  # no byte-order mark: a guess, so say so
            _warn(f"{source}: no byte-order mark; read as {encoding.upper()} (NUL bytes)")
        try:
            return raw.decode(encoding)
        except UnicodeDecodeError as exc:  # cut short (odd length), a lone surrogate
            _warn(f"{source}: damaged UTF-16 at byte {exc.start}; replaced it with U+FFFD")
            return raw.decode(encoding, errors="replace")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        replaced = raw.decode("utf-8-sig", errors="replace")
        ascii_only = all(c < "\x80" or c == "\ufffd" for c in replaced)
        if ascii_only and not raw.startswith(codecs.BOM_UTF8):
            try:
                text = raw.decode("cp1252")
            except UnicodeDecodeError:
                pass  # a byte Windows-1252 leaves undefined: keep the replacement
            else:
                _warn(
                    f"{source}: not UTF-8 (byte {exc.start}); read as Windows-1252 (Latin-1). "
                    "Save notes as UTF-8 if accented characters look wrong"
                )
                return text
        _warn(
            f"{source}: invalid UTF-8 at byte {exc.start}; replaced undecodable bytes with "
            "U+FFFD. Save notes as UTF-8"
        )
        return replaced


def _utf16(raw: bytes) -> str | None:
    """ "utf-16" (with a BOM), "utf-16-le" / "utf-16-be" (no BOM: NUL in nearly every odd /
    even byte and almost none in the others, as in English text), else None."""
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16"
    half = len(raw) // 2
    if half < 2:
        return None
    even, odd = raw[0::2].count(0), raw[1::2].count(0)
    if odd >= 0.9 * half and even <= 0.1 * half:
        return "utf-16-le"
    if even >= 0.9 * half and odd <= 0.1 * half:
        return "utf-16-be"
    return None


def _warn(message: str) -> None:
    warnings.warn(message, NoteWarning, stacklevel=4)


# A note file is refused as not text when it starts as these formats do, or when more than
# BINARY_SHARE of its characters (before any NUL padding at its end) are control characters;
# a text export damaged by a few, or padded with NUL bytes, is repaired with a warning
# (`clean_note`).
_BINARY = (  # (magic bytes, their offset, what the file is)
    (b"PK\x03\x04", 0, "a ZIP archive (a .docx, .xlsx or .odt document?)"),
    (b"%PDF", 0, "a PDF document"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", 0, "an OLE document (a .doc or .xls file?)"),
    (b"DICM", 128, "a DICOM file"),
    (b"\x89PNG", 0, "a PNG image"),
    (b"\xff\xd8\xff", 0, "a JPEG image"),
    (b"\x1f\x8b", 0, "a gzip archive"),
)
BINARY_SHARE = 0.05
MAX_NOTE_BYTES = 4 * 2**20  # 4 MB: a long note is tens of kB


def read_note_file(path: str | Path, source: str | None = None) -> str | None:
    """Read a note file (see `decode_note` for its encodings); a typed error if unreadable.
    Warnings name `source` (default: the path)."""
    path = Path(path)
    source = source or str(path)
    try:
        if path.exists() and not path.is_file():  # a folder; a FIFO or device would block
            raise NoteError(path, "not a regular file (a folder, a device or a pipe)")
        size = path.stat().st_size
        if size > MAX_NOTE_BYTES:  # a log or an export given by mistake: read whole, it took
            raise NoteError(  # ~20x its size in memory, per worker
                path,
                f"{size:,} bytes, more than a note's {MAX_NOTE_BYTES:,}",
                reason="too_large",
                hint="Point note_path at the study's note, or cut the file to the note",
            )
        raw = path.read_bytes()
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        raise NoteError(path, getattr(exc, "strerror", None) or str(exc)) from exc
    kind = next((name for magic, at, name in _BINARY if raw[at : at + len(magic)] == magic), None)
    text = decode_note(raw, source) if kind is None else ""
    body = text.rstrip("\x00")  # NUL padding after the text is a fixed-size export's
    controls = len(_CONTROL.findall(body))
    if kind is None and controls > max(2, BINARY_SHARE * len(body)):
        kind = f"binary data ({controls} control characters in {len(body)})"
    if kind is not None:  # a document, an image: its bytes would be read as words
        raise NoteError(
            path,
            f"not text: {kind}",
            reason="not_text",
            hint="Export the note as plain text (UTF-8), or leave note_path empty",
        )
    return clean_note(text, source=source)


def read_note(
    text: str | None = None, path: str | Path | None = None, source: str | None = None
) -> str | None:
    """The note of one study from inline `text` or a file `path`; None when there is none.

    Inline text wins when both are given and non-empty (`clinfuse validate` warns of such a
    row). Repair warnings name `source` (default: the file, or "note"): a study's loaders
    give its manifest row, since a folder name may hold a patient's name or record number.
    """
    if text is not None and str(text).strip():
        return clean_note(str(text), source=source or "note")
    if path is not None and str(path).strip():
        return read_note_file(path, source)
    return None
