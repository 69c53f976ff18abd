"""Who the synthetic patients are, what each study shows, and the rules that make the labels.

The latent facts of a study (heart size, effusion, an opacity and its side, infection signs
and their side, decoys, how its DICOM is encoded) are drawn here; the labels follow from
them by `true_labels`, and `observed_labels` adds the noise a real export carries.
Sides are always the patient's ("left"/"right").
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, timedelta

import numpy as np

LABELS = ("cardiomegaly", "effusion", "copd", "diabetes", "pneumonia", "mass")
SIDES = ("left", "right")

FAMILY_NAMES = (
    "Smith", "Johnson", "Williams", "Brown", "Jones", "Garcia", "Miller", "Davis", "Martin",
    "Lopez", "Wilson", "Anderson", "Taylor", "Thomas", "Moore", "Jackson", "Lee", "Walker",
)  # fmt: skip
GIVEN_NAMES = {
    "F": ("Mary", "Patricia", "Linda", "Susan", "Karen", "Nancy", "Helen", "Ruth", "Anna"),
    "M": ("James", "Robert", "John", "Michael", "David", "William", "Richard", "Joseph", "Paul"),
}

STUDIES_PER_PATIENT = ((1, 0.75), (2, 0.15), (3, 0.06), (4, 0.04))  # mean ~1.39
P_COPD, P_DIABETES = 0.25, 0.25  # per patient
P_CARDIOMEGALY, P_EFFUSION, P_OPACITY = 0.25, 0.20, 0.50  # per study
# Infection signs (with a side) in the note, independent of the opacity and of its side, so
# neither side alone tells pneumonia (same side) from mass (no infection) or from neither
# (infection on the other side, or no opacity): each single-side ceiling is ~0.79-0.83 AUROC.
P_INFECTION = 0.5
P_NO_IMAGE, P_NO_NOTE = 0.04, 0.04
P_UNKNOWN, P_FLIP = 0.03, 0.02  # per manifest label cell
P_DECOY = {"marker": 0.45, "line": 0.35, "ecg": 0.4}
FIRST_STUDY_DAY = date(2022, 1, 3)


@dataclass(frozen=True)
class Patient:
    """A patient: identifiers that belong in DICOM headers only, and chronic conditions."""

    patient_id: str  # the export's pseudonymous id, e.g. "P0001"
    mrn: str  # hospital record number, in DICOM PatientID
    name: str  # DICOM PN "Family^Given"
    sex: str  # "M" | "F"
    birth_date: date
    copd: bool
    diabetes: bool


@dataclass(frozen=True)
class Study:
    """One study's latent truth, including how its image file is encoded."""

    study_id: str
    index: int  # 0-based position; seeds this study's image and note
    patient: Patient
    study_date: date
    ctr: float  # cardiothoracic ratio
    effusion_side: str  # "" = no effusion
    opacity_side: str  # "" = no opacity
    infection_side: str  # "" = no infection signs in the note
    marker: bool
    line: bool
    ecg: bool
    view: str  # "PA" | "AP"
    modality: str  # "DX" | "CR"
    photometric: str  # "MONOCHROME2" | "MONOCHROME1"
    rescale: tuple[float, float]  # (slope, intercept); (1.0, 0.0) = identity
    compression: str  # "none" | "rle" | "j2k"
    has_image: bool
    has_note: bool

    @property
    def age(self) -> int:
        """Age in whole years on the study date."""
        born = self.patient.birth_date
        before_birthday = (self.study_date.month, self.study_date.day) < (born.month, born.day)
        return self.study_date.year - born.year - before_birthday


def true_labels(study: Study) -> dict[str, bool]:
    """The noise-free labels: the rules every quality bar is measured against."""
    opacity, infection = bool(study.opacity_side), bool(study.infection_side)
    return {
        "cardiomegaly": study.ctr >= 0.5,
        "effusion": bool(study.effusion_side),
        "copd": study.patient.copd,
        "diabetes": study.patient.diabetes,
        "pneumonia": opacity and infection and study.infection_side == study.opacity_side,
        "mass": opacity and not infection,
    }


