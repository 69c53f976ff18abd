"""Note ingestion: inline or file, repaired with a warning, never a crash; empty = no note."""

import re

import pytest

from clinfuse.data.notes import read_note
from clinfuse.errors import NoteError, NoteWarning


def test_inline_text_is_returned_as_written():
    assert read_note("Fever and productive cough.") == "Fever and productive cough."


def test_inline_wins_over_file(tmp_path):
    path = tmp_path / "n.txt"
    path.write_text("from file", encoding="utf-8")
    assert read_note("inline", path) == "inline"
    assert read_note("", path) == "from file"


@pytest.mark.parametrize("text", [None, "", "   \n\t "])
def test_empty_or_missing_note_is_no_note(text):
    assert read_note(text) is None


def test_blank_note_file_is_no_note(tmp_path):
    path = tmp_path / "blank.txt"
    path.write_text("\n\n", encoding="utf-8")
    assert read_note(path=path) is None


def test_unicode_file_round_trips_with_bom(tmp_path):
    path = tmp_path / "n.txt"
    path.write_bytes("\ufeffPatient reports dyspnée, 38.9 °C — crackles.".encode())
    assert read_note(path=path) == "Patient reports dyspnée, 38.9 °C — crackles."


def test_latin1_note_is_read_as_windows_1252_with_a_warning_naming_file_and_encoding(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("fièvre 38,9 °C and cough".encode("latin-1"))
    with pytest.warns(NoteWarning, match="latin1.txt: not UTF-8.*Windows-1252"):
        note = read_note(path=path)
    assert note == "fièvre 38,9 °C and cough"


def test_stray_byte_in_a_utf8_note_is_replaced_and_the_utf8_kept(tmp_path):
    path = tmp_path / "mixed.txt"
    path.write_bytes("dyspnée, 38.9 °C".encode() + b" \xff cough")
    with pytest.warns(NoteWarning, match="mixed.txt: invalid UTF-8 at byte 19"):
        note = read_note(path=path)
    assert note == "dyspnée, 38.9 °C \ufffd cough"


def test_utf16_note_with_a_byte_order_mark_is_read_as_written(tmp_path, recwarn):
    path = tmp_path / "n.txt"
    path.write_bytes("Fièvre; crackles at the left base.".encode("utf-16"))  # with a BOM
    assert read_note(path=path) == "Fièvre; crackles at the left base."
    assert not recwarn.list  # unambiguous: nothing to warn about


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be"])
def test_utf16_note_without_a_byte_order_mark_is_read_with_a_warning(tmp_path, encoding):
    path = tmp_path / "n.txt"
    path.write_bytes("Fièvre; crackles at the left base.".encode(encoding))
    with pytest.warns(NoteWarning, match=f"n.txt: no byte-order mark; read as {encoding.upper()}"):
        assert read_note(path=path) == "Fièvre; crackles at the left base."


def test_control_characters_become_spaces_so_offsets_hold():
    text = "fever\x00 and\x07cough\nnext line\tend"
    with pytest.warns(NoteWarning, match="2 control"):
        note = read_note(text)
    assert note == "fever  and cough\nnext line\tend"
    assert len(note) == len(text)
    assert note.index("cough") == text.index("cough")


def test_unreadable_note_file_is_a_typed_error_naming_it(tmp_path):
    with pytest.raises(NoteError, match="missing.txt.*note_path"):
        read_note(path=tmp_path / "missing.txt")


def test_a_damaged_utf16_note_is_repaired_with_a_warning_not_an_error(tmp_path):
    path = tmp_path / "cut.txt"
    path.write_bytes("Fièvre".encode("utf-16") + b"\n")  # odd length: a byte appended
    with pytest.warns(NoteWarning, match="cut.txt: damaged UTF-16"):
        assert read_note(path=path) == "Fièvre\ufffd"


def test_a_utf8_note_padded_with_nul_bytes_stays_utf8(tmp_path):
    path = tmp_path / "padded.txt"
    path.write_bytes(b"Patient has fever" + b"\0" * 60)  # not UTF-16: NULs on both parities
    with pytest.warns(NoteWarning, match="60 control"):
        assert read_note(path=path).rstrip() == "Patient has fever"


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b"PK\x03\x04" + bytes(range(256)) * 4, "a ZIP archive (a .docx"),
        (b"%PDF-1.7\n" + bytes(range(256)), "a PDF document"),
        (b"\0" * 128 + b"DICM" + bytes(range(256)), "a DICOM file"),
        (bytes(range(256)) * 12, "binary data"),
    ],
)
def test_a_document_or_binary_file_given_as_a_note_is_refused_as_not_text(tmp_path, content, says):
    """Its bytes would be read as words (with a repair warning at most) and trained on."""
    path = tmp_path / "note.txt"
    path.write_bytes(content)
    with pytest.raises(NoteError, match=re.escape(f"not_text: not text: {says}")) as caught:
        read_note(path=path)
    assert caught.value.reason == "not_text" and "as plain text" in caught.value.hint
    damaged = tmp_path / "damaged.txt"  # a few stray control bytes: repaired, still a note
    damaged.write_bytes(b"Fever since Monday,\x00 crackles at the left base.\x07")
    with pytest.warns(NoteWarning, match="2 control"):
        assert read_note(path=damaged).startswith("Fever since Monday,")


def test_a_note_file_too_large_to_be_a_note_is_refused_before_it_is_read(tmp_path):
    path = tmp_path / "export.log"
    with path.open("wb") as f:  # sparse: 5 MB that take no disk
        f.truncate(5 * 2**20)
    with pytest.raises(NoteError, match="too_large: 5,242,880 bytes, more than a note's") as caught:
        read_note(path=path)
    assert caught.value.reason == "too_large"
