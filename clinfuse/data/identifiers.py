"""A study's own identifiers, masked in its note before anything reads or shows it.

A clinical note often repeats what the DICOM header and the manifest already say about the
patient: the name ("Mrs Smith"), the record number, the date of birth. clinfuse never writes
those from the header (see `clinfuse.data.dicom`), so the note must not carry them into the
model, the explanation files, the store or the dashboard either. `redact` replaces every
occurrence of the study's identifiers in its note (whole words, any case; dates in the usual
spellings) by as many `MASK` characters, so character offsets into the note stay valid.

This masks what the study's own records name. It is not a free-text de-identifier: other
people's names, addresses or telephone numbers written only in the note are not found; run a
dedicated de-identification tool over the notes before they leave the hospital.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from datetime import date

from pydicom.datadict import DicomDictionary, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import ConstrainedList  # MultiValue and Sequence

__all__ = ["MASK", "Identifiers", "header_identifiers", "redact"]

MASK = "█"  # one word to the tokenizer, a character no note vocabulary holds: [UNK]
MIN_NAME = 2  # letters: a name part shorter than this (an initial) is left
MIN_ID = 4  # characters: shorter ids ("12") would mask clinical numbers too
# an id this long is also found as people write it (`id_pattern`)
LONG_ID = 6
# what may stand between an id's digit groups (one or two of them): white space (a line break,
# a no-break space), a hyphen or a dash
ID_SEPARATORS = r"\s\-\u2010-\u2015"

# a surname's particles: masked only with the rest of the surname, not as words of their own
PARTICLES = frozenset(
    "al bin d da das de degli del della den der di do dos du el ibn la le les lo st te ten ter "
    "van vande vanden vander von y zu".split()
)

# PS3.15 basic-profile attributes a note may repeat, by how their values are spelled: every
# person name the standard defines (the patient's, the physicians', the operators', a
# reviewer's, ...; the basic profile removes them all), the patient's ids and birth date
NAME_KEYWORDS = tuple(  # retired ones too: old headers still carry InterpretationAuthor
    sorted(entry[4] for entry in DicomDictionary.values() if entry[0] == "PN" and entry[4])
)
ID_KEYWORDS = ("PatientID", "OtherPatientIDs", "AccessionNumber")
DATE_KEYWORDS = ("PatientBirthDate",)
# sequences whose items name the patient or the people of the study (read one level deep)
IDENTITY_SEQUENCES = (
    "OtherPatientIDsSequence",
    "ReferencedPatientSequence",
    "ReferencedPatientAliasSequence",
    "RequestAttributesSequence",
    "ReferringPhysicianIdentificationSequence",
    "ConsultingPhysicianIdentificationSequence",
    "PhysiciansOfRecordIdentificationSequence",
    "PerformingPhysicianIdentificationSequence",
    "PhysiciansReadingStudyIdentificationSequence",
    "RequestingPhysicianIdentificationSequence",
    "ScheduledPerformingPhysicianIdentificationSequence",
    "OperatorIdentificationSequence",
)
# A letter or digit of a script that spaces its words: Japanese, Chinese and Korean write a
# name against the next word ("山田さん"), so their characters never join it to one.
_WORD = r"[^\W_\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]"
MONTHS = (
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)  # fmt: skip
# Month names of other languages a hospital's notes are written in, written out in full with
# the day before them: "12. März 1948", "12 mars 1948", "1er mars 1948", "12 de marzo de 1948"
OTHER_MONTHS = (
    ("Januar", "Februar", "März", "April", "Mai", "Juni",
     "Juli", "August", "September", "Oktober", "November", "Dezember"),  # German
    ("janvier", "février", "mars", "avril", "mai", "juin",
     "juillet", "août", "septembre", "octobre", "novembre", "décembre"),  # French
    ("enero", "febrero", "marzo", "abril", "mayo", "junio",
     "julio", "agosto", "septiembre", "octubre", "noviembre", "diciembre"),  # Spanish
    ("gennaio", "febbraio", "marzo", "aprile", "maggio", "giugno",
     "luglio", "agosto", "settembre", "ottobre", "novembre", "dicembre"),  # Italian
    ("januari", "februari", "maart", "april", "mei", "juni",
     "juli", "augustus", "september", "oktober", "november", "december"),  # Dutch
)  # fmt: skip


@dataclass(frozen=True)
class Identifiers:
    """Strings a study's note must not show: name parts, ids, dates (of birth)."""

    names: frozenset[str] = frozenset()
    ids: frozenset[str] = frozenset()
    dates: frozenset[date] = frozenset()

    def __or__(self, other: Identifiers) -> Identifiers:
        return Identifiers(self.names | other.names, self.ids | other.ids, self.dates | other.dates)

    @classmethod
    def of_ids(cls, *ids: str | None) -> Identifiers:
        """Identifiers from ids alone (a manifest's patient_id)."""
        return cls(ids=frozenset(i.strip() for i in ids if i and len(i.strip()) >= MIN_ID))

    def spellings(self, text: str = "") -> set[str]:
        """Every string to mask (lower case); with `text`, dates only if it holds their year."""
        found = {n.lower() for n in self.names} | {i.lower() for i in self.ids}
        for day in self.dates:
            if not text or f"{day.year % 100:02d}" in text:
                found |= date_spellings(day)
        return found


