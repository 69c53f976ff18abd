"""A study's own identifiers are masked in its note: whole words, any case, dates as people
write them, offsets kept; and read from real DICOM headers."""

from datetime import date

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import FileMetaDataset

from clinfuse.data.identifiers import MASK, Identifiers, header_identifiers, name_parts, redact
from clinfuse.data.manifest import load_manifest
from clinfuse.synthetic import make_sample_data
from clinfuse.training.trainer import training_notes

BORN = date(1947, 6, 21)
PATIENT = Identifiers(
    names=frozenset({"Anderson", "Helen"}), ids=frozenset({"62234087"}), dates=frozenset({BORN})
)


def masked(text: str) -> str:
    return MASK * len(text)


@pytest.mark.parametrize(
    "written",
    ["21/06/1947", "06/21/1947", "1947-06-21", "21.6.1947", "6/21/47", "19470621",
     "21 June 1947", "June 21, 1947", "Jun 21 1947", "21-Jun-1947", "21 JUNE 1947",
     "21st June 1947", "June 21st, 1947", "21st of June 1947", "21061947",
     "21. Juni 1947", "21 juin 1947", "21 de junio de 1947", "21 giugno 1947", "21 JUNI 1947"],
)  # fmt: skip
def test_a_birth_date_is_masked_however_the_note_writes_it(written):
    note = f"DOB {written}; seen 12/03/2024, 21 June 47 hours after onset."
    assert redact(note, PATIENT) == (
        f"DOB {masked(written)}; seen 12/03/2024, 21 June 47 hours after onset."
    )


@pytest.mark.parametrize(
    ("header", "note", "expected"),
    [
        (
            "MÜLLER^JOSÉ",
            "Muller, Jose; Müller José; Müllerin",
            "██████, ████; ██████ ████; Müllerin",
        ),
        ("Mu\u0308ller", "Mr Mu\u0308ller, Müller", "Mr ███████, ██████"),  # decomposed Unicode
        ("ΠΑΠΑΔΟΠΟΥΛΟΣ", "Ο ΠΑΠΑΔΟΠΟΥΛΟΣ, Παπαδόπουλος", "Ο ████████████, ████████████"),
        ("김^민수", "민수님은 입원. 미소, 문서.", "██님은 입원. 미소, 문서."),  # Hangul stays whole
        ("YILDIZ^İBRAHİM", "İBRAHİM YILDIZ; Yıldız; ibrahim", "███████ ██████; ██████; ███████"),
        ("O'BRIEN", "O’Brien", "███████"),
        ("Bär^Öz", "2 bar; 8 oz; Bär", "2 bar; 8 oz; ███"),  # short: only with its accents
        ("Lê^An", "Le Fort II; Lê", "Le Fort II; ██"),
    ],
)
def test_a_name_is_found_with_or_without_its_accents_and_no_other_word_is(header, note, expected):
    assert redact(note, Identifiers(names=frozenset(name_parts(header)))) == expected


def test_a_surnames_particles_are_masked_with_it_not_as_words_of_their_own():
    names = name_parts("DE LA CRUZ^MARIA") | name_parts("VAN DER BERG")
    found = Identifiers(names=frozenset(names))
    note = "Patiente de 88 ans, fièvre de la nuit; Mme de la Cruz, M. van der Berg (Berg)."
    assert redact(note, found) == (
        f"Patiente de 88 ans, fièvre de la nuit; Mme {masked('de la Cruz')}, "
        f"M. {masked('van der Berg')} ({masked('Berg')})."
    )


def test_a_name_with_an_apostrophe_is_masked_as_notes_write_it():
    patient = Identifiers(names=frozenset(name_parts("O'BRIEN^SEAN")))
    for written in ("O'Brien", "OBrien", "O Brien", "O\u2019Brien", "obrien"):
        note = f"Mr {written} seen; O Bright and Brien Street are not him."
        assert (
            redact(note, patient)
            == f"Mr {masked(written)} seen; O Bright and Brien Street are not him."
        )
    short = Identifiers(names=frozenset(name_parts("D'O^ANNA")))  # "DO" would hide every "do"
    assert redact("Do not resuscitate; Ms D'O agrees.", short) == (
        "Do not resuscitate; Ms " + masked("D'O") + " agrees."
    )


