"""Short clinical notes (indication, history, exam) that carry what the image cannot show.

A note is built from pieces, some tagged with the role they play as evidence ("copd",
"diabetes", "infection", "side", "negation"), so the character span of every piece of
evidence is known exactly. `rationale_spans` turns roles into per-label rationales.
Notes mention age and sex but never a name, record number or date.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from clinfuse.synthetic.cohort import Study

# The roles whose spans justify each note-dependent label (when the label is truly positive).
EVIDENCE_ROLES = {
    "copd": ("copd",),
    "diabetes": ("diabetes",),
    "pneumonia": ("infection", "side"),
    "mass": ("negation",),
}

INDICATIONS = (
    "Rule out pneumonia.", "Evaluate for effusion.", "Chest pain.", "Pre-operative film.",
    "Follow-up.", "Shortness of breath.", "Routine admission film.", "Fall, rule out rib fracture.",
    "Right-sided chest wall pain after a fall.", "Left shoulder pain.",
)  # fmt: skip
COPD_PHRASES = (
    "history of COPD", "emphysema on home oxygen", "COPD on inhalers",
    "chronic obstructive pulmonary disease",
)  # fmt: skip
DIABETES_PHRASES = (
    "type 2 diabetes on metformin", "insulin-dependent diabetes", "diabetes mellitus type 2",
    "diet-controlled diabetes",
)  # fmt: skip
OTHER_HISTORY = (
    "hypertension", "remote appendectomy", "former smoker", "hyperlipidaemia",
    "atrial fibrillation", "hypothyroidism", "osteoarthritis", "left knee replacement",
    "right hip replacement", "right rotator cuff repair", "left cataract surgery",
)  # fmt: skip
SYMPTOMS = ("productive cough", "rigors", "purulent sputum", "new cough")
# (sign, text before the side word, text after it); the sign and the side are evidence.
SIGNS = (
    ("crackles", " at the ", " base"),
    ("decreased breath sounds", " on the ", ""),
    ("bronchial breathing", " over the ", " lower zone"),
    ("coarse crackles", " in the ", " mid zone"),
)
NEGATIONS = ("Denies fever or cough", "Afebrile, no cough", "No fever, cough or sputum")
CLEAR_EXAMS = ("Lungs clear to auscultation.", "Chest clear.", "Mild ankle oedema.")

Piece = tuple[str, str]  # (text, role); role "" = not evidence


@dataclass(frozen=True)
class Note:
    """A note's text and the character spans of each evidence role in it."""

    text: str
    spans: dict[str, list[tuple[int, int]]]  # role -> [(start, end), ...] into text


def write_note(study: Study, rng: np.random.Generator) -> Note:
    """2-5 short sentences: indication, history, chronic negatives, symptoms/exam, extras."""
    sentences: list[list[Piece]] = [[(_pick(rng, INDICATIONS), "")]]
    sentences.append(_history(study, rng))
    negatives = _chronic_negatives(study, rng)
    if negatives:
        sentences.append(negatives)
    if study.infection_side:
        sentences += _infection(study.infection_side, rng)
    elif rng.random() < 0.5:
        sentences.append([(_pick(rng, NEGATIONS), "negation"), (".", "")])
    elif rng.random() < 0.5:
        sentences.append([(_pick(rng, CLEAR_EXAMS), "")])
    if len(sentences) < 5 and rng.random() < 0.2:
        sentences.append([(f"SpO\u2082 {int(rng.integers(90, 99))}% on room air.", "")])
    return _join(sentences[:5])


def rationale_spans(note: Note, labels: dict[str, bool]) -> dict[str, list[tuple[int, int]]]:
    """Per truly-positive note-dependent label, its evidence spans (labels without any omitted)."""
    rationales = {}
    for label, roles in EVIDENCE_ROLES.items():
        spans = sorted(span for role in roles for span in note.spans.get(role, []))
        if labels[label] and spans:
            rationales[label] = spans
    return rationales


def _history(study: Study, rng: np.random.Generator) -> list[Piece]:
    """ "67-year-old woman with X, Y and Z." with the chronic conditions among the items."""
    items: list[Piece] = []
    if study.patient.copd:
        items.append((_pick(rng, COPD_PHRASES), "copd"))
    if study.patient.diabetes:
        items.append((_pick(rng, DIABETES_PHRASES), "diabetes"))
    n_other = int(rng.choice([0, 1, 1, 2]))
    items += [(str(h), "") for h in rng.choice(OTHER_HISTORY, size=n_other, replace=False)]
    items = [items[i] for i in rng.permutation(len(items))]
    person = "woman" if study.patient.sex == "F" else "man"
    pieces: list[Piece] = [(f"{study.age}-year-old {person}", "")]
    for i, item in enumerate(items):
        glue = " with " if i == 0 else " and " if i == len(items) - 1 else ", "
        pieces += [(glue, ""), item]
    return [*pieces, (".", "")]


def _chronic_negatives(study: Study, rng: np.random.Generator) -> list[Piece]:
    """Sometimes state that a chronic condition is absent ("No history of COPD.")."""
    no_copd = not study.patient.copd and rng.random() < 0.3
    no_diabetes = not study.patient.diabetes and rng.random() < 0.3
    if no_copd and no_diabetes:
        return [("No history of COPD or diabetes.", "")]
    if no_copd:
        return [(_pick(rng, ("No history of COPD.", "Never diagnosed with COPD.")), "")]
    if no_diabetes:
        return [(_pick(rng, ("No diabetes.", "Not diabetic.")), "")]
    return []


def _infection(side: str, rng: np.random.Generator) -> list[list[Piece]]:
    """Infection signs with a side, e.g. "Fever to 38.9 °C and productive cough; crackles
    at the left base." or "Productive cough. Decreased breath sounds on the right." """
    symptoms: list[Piece] = []
    if rng.random() < 0.7:
        symptoms.append((f"Fever to {rng.uniform(38.1, 39.8):.1f} \u00b0C", "infection"))
    if not symptoms or rng.random() < 0.6:
        symptom = _pick(rng, SYMPTOMS)
        symptoms.append((symptom if symptoms else symptom.capitalize(), "infection"))
    if len(symptoms) == 2:
        symptoms.insert(1, (" and ", ""))
    sign, before, after = SIGNS[int(rng.integers(len(SIGNS)))]
    exam: list[Piece] = [(sign, "infection"), (before, ""), (side, "side"), (after, "")]
    if rng.random() < 0.5:
        return [[*symptoms, ("; ", ""), *exam, (".", "")]]
    return [[*symptoms, (".", "")], [(sign.capitalize(), "infection"), *exam[1:], (".", "")]]


def _join(sentences: list[list[Piece]]) -> Note:
    """Concatenate pieces (sentences separated by one space), recording each role's spans."""
    text, spans = "", {}
    for number, sentence in enumerate(sentences):
        if number:
            text += " "
        for piece, role in sentence:
            if role:
                spans.setdefault(role, []).append((len(text), len(text) + len(piece)))
            text += piece
    return Note(text=text, spans=spans)


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]