def header_identifiers(ds: Dataset) -> Identifiers:
    """The identifiers a DICOM header gives (`NAME_KEYWORDS`, `ID_KEYWORDS`,
    `DATE_KEYWORDS`), also in the items of its `IDENTITY_SEQUENCES`; unreadable values are
    skipped."""
    found = _identifiers(ds)
    for keyword in _present(ds, _SEQUENCE_TAGS):
        for item in _values(ds, keyword):
            if isinstance(item, Dataset):
                found |= _identifiers(item)
    return found


_NAME_TAGS = {tag_for_keyword(keyword): keyword for keyword in NAME_KEYWORDS}
_SEQUENCE_TAGS = {tag_for_keyword(keyword): keyword for keyword in IDENTITY_SEQUENCES}


def _present(ds: Dataset, tags: dict[int, str]) -> list[str]:
    """The keywords of `tags` that `ds` holds (one pass over the few tags, not the header)."""
    return [tags[tag] for tag in tags.keys() & ds.keys()]


def _identifiers(ds: Dataset) -> Identifiers:
    """The names, ids and birth dates of one data set's own elements (not its sequences')."""
    names: set[str] = set()
    for keyword in _present(ds, _NAME_TAGS):
        for value in _values(ds, keyword):
            names |= name_parts(value)
    ids = [v for k in ID_KEYWORDS for v in _values(ds, k)]
    dates = {d for k in DATE_KEYWORDS for v in _values(ds, k) if (d := _da(v))}
    return Identifiers(frozenset(names), Identifiers.of_ids(*ids).ids, frozenset(dates))


def name_parts(value: str) -> set[str]:
    """A PN value's family, given and middle names (each of its alphabetic, ideographic and
    phonetic groups), whole and split at spaces, commas and hyphens; prefixes and suffixes ("Dr",
    "Jr"), initials and a surname's particles alone ("de" of "DE LA CRUZ": masked as words,
    they would hide every "de" and "la" of a French note) are left; a name with an apostrophe
    also without it and with a space for it (O'BRIEN: OBRIEN, O BRIEN)."""
    parts: set[str] = set()
    for group in value.split("="):
        for part in group.split("^")[:3]:
            part = part.strip()
            pieces = [part, *re.split(r"[\s,\-]+", part)]  # "SMITH, JOHN" written in one part
            pieces = [p for p in pieces if p == part or p.casefold() not in PARTICLES]
            parts |= {p for p in pieces if sum(c.isalpha() for c in p) >= MIN_NAME}
    # "O'BRIEN" as notes also write it: OBrien, O Brien (any apostrophe, `fold`); a short one
    # ("D'O") only as written: "DO" would mask every "do" of the note
    apostrophe = "['\u2018\u2019\u02bc]"
    for name in [p for p in parts if re.search(apostrophe, p) and sum(map(str.isalpha, p)) >= 4]:
        parts |= {re.sub(apostrophe, sep, name) for sep in ("", " ")}
    return parts


