"""Write the synthetic hospital export: DICOM files, notes, the manifest and the ground truth.

Same (n, seed, size) gives byte-identical files: every random draw comes from a generator
seeded by (seed, purpose, study), UIDs are hashes of fixed strings, dates are drawn, not read
from the clock, compression uses one fixed encoder per syntax, and every table is sorted.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)

from clinfuse.errors import ClinfuseError
from clinfuse.synthetic.cohort import LABELS, Study, observed_labels, sample_cohort, true_labels
from clinfuse.synthetic.images import ImageSpec, Rendering, render_chest
from clinfuse.synthetic.notes import Note, rationale_spans, write_note
from clinfuse.synthetic.readme import write_readme

# The ground-truth region of each image-dependent label (a key of `Rendering.masks`).
MASK_OF_LABEL = {
    "cardiomegaly": "heart",
    "effusion": "effusion",
    "pneumonia": "opacity",
    "mass": "opacity",
}
SOP_CLASS = {"DX": "1.2.840.10008.5.1.4.1.1.1.1", "CR": "1.2.840.10008.5.1.4.1.1.1"}
MANUFACTURERS = (
    ("Acme Radiography", "AR-400"),
    ("Northfield Medical", "Lumen DR"),
    ("Keystone Imaging", "KX Digital"),
)
FIELD_OF_VIEW_MM = 430.0
# Physical (after the modality LUT) value = OFFSET + density * GAIN, kept within 0..3071 so
# that even intercept -1024 leaves the stored value inside 12 bits.
OFFSET, GAIN, NOISE, PHYSICAL_MAX, STORED_MAX = 150.0, 2800.0, 20.0, 3071, 4095
WINDOW = (OFFSET + 0.4 * GAIN, 2400.0)  # (centre, width) in physical units
IMPLEMENTATION_UID = generate_uid(entropy_srcs=["clinfuse synthetic sample data"])
AP_MAGNIFICATION = 0.03  # an AP film enlarges the heart: added to the CTR as drawn


@dataclass(frozen=True)
class SampleDataSummary:
    """What `make_sample_data` wrote (the CLI prints it)."""

    out_dir: Path
    manifest: Path
    readme: Path
    ground_truth: Path
    n_studies: int
    n_patients: int
    n_images: int
    n_notes: int
    prevalence: dict[str, float] = field(default_factory=dict)  # noise-free, over all studies

    def __str__(self) -> str:
        rates = ", ".join(f"{k} {v:.0%}" for k, v in self.prevalence.items())
        return (
            f"wrote {self.n_studies} studies of {self.n_patients} patients to {self.out_dir}\n"
            f"  {self.n_images} DICOM images, {self.n_notes} notes\n"
            f"  manifest: {self.manifest}\n  ground truth: {self.ground_truth}\n"
            f"  true prevalence: {rates}"
        )


def make_sample_data(
    out_dir: str | Path, n: int = 1000, seed: int = 0, size: int = 96
) -> SampleDataSummary:
    """Write `n` synthetic chest studies (size x size images, notes, labels) into `out_dir`.

    `out_dir` must be empty, missing, or a previous export (whose files are replaced).
    """
    if n < 1 or size < 32:
        raise ValueError(f"need n >= 1 and size >= 32, got n={n}, size={size}")
    out = Path(out_dir)
    _prepare(out)
    studies = sample_cohort(n, seed)
    truths = [true_labels(s) for s in studies]
    masks: dict[str, np.ndarray] = {}
    rationales: list[dict] = []
    for study, truth in zip(studies, truths, strict=True):
        if study.has_image:
            rendering = _render(study, seed, size)
            _write_dicom(study, rendering, seed, out / "images" / f"{study.study_id}.dcm")
            for label, region in MASK_OF_LABEL.items():
                if truth[label]:
                    masks[f"{study.study_id}/{label}"] = rendering.masks[region].astype(np.uint8)
        if study.has_note:
            note = write_note(study, np.random.default_rng([seed, 5, study.index]))
            (out / "notes" / f"{study.study_id}.txt").write_bytes(note.text.encode("utf-8"))
            rationales += _rationale_rows(study, note, truth)
    observed = observed_labels(studies, seed)
    _write_truth(out / "ground_truth" / "truth.csv", studies, truths)
    _write_masks(out / "ground_truth" / "masks.npz", masks)
    lines = [json.dumps(row, sort_keys=True, ensure_ascii=False) for row in rationales]
    (out / "ground_truth" / "rationales.jsonl").write_bytes(
        "".join(f"{x}\n" for x in lines).encode()
    )
    write_readme(out / "README.md", studies, truths, observed, n=n, seed=seed, size=size)
    _write_manifest(out / "manifest.csv", studies, observed)  # last: the export is complete
    return SampleDataSummary(
        out_dir=out,
        manifest=out / "manifest.csv",
        readme=out / "README.md",
        ground_truth=out / "ground_truth",
        n_studies=n,
        n_patients=len({s.patient.patient_id for s in studies}),
        n_images=sum(s.has_image for s in studies),
        n_notes=sum(s.has_note for s in studies),
        prevalence={label: sum(t[label] for t in truths) / n for label in LABELS},
    )


def _prepare(out: Path) -> None:
    """Create the layout; clear the files of a previous export, finished or interrupted (its
    marker file says so); refuse any other content."""
    marker = out / MARKER
    ours = [out / "manifest.csv", out / "README.md", *(out / "ground_truth").glob("*")]
    ours += [*(out / "images").glob("*.dcm"), *(out / "notes").glob("*.txt")]
    previous = marker.is_file() or (out / "ground_truth" / "truth.csv").is_file()
    if out.is_dir() and not previous and any(not p.name.startswith(".") for p in out.iterdir()):
        raise ClinfuseError(
            f"{out}: not empty and not a previous sample export; choose an empty folder"
        )
    for path in ours:
        if path.is_file():
            path.unlink()
    for sub in ("images", "notes", "ground_truth"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    marker.write_text("written by clinfuse sample-data; a rerun may replace this folder\n")


def _render(study: Study, seed: int, size: int) -> Rendering:
    spec = ImageSpec(
        ctr=study.ctr + (AP_MAGNIFICATION if study.view == "AP" else 0.0),
        effusion_side=study.effusion_side,
        opacity_side=study.opacity_side,
        marker=study.marker,
        line=study.line,
        ecg=study.ecg,
    )
    return render_chest(spec, size, np.random.default_rng([seed, 4, study.index]))


def _stored_pixels(study: Study, density: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Density -> physical values -> stored uint16 values (rescale inverted, MONOCHROME1)."""
    gain = GAIN * rng.uniform(0.95, 1.05)  # exposure varies a little between studies
    physical = OFFSET + density * gain + rng.normal(0.0, NOISE, density.shape)
    physical = np.clip(np.rint(physical), 0, PHYSICAL_MAX)
    slope, intercept = study.rescale
    stored = np.rint((physical - intercept) / slope)
    if study.photometric == "MONOCHROME1":
        stored = STORED_MAX - stored
    return stored.astype(np.uint16)