def test_month_names_of_other_languages_with_and_without_accents():
    first = Identifiers(dates=frozenset({date(1953, 2, 1)}))
    for written in ("1er février 1953", "1 fevrier 1953", "1. Februar 1953", "1 februari 1953"):
        note = f"née le {written}, vue le 1er février 2024"
        assert redact(note, first) == f"née le {masked(written)}, vue le 1er février 2024"


def test_a_header_date_in_the_old_dotted_form_is_read_and_september_is_sept():
    ds = pydicom.Dataset()
    with pydicom.config.disable_value_validation():  # pydicom would warn: not today's form
        ds.PatientBirthDate = "1948.09.03"  # ACR-NEMA's form, still in old archives
    found = header_identifiers(ds)
    assert found.dates == frozenset({date(1948, 9, 3)})
    assert redact("DOB Sept 3rd, 1948", found) == f"DOB {masked('Sept 3rd, 1948')}"


def test_names_and_ids_are_masked_as_whole_words_in_any_case_and_nothing_else_is():
    note = "HELEN anderson (MRN 62234087) told Dr Andersons; Helena's x62234087 and 162234087."
    expected = (
        f"{masked('HELEN')} {masked('anderson')} (MRN {masked('62234087')}) told Dr Andersons; "
        f"Helena's x{masked('62234087')} and 162234087."  # a prefix is not another number
    )
    assert redact(note, PATIENT) == expected
    assert len(redact(note, PATIENT)) == len(note)  # offsets into the note stay valid
    assert redact("No identifiers here.", PATIENT) == "No identifiers here."
    comma = Identifiers(names=frozenset(name_parts("SMITH, JOHN")))  # one part, a comma in it
    assert (
        redact("Mr Smith, seen with John.", comma)
        == f"Mr {masked('Smith')}, seen with {masked('John')}."
    )
    assert redact(None, PATIENT) is None
    # a number id as people write it: glued to its label, grouped, with leading zeros
    spelled = [("MRN", "62234087"), ("MRN: ", "62-234-087"), ("id ", "062234087")]
    spelled += [("", "6223 4087"), ("#", "0-62234087")]
    # across a line break, a no-break space, a dash, two spaces
    spelled += [("", "6223\n4087"), ("", "6223\u00a04087"), ("", "62\u2013234\u2013087")]
    spelled += [("", "6223  4087"), ("Bed 10 ", "6223 4087"), ("1960 ", "062234087")]
    for label, digits in spelled:
        assert redact(f"See {label}{digits}.", PATIENT) == f"See {label}{masked(digits)}."
    # a short id only as written: other spellings of it are the numbers of clinical notes
    numbers = [("12080", "BP 120/80"), ("0315", "seen 2024-03-15"), ("1530", "since 15:30")]
    numbers += [("9837", "HR 98 37.5 C"), ("01234", "at 12:34"), ("0125", "digoxin 0.125 mg")]
    numbers += [("1000", "1.000 g"), ("12345", "1234-5"), ("P0273", "P-0273")]
    for short, text in numbers:
        assert redact(text, Identifiers.of_ids(short)) == text
    # a long id whose zeros make it long is found glued and grouped, its zeros as written
    padded = Identifiers.of_ids("00012345")
    for label, digits in (("MRN", "00012345"), ("MRN ", "0001-2345"), ("MRN ", "00012345")):
        assert redact(f"{label}{digits}", padded) == f"{label}{masked(digits)}"
    assert redact("MRN 12345, 000012345", padded) == "MRN 12345, 000012345"
    # leading zeros only where what is left is still an id: "0038" is not "38" in "38.9 °C"
    assert redact("Id 0038, 38.9 °C", Identifiers.of_ids("0038")) == f"Id {masked('0038')}, 38.9 °C"
    # an id too short to be told from a number is left: "12" would mask "12 mm" too
    assert Identifiers.of_ids("12", "P0273", None) == Identifiers(ids=frozenset({"P0273"}))
    assert redact("12 mm nodule", Identifiers.of_ids("12")) == "12 mm nodule"


def test_a_real_headers_names_ids_and_other_ids_are_read_without_prefixes_or_suffixes():
    plan = pydicom.dcmread(get_testdata_file("rtplan.dcm", download=False))
    found = header_identifiers(plan)  # PatientName "Last^First^mid^pre", PatientID "id00001"
    assert {"Last", "First", "mid"} <= found.names and "pre" not in found.names
    assert "id00001" in found.ids
    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False))
    others = {item.PatientID for item in ct.OtherPatientIDsSequence if len(item.PatientID) >= 4}
    assert {"1CT1", *others} <= header_identifiers(ct).ids
    assert "CompressedSamples" in header_identifiers(ct).names