def date_spellings(day: date) -> set[str]:
    """How a note may write a date (lower case): 19480312, 12031948, 1948-03-12, 12/03/1948,
    3/12/48, 12.3.1948, 12 March 1948, 12th of March 1948, 12-Mar-1948, March 12, 1948,
    Mar. 12th 1948, Sept 3 1948, and in the `OTHER_MONTHS` languages 12. März 1948,
    1er mars 1948, 12 de marzo de 1948, 12 maart 1948, ..."""
    y, yy = str(day.year), f"{day.year % 100:02d}"
    dd, mm = f"{day.day:02d}", f"{day.month:02d}"
    days, months = {dd, str(day.day)}, {mm, str(day.month)}
    found = {f"{y}{mm}{dd}", f"{dd}{mm}{y}", f"{mm}{dd}{y}"}
    for sep in "/-.":
        for d in days:
            for m in months:
                found |= {f"{y}{sep}{m}{sep}{d}"}
                for year in (y, yy):
                    found |= {f"{d}{sep}{m}{sep}{year}", f"{m}{sep}{d}{sep}{year}"}
    full = MONTHS[day.month - 1]
    names = {full, full[:3], f"{full[:3]}."} | ({"Sept", "Sept."} if day.month == 9 else set())
    ordinal = {1: "st", 2: "nd", 3: "rd"}.get(day.day % 10 if day.day // 10 != 1 else 0, "th")
    for month in names:
        for d in {*days, f"{day.day}{ordinal}"}:
            # the year in full: "12 Mar 48" is as often twelve March, forty-eight hours
            found |= {f"{month} {d}, {y}", f"{month} {d} {y}", f"{d} of {month} {y}"}
            found |= {f"{d} {month} {y}", f"{d}-{month}-{y}"}
    for month in {names[day.month - 1] for names in OTHER_MONTHS}:
        for plain in {month, fold(month)}:  # also without accents: "fevrier", "Marz"
            for d in {*days, *(["1er"] if day.day == 1 else [])}:
                found |= {f"{d} {plain} {y}", f"{d}. {plain} {y}", f"{d}.{plain} {y}"}
                found |= {f"{d} de {plain} de {y}"}
    return {s.lower() for s in found}


def redact(note: str | None, identifiers: Identifiers) -> str | None:
    """`note` with each whole-word occurrence of `identifiers` (any case) replaced by as many
    `MASK` characters; the same length, so offsets into it stay valid."""
    if not note:
        return note
    note = _mask_ids(note, identifiers.ids)
    lowered = note.lower()
    spellings = identifiers.spellings(lowered)
    word = _WORD  # a letter or digit next to the match makes it part of another word
    # as written, in any case: every spelling (the cheap test first)
    present = sorted((s for s in spellings if s in lowered), key=len, reverse=True)
    spans = []
    if present:  # longest first: "12 March 1948" before "1948"-like parts
        alternatives = "|".join(re.escape(s) for s in present)
        pattern = re.compile(rf"(?<!{word})(?:{alternatives})(?!{word})", re.IGNORECASE)
        spans += [m.span() for m in pattern.finditer(note)]
    # without diacritics ("Muller" for "MÜLLER" and the reverse, "Ibrahim" for "İBRAHİM"):
    # spellings of FOLD_MIN letters or more, so that "Bär" or "Lê" never hide "bar" or "le"
    folded = fold(note)  # character for character: the same offsets as `note`
    bare = _MARKS.sub("", folded)
    present = sorted(
        {b for s in spellings if len(b := _bare(s)) >= FOLD_MIN and b in bare},
        key=len,
        reverse=True,
    )
    if present:
        marks = _MARKS.pattern  # a decomposed note's accents, between and after the letters
        alternatives = "|".join(marks.join(map(re.escape, s)) + marks for s in present)
        pattern = re.compile(rf"(?<!{word})(?:{alternatives})(?!{word})")
        spans += [m.span() for m in pattern.finditer(folded)]
    if not spans:
        return note
    masked = list(note)
    for start, end in spans:
        masked[start:end] = MASK * (end - start)
    return "".join(masked)


FOLD_MIN = 4  # letters: a shorter name is matched with its diacritics, as written
_MARKS = re.compile(r"[\u0300-\u036f\u1ab0-\u1aff\u1dc0-\u1dff\u20d0-\u20ff\ufe20-\ufe2f]*")
_FOLD_SPECIAL = {"ς": "σ", "ı": "i", "ſ": "s"}  # letters whose other form lower() keeps


class _Folding(dict):
    """A `str.translate` table, one character for one: lower case, a letter without its
    accents where the rest of its canonical decomposition is accents (a Hangul syllable, which
    decomposes into letters, stays), a typographic apostrophe as '; filled in as met."""

    def __missing__(self, code: int) -> str:
        char = chr(code)
        if char in "\u2018\u2019\u02bc":
            out = "'"
        else:
            nfd = unicodedata.normalize("NFD", char)
            base = nfd[0] if all(unicodedata.combining(c) for c in nfd[1:]) else char
            low = base.lower()[:1] or char  # "İ" -> "I" -> "i"
            out = _FOLD_SPECIAL.get(low, low)
        self[code] = out
        return out


_FOLDING = _Folding()


def fold(text: str) -> str:
    """`text` without case, accents or apostrophe style, the same length (`_Folding`)."""
    return text.translate(_FOLDING)


def _bare(spelling: str) -> str:
    """A spelling folded, its accents dropped (a pattern; a note keeps its own, `_MARKS`)."""
    return _MARKS.sub("", fold(spelling))


def _mask_ids(note: str, ids: frozenset[str]) -> str:
    """`note` with its long ids (`LONG_ID`) masked also as people write them (`id_pattern`);
    a shorter id only as written, by `redact`'s whole-word pass: "1530" would otherwise mask
    "15:30", "0125" a dose of "0.125" mg, "12080" a pressure "120/80"."""
    plain = {re.sub(rf"[{ID_SEPARATORS}]", "", value) for value in ids}  # "007-5483" -> "0075483"
    long = [value for value in plain if len(value) >= LONG_ID]
    if not long:
        return note
    squeezed = re.sub(rf"[{ID_SEPARATORS}]", "", note.lower())  # the cheap test
    for value in long:
        if value.lstrip("0").lower() in squeezed:
            pattern = re.compile(id_pattern(value), re.IGNORECASE)
            note = pattern.sub(lambda m: MASK * len(m.group()), note)
    return note


def id_pattern(plain: str) -> str:
    """A regular expression of a long id (`plain`: without separators) as a note may write it:
    with its digit groups apart ("75-483-485", "7548 3485", across a line break), glued to a
    label when it holds a digit ("MRN75483485", "MRNAB123456"; not a word of letters alone),
    and, when it is still long without them, with leading zeros added or dropped
    ("075483485")."""
    sep = f"[{ID_SEPARATORS}]"
    between = f"{sep}{{0,2}}"
    digits = plain.lstrip("0")

    def glued(whole_word: str) -> str:  # a letter end: a label may touch it if a digit is in it
        return "" if any(c.isdigit() for c in plain) else whole_word

    if plain[0].isdigit() and len(digits) >= LONG_ID:
        # up to 4 zeros added: a start in a long run of zeros then scans 4 of them, not all
        body = rf"(?:0{between}){{0,4}}" + between.join(re.escape(c) for c in digits)
        before = r"(?<!\d)"
    else:  # its zeros as written: without them it is short, and would mask other numbers
        body = between.join(re.escape(c) for c in plain)
        before = r"(?<!\d)" if plain[0].isdigit() else glued(rf"(?<!{_WORD})")
    after = r"(?!\d)" if plain[-1].isdigit() else glued(rf"(?!{_WORD})")
    return f"{before}{body}{after}"


def _values(ds: Dataset, keyword: str) -> list:
    """A header attribute's values (a list for multi-valued ones); [] if absent or unreadable.
    An element pydicom has not converted yet is read from its ASCII bytes (converting a few
    elements of every study would cost as much as the rest of reading its header)."""
    try:
        raw = ds.get_item(tag_for_keyword(keyword))
        if raw is None:
            return []
        text = raw.value if isinstance(raw, RawDataElement) else None  # bytes, unconverted
        plain = isinstance(text, bytes) and text.isascii() and b"\x1b" not in text  # ISO 2022
        if plain and not keyword.endswith("Sequence"):  # escapes: pydicom decodes those
            items: list = text.decode("ascii").split("\\")
        else:
            value = ds[keyword].value
            items = list(value) if isinstance(value, (ConstrainedList, list, tuple)) else [value]
    except Exception:
        return []
    items = [v if isinstance(v, Dataset) else str(v).strip(" \x00") for v in items]
    return [v for v in items if isinstance(v, Dataset) or v]


def _da(value: str) -> date | None:
    """A DA value (YYYYMMDD, or ACR-NEMA's YYYY.MM.DD) as a date; None when it is not one."""
    value = value.replace(".", "") if len(value) == 10 else value
    try:
        return date(int(value[:4]), int(value[4:6]), int(value[6:8])) if len(value) == 8 else None
    except ValueError:
        return None