def _write_dicom(study: Study, rendering: Rendering, seed: int, path: Path) -> None:
    """One DICOM file: realistic headers, then uncompressed, RLE or JPEG 2000 lossless."""
    rng = np.random.default_rng([seed, 6, study.index])
    pixels = _stored_pixels(study, rendering.density, rng)
    patient = study.patient

    def uid(kind: str) -> str:
        return generate_uid(entropy_srcs=["clinfuse-sample-data", str(seed), study.study_id, kind])

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SOP_CLASS[study.modality]
    ds.file_meta.MediaStorageSOPInstanceUID = uid("sop")
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = IMPLEMENTATION_UID  # not pydicom's: version-proof bytes
    ds.file_meta.ImplementationVersionName = "CLINFUSE_SYNTH"
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SOPClassUID = SOP_CLASS[study.modality]
    ds.SOPInstanceUID = uid("sop")
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = study.study_date.strftime("%Y%m%d")
    hour, minute, second = (int(x) for x in rng.integers([7, 0, 0], [20, 60, 60]))
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = f"{hour:02d}{minute:02d}{second:02d}"
    ds.AccessionNumber = f"A{int(rng.integers(1_000_000, 9_999_999))}"
    ds.Modality = study.modality
    ds.Manufacturer, ds.ManufacturerModelName = MANUFACTURERS[int(rng.integers(3))]
    ds.InstitutionName = "Synthetic General Hospital"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "XR CHEST 1 VIEW"
    ds.SeriesDescription = f"CHEST {study.view}"
    ds.PatientName = patient.name
    ds.PatientID = patient.mrn
    ds.PatientBirthDate = patient.birth_date.strftime("%Y%m%d")
    ds.PatientSex = patient.sex
    ds.PatientAge = f"{study.age:03d}Y"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = study.view
    ds.StudyInstanceUID = uid("study")
    ds.SeriesInstanceUID = uid("series")
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PatientOrientation = ["L", "F"]  # columns run to the patient's left, rows to the feet
    if study.modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
    spacing = f"{FIELD_OF_VIEW_MM / pixels.shape[0]:.6g}"
    ds.PixelSpacing = ds.ImagerPixelSpacing = [spacing, spacing]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = study.photometric
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    centre, width = WINDOW
    if study.photometric == "MONOCHROME1":
        centre = STORED_MAX - centre
    ds.WindowCenter, ds.WindowWidth = f"{centre:.0f}", f"{width:.0f}"
    ds.VOILUTFunction = "LINEAR"
    if study.rescale != (1.0, 0.0):
        ds.RescaleSlope, ds.RescaleIntercept = f"{study.rescale[0]:g}", f"{study.rescale[1]:g}"
        ds.RescaleType = "US"
    ds.BurnedInAnnotation = "NO"
    _set_pixel_data(ds, pixels, study.compression)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    path.write_bytes(buffer.getvalue())