def sample_cohort(n: int, seed: int) -> list[Study]:
    """`n` studies of about n/1.4 patients; a patient's studies are scattered over the ids."""
    rng = np.random.default_rng([seed, 1])
    counts, probs = zip(*STUDIES_PER_PATIENT, strict=True)
    patients: list[Patient] = []
    slots: list[Patient] = []
    while len(slots) < n:
        patient = _sample_patient(len(patients) + 1, rng)
        patients.append(patient)
        slots += [patient] * int(rng.choice(counts, p=probs))
    slots = slots[:n]
    order = rng.permutation(n)
    width = max(5, len(str(n)))
    study_rng = np.random.default_rng([seed, 2])
    return [_sample_study(f"S{i + 1:0{width}d}", i, slots[order[i]], study_rng) for i in range(n)]


def observed_labels(studies: list[Study], seed: int) -> list[dict[str, str]]:
    """Manifest label cells: the truth with ~2% flipped and ~3% left unknown ("")."""
    rng = np.random.default_rng([seed, 3])
    rows = []
    for study in studies:
        row = {}
        for label, value in true_labels(study).items():
            unknown, flip = rng.random() < P_UNKNOWN, rng.random() < P_FLIP
            row[label] = "" if unknown else str(int(value != flip))
        rows.append(row)
    return rows


def _sample_patient(number: int, rng: np.random.Generator) -> Patient:
    sex = str(rng.choice(["F", "M"]))
    name = f"{rng.choice(FAMILY_NAMES)}^{rng.choice(GIVEN_NAMES[sex])}"
    born = date(1935, 1, 1) + timedelta(days=int(rng.integers(0, 365 * 63)))
    return Patient(
        patient_id=f"P{number:04d}",
        mrn=f"{int(rng.integers(10_000_000, 99_999_999))}",
        name=name,
        sex=sex,
        birth_date=born,
        copd=bool(rng.random() < P_COPD),
        diabetes=bool(rng.random() < P_DIABETES),
    )


def _sample_study(study_id: str, index: int, patient: Patient, rng: np.random.Generator) -> Study:
    cardiomegaly = rng.random() < P_CARDIOMEGALY
    ctr = rng.uniform(0.55, 0.65) if cardiomegaly else rng.uniform(0.38, 0.48)
    effusion_side = _side(rng) if rng.random() < P_EFFUSION else ""
    opacity_side = _side(rng) if rng.random() < P_OPACITY else ""
    infection_side = _side(rng) if rng.random() < P_INFECTION else ""
    decoys = {name: bool(rng.random() < p) for name, p in P_DECOY.items()}
    style = rng.random()  # MONOCHROME1 and rescaling never together (see README)
    photometric = "MONOCHROME1" if style < 0.15 else "MONOCHROME2"
    rescale = (1.0, 0.0)
    if 0.15 <= style < 0.40:
        rescale = (1.0, -1024.0) if rng.random() < 0.6 else (2.0, -1024.0)
    codec = rng.random()
    compression = "rle" if codec < 0.15 else "j2k" if codec < 0.25 else "none"
    missing = rng.random()
    return Study(
        study_id=study_id,
        index=index,
        patient=patient,
        study_date=FIRST_STUDY_DAY + timedelta(days=int(rng.integers(0, 1000))),
        ctr=round(float(ctr), 3),
        effusion_side=effusion_side,
        opacity_side=opacity_side,
        infection_side=infection_side,
        view="AP" if rng.random() < 0.3 else "PA",
        modality="CR" if rng.random() < 0.4 else "DX",
        photometric=photometric,
        rescale=rescale,
        compression=compression,
        has_image=missing >= P_NO_IMAGE,
        has_note=not (P_NO_IMAGE <= missing < P_NO_IMAGE + P_NO_NOTE),
        **decoys,
    )


def _side(rng: np.random.Generator) -> str:
    return SIDES[int(rng.integers(0, 2))]