def test_every_person_name_and_the_identity_sequences_items_are_read():
    ds = pydicom.Dataset()
    ds.PatientName = "Quist^Ada"
    ds.RequestingPhysician = "Varga^Imre"
    ds.PhysiciansOfRecord = ["Okafor^Chidi", "Lindqvist^Maja"]
    ds.ConsultingPhysicianName = "Brandt^Olaf"
    ds.ReviewerName = "Ferreira^Ines"
    ds.add_new(0x4008010C, "PN", "Szabo^Anna")  # InterpretationAuthor: retired, still written
    request = pydicom.Dataset()
    request.RequestingPhysician = "Haddad^Samir"
    request.AccessionNumber = "ACC778899"
    ds.RequestAttributesSequence = [request]
    referenced = pydicom.Dataset()
    referenced.PatientName = "Quist-Berg^Ada"
    referenced.PatientID = "OLD445566"
    ds.ReferencedPatientSequence = [referenced]
    found = header_identifiers(ds)
    people = {"Varga", "Okafor", "Lindqvist", "Brandt", "Ferreira", "Haddad", "Berg", "Szabo"}
    assert people <= found.names and {"ACC778899", "OLD445566"} <= found.ids
    note = "Dr Varga and Dr Haddad (ordered by Okafor) reviewed Ms Quist-Berg, acc ACC778899."
    assert redact(note, found) == (
        f"Dr {masked('Varga')} and Dr {masked('Haddad')} (ordered by {masked('Okafor')}) "
        f"reviewed Ms {masked('Quist-Berg')}, acc {masked('ACC778899')}."
    )


def test_an_id_with_letters_and_digits_is_masked_glued_to_a_label_on_either_side():
    ids = Identifiers.of_ids("KANPID4471", "4471KANX", "ABCDEFG")
    for text in ("MRNKANPID4471", "MRN:KANPID4471", "KANPID4471MRN", "MRN4471KANX"):
        label = text.replace("KANPID4471", "").replace("4471KANX", "")
        assert redact(text, ids).count(MASK) == len(text) - len(label)
    # an id of letters alone stays a whole word: "ABCDEFGH" is another word
    assert redact("ABCDEFGH xABCDEFG ABCDEFG", ids) == f"ABCDEFGH xABCDEFG {masked('ABCDEFG')}"


def test_a_non_ascii_name_is_read_in_the_files_character_set(tmp_path):
    ds = pydicom.Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = "Müller-Lüdenscheidt^Jürgen"
    ds.PatientBirthDate = "19470621"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.save_as(tmp_path / "x.dcm")
    found = header_identifiers(pydicom.dcmread(tmp_path / "x.dcm", force=True))
    assert {"Müller-Lüdenscheidt", "Müller", "Lüdenscheidt", "Jürgen"} <= found.names
    note = "Herr Lüdenscheidt, geboren 21.06.1947."
    assert redact(note, found) == f"Herr {masked('Lüdenscheidt')}, geboren {masked('21.06.1947')}."


def test_the_tokenizer_is_trained_on_masked_notes(tmp_path):
    make_sample_data(tmp_path, n=6, seed=3, size=32)
    rows = list(load_manifest(tmp_path / "manifest.csv"))
    row = next(r for r in rows if r.image is not None and r.note_path is not None)
    family = str(pydicom.dcmread(row.image, stop_before_pixels=True).PatientName).split("^")[0]
    clinical = row.note_path.read_text(encoding="utf-8")
    row.note_path.write_text(f"{family} {row.patient_id}: {clinical}", encoding="utf-8")
    notes = dict(training_notes([row]))
    assert notes[row.patient_id] == f"{masked(family)} {masked(row.patient_id)}: {clinical}"


def test_a_japanese_name_in_iso_2022_is_read_as_written_and_masked():
    """ISO 2022 escapes keep the kanji in 7-bit bytes: read as plain ASCII they would be
    nonsense and the name would go unmasked."""
    from pydicom.data import get_charset_files

    found = header_identifiers(pydicom.dcmread(get_charset_files("chrH31.dcm")[0]))
    assert {"Yamada", "Tarou", "山田", "太郎", "やまだ", "たろう"} <= found.names
    assert (
        redact("山田 太郎さん、発熱あり。", found)
        == f"{masked('山田')} {masked('太郎')}さん、発熱あり。"
    )