def _set_pixel_data(ds: Dataset, pixels: np.ndarray, compression: str) -> None:
    """Store `pixels` raw, or compressed by one fixed encoder per syntax (same bytes every run)."""
    if compression == "none":
        ds.PixelData = pixels.astype("<u2").tobytes()
        return
    syntax, plugin = (
        (RLELossless, "pydicom") if compression == "rle" else (JPEG2000Lossless, "pylibjpeg")
    )
    openjpeg_log = logging.getLogger("openjpeg")  # logs every tile at INFO
    level = openjpeg_log.level
    openjpeg_log.setLevel(logging.WARNING)
    try:
        ds.compress(syntax, pixels, encoding_plugin=plugin, generate_instance_uid=False)
    finally:
        openjpeg_log.setLevel(level)


def _rationale_rows(study: Study, note: Note, truth: dict[str, bool]) -> list[dict]:
    rows = []
    for label, spans in rationale_spans(note, truth).items():
        texts = [note.text[start:end] for start, end in spans]
        spans_json = [list(span) for span in spans]
        rows.append(
            {"study_id": study.study_id, "label": label, "spans": spans_json, "text": texts}
        )
    return rows


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    path.write_bytes(buffer.getvalue().encode("utf-8"))


def _write_manifest(path: Path, studies: list[Study], observed: list[dict[str, str]]) -> None:
    header = ["study_id", "patient_id", "image", "note_path", *LABELS]
    rows = [
        [
            s.study_id,
            s.patient.patient_id,
            f"images/{s.study_id}.dcm" if s.has_image else "",
            f"notes/{s.study_id}.txt" if s.has_note else "",
            *(labels[label] for label in LABELS),
        ]
        for s, labels in zip(studies, observed, strict=True)
    ]
    _write_csv(path, header, rows)


MARKER = ".clinfuse-sample-data"  # in every export from its start: an interrupted one is ours too
TRUTH_COLUMNS = (
    "opacity", "opacity_side", "infection", "infection_side", "effusion_side", "ctr",
    "decoy_marker", "decoy_line", "decoy_ecg", "view", "modality", "photometric",
    "rescale_slope", "rescale_intercept", "compression", "has_image", "has_note", "sex", "age",
)  # fmt: skip


def _write_truth(path: Path, studies: list[Study], truths: list[dict[str, bool]]) -> None:
    rows = []
    for s, truth in zip(studies, truths, strict=True):
        latent = (
            int(bool(s.opacity_side)), s.opacity_side, int(bool(s.infection_side)),
            s.infection_side, s.effusion_side, f"{s.ctr:.3f}", int(s.marker), int(s.line),
            int(s.ecg), s.view, s.modality, s.photometric, f"{s.rescale[0]:g}",
            f"{s.rescale[1]:g}", s.compression, int(s.has_image), int(s.has_note),
            s.patient.sex, s.age,
        )  # fmt: skip
        rows.append([s.study_id, s.patient.patient_id, *(int(truth[k]) for k in LABELS), *latent])
    _write_csv(path, ["study_id", "patient_id", *LABELS, *TRUTH_COLUMNS], rows)


def _write_masks(path: Path, masks: dict[str, np.ndarray]) -> None:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **dict(sorted(masks.items())))  # zip entries dated 1980-01-01
    path.write_bytes(buffer.getvalue())
