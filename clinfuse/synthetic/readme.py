"""The README that travels with a synthetic export: how it was made and what it contains."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from clinfuse.synthetic.cohort import LABELS, P_DECOY, Study

DEPENDS_ON = {
    "cardiomegaly": "image only: heart width / thorax width >= 0.5 (drawn 0.55-0.65 vs 0.38-0.48)",
    "effusion": "image only: fluid with a meniscus at one lung base",
    "copd": "note only (patient-level): 'history of COPD', 'emphysema on home oxygen', ...",
    "diabetes": "note only (patient-level): 'type 2 diabetes on metformin', ...",
    "pneumonia": "both: an opacity in one lung AND infection signs in the note on the SAME side",
    "mass": "both: an opacity AND no infection signs in the note",
}


def write_readme(
    path: Path,
    studies: list[Study],
    truths: list[dict[str, bool]],
    observed: list[dict[str, str]],
    *,
    n: int,
    seed: int,
    size: int,
) -> None:
    """Write README.md (deterministic: every number in it comes from the data)."""
    patients = {s.patient.patient_id for s in studies}
    several = Counter(s.patient.patient_id for s in studies)
    rows = []
    for label in LABELS:
        true_rate = sum(t[label] for t in truths) / n
        cells = [o[label] for o in observed]
        known = [c for c in cells if c]
        rows.append(
            f"| {label} | {DEPENDS_ON[label]} | {true_rate:.1%} | "
            f"{known.count('1') / max(len(known), 1):.1%} | {cells.count('')} |"
        )
    imaged = [s for s in studies if s.has_image]
    opacity = [s for s in studies if s.opacity_side]
    infected = [s for s in opacity if s.infection_side]
    other_side = sum(s.infection_side != s.opacity_side for s in infected)
    lines = [
        "# Synthetic chest-radiograph export (clinfuse sample data)",
        "",
        "Entirely synthetic: every image, note, name, record number and date is invented.",
        "Decision support demo data, not clinical data.",
        "",
        "Made by (same arguments give byte-identical files):",
        "",
        "```",
        f"clinfuse sample-data <this folder> --n {n} --seed {seed} --size {size}",
        f"# or: make_sample_data('<this folder>', n={n}, seed={seed}, size={size})",
        "#     from clinfuse.synthetic",
        "```",
        "",
        f"{n} studies of {len(patients)} patients "
        f"({sum(c > 1 for c in several.values())} with several studies); "
        f"{sum(s.has_image for s in studies)} images, {sum(s.has_note for s in studies)} notes.",
        "",
        "## Files",
        "",
        "| path | content |",
        "|---|---|",
        "| `manifest.csv` | one row a study: study_id, patient_id, image, note_path, labels "
        "(`1`/`0`/empty = unknown); empty image or note_path = that modality is missing |",
        f"| `images/<study_id>.dcm` | one {size}x{size} 12-bit chest radiograph (DX or CR) |",
        "| `notes/<study_id>.txt` | the clinical note, UTF-8 |",
        "| `ground_truth/truth.csv` | noise-free labels for every study plus the latent "
        "factors (opacity and its side, infection signs and their side, decoys, encoding) |",
        "| `ground_truth/masks.npz` | `<study_id>/<label>` -> uint8 mask on the DICOM pixel "
        "grid, for each true positive of cardiomegaly (heart), effusion (fluid), pneumonia "
        "and mass (the opacity, > 30% of its peak) in studies with an image |",
        "| `ground_truth/rationales.jsonl` | per true positive note-dependent label: "
        "character `spans` `[start, end)` into the note text and the `text` they cover |",
        "",
        "## Labels",
        "",
        "| label | depends on | true prevalence | manifest positive rate (known cells) "
        "| unknown cells |",
        "|---|---|---|---|---|",
        *rows,
        "",
        f"Opacities in {len(opacity)} studies; {len(infected)} of them with infection signs, "
        f"{other_side} of those on the other side (an indeterminate case: neither pneumonia "
        "nor mass). Infection signs without any opacity are neither, too. Infection signs "
        "are drawn independently of the opacity and its side, so neither the image nor the "
        "note alone separates pneumonia or mass from the rest (best possible AUROC from one "
        "side about 0.78 for pneumonia and 0.82-0.85 for mass).",
        "Rationales: copd and diabetes -> the phrase; pneumonia -> the infection words and "
        "the side word; mass -> the negation phrase ('Denies fever or cough') when the note "
        "has one, otherwise no rationale is recorded.",
        "",
        "## Conventions",
        "",
        "- Sides are the patient's. Images are displayed as on a viewing box: the patient's "
        "right is on the image's left (PatientOrientation `L\\F`).",
        "- Bright = dense after the modality LUT and MONOCHROME1 inversion. "
        f"{_count(imaged, 'photometric', 'MONOCHROME1')} files are MONOCHROME1 "
        "(stored = 4095 - value, window centre mirrored); "
        f"{sum(s.rescale != (1.0, 0.0) for s in imaged)} carry RescaleSlope/Intercept "
        "(1/-1024 or 2/-1024; never together with MONOCHROME1). Applying both gives every "
        "image the same intensity scale.",
        f"- Encodings: {_count(imaged, 'compression', 'none')} explicit VR little endian, "
        f"{_count(imaged, 'compression', 'rle')} RLE Lossless, "
        f"{_count(imaged, 'compression', 'j2k')} JPEG 2000 Lossless.",
        "- The manifest has no split column: split by patient (copd and diabetes are patient "
        "attributes, so a study-level split leaks them).",
        "",
        "## Deliberately hard",
        "",
        "- Decoys as bright as a lesion and independent of every label (share of studies): "
        "a lead marker "
        f"(`L`/`R` glyph, {P_DECOY['marker']:.0%}), a line/tube into the mediastinum "
        f"({P_DECOY['line']:.0%}), an ECG button that may sit over a lung "
        f"({P_DECOY['ecg']:.0%}).",
        "- Pneumonia versus mass needs both modalities, and pneumonia needs the note's side "
        "related to where the opacity is in the image.",
        "- Indications ('Rule out pneumonia.', 'Evaluate for effusion.') are independent of "
        "the labels; negatives name the condition ('No history of COPD.'); side words appear "
        "in unrelated contexts ('left knee replacement', 'Right-sided chest wall pain').",
        "- AP films enlarge the heart (CTR drawn +0.03); the label follows the true size.",
        "- About 2% of manifest label cells are flipped and 3% empty; about 4% of studies "
        "have no image and 4% no note (their labels are still the truth).",
        "- Notes contain non-ASCII characters (`\u00b0C`, `SpO\u2082`): spans are character, "
        "not byte, offsets.",
        "",
    ]
    path.write_bytes("\n".join(lines).encode("utf-8"))


def _count(studies: list[Study], attribute: str, value: str) -> int:
    return sum(getattr(s, attribute) == value for s in studies)
