"""The synthetic export: deterministic, on contract, and its ground truth means what it says."""

from __future__ import annotations

import csv
import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless

from clinfuse.errors import ClinfuseError
from clinfuse.synthetic import LABELS, make_sample_data

SIZE = 64


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _physical(path: Path) -> np.ndarray:
    """Pixels in modality units, bright = dense (the reader every consumer must implement)."""
    ds = dcmread(path)
    pixels = ds.pixel_array.astype(np.float64)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        pixels = 4095 - pixels
    return pixels * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """n=200 at 64 px: large enough for every encoding and missing-modality rows to occur."""
    out = tmp_path_factory.mktemp("export")
    make_sample_data(out, n=200, seed=0, size=SIZE)
    return out


@pytest.fixture(scope="module")
def truth(export: Path) -> dict[str, dict[str, str]]:
    return {r["study_id"]: r for r in _rows(export / "ground_truth" / "truth.csv")}


def test_same_arguments_give_identical_bytes_and_another_seed_differs(tmp_path: Path) -> None:
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        make_sample_data(tmp_path / name, n=40, seed=seed, size=SIZE)
    a, b, c = (_files(tmp_path / name) for name in "abc")
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []
    assert a["manifest.csv"] != c["manifest.csv"]
    shared_images = [k for k in a.keys() & c.keys() if k.endswith(".dcm")]
    assert shared_images and any(a[k] != c[k] for k in shared_images)


def test_rerun_replaces_a_previous_export_but_refuses_other_folders(tmp_path: Path) -> None:
    make_sample_data(tmp_path / "out", n=40, seed=0, size=SIZE)
    summary = make_sample_data(tmp_path / "out", n=10, seed=0, size=SIZE)
    assert len(list((tmp_path / "out" / "images").glob("*.dcm"))) == summary.n_images <= 10
    assert len(_rows(tmp_path / "out" / "manifest.csv")) == 10
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "mine.txt").write_text("keep me")
    with pytest.raises(ClinfuseError, match="not empty and not a previous sample export"):
        make_sample_data(tmp_path / "other", n=5, size=SIZE)
    assert (tmp_path / "other" / "mine.txt").read_text() == "keep me"


def test_an_interrupted_export_has_no_manifest_and_a_rerun_replaces_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C after the images, before the export is complete

    monkeypatch.setattr("clinfuse.synthetic.export.write_readme", interrupt)
    with pytest.raises(KeyboardInterrupt):
        make_sample_data(tmp_path / "out", n=10, size=SIZE)
    assert list((tmp_path / "out" / "images").glob("*.dcm"))
    assert not (tmp_path / "out" / "manifest.csv").exists()  # nothing to train on by mistake
    monkeypatch.undo()
    summary = make_sample_data(tmp_path / "out", n=10, size=SIZE)
    assert len(_rows(summary.manifest)) == 10


def test_manifest_follows_the_contract(export: Path) -> None:
    rows = _rows(export / "manifest.csv")
    header = (export / "manifest.csv").read_text(encoding="utf-8").splitlines()[0]
    assert header.split(",") == ["study_id", "patient_id", "image", "note_path", *LABELS]
    assert [r["study_id"] for r in rows] == [f"S{i:05d}" for i in range(1, 201)]
    assert all(re.fullmatch(r"P\d{4}", r["patient_id"]) for r in rows)
    assert {r[label] for r in rows for label in LABELS} == {"0", "1", ""}
    for r in rows:
        for column in ("image", "note_path"):
            assert r[column] == "" or (export / r[column]).is_file()
    assert any(r["image"] == "" for r in rows) and any(r["note_path"] == "" for r in rows)
    n_images = sum(bool(r["image"]) for r in rows)
    assert len(list((export / "images").iterdir())) == n_images
    per_patient = defaultdict(int)
    for r in rows:
        per_patient[r["patient_id"]] += 1
    assert 1.2 < len(rows) / len(per_patient) < 1.7 and max(per_patient.values()) > 1


def test_every_dicom_decodes_with_its_declared_encoding(export: Path, truth: dict) -> None:
    syntax = {"none": ExplicitVRLittleEndian, "rle": RLELossless, "j2k": JPEG2000Lossless}
    seen, uids = set(), set()
    for path in sorted((export / "images").glob("*.dcm")):
        ds = dcmread(path)
        latent = truth[path.stem]
        pixels = ds.pixel_array
        assert pixels.shape == (SIZE, SIZE) and pixels.dtype == np.uint16
        assert pixels.max() <= 4095 and (ds.BitsAllocated, ds.BitsStored) == (16, 12)
        assert ds.file_meta.TransferSyntaxUID == syntax[latent["compression"]]
        assert ds.PhotometricInterpretation == latent["photometric"]
        assert float(ds.get("RescaleIntercept", 0)) == float(latent["rescale_intercept"])
        assert (ds.Modality, ds.BodyPartExamined, ds.ViewPosition) == (
            latent["modality"], "CHEST", latent["view"],
        )  # fmt: skip
        uids |= {ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID}
        seen.add((latent["compression"], latent["photometric"], latent["rescale_intercept"]))
    assert len(uids) == 3 * len(list((export / "images").glob("*.dcm")))
    assert {c for c, _, _ in seen} == {"none", "rle", "j2k"}
    assert {p for _, p, _ in seen} == {"MONOCHROME1", "MONOCHROME2"}
    assert {i for _, _, i in seen} == {"0", "-1024"}


def test_labels_follow_the_rules_in_truth(truth: dict) -> None:
    indeterminate = 0
    for row in truth.values():
        opacity, infection = row["opacity"] == "1", row["infection"] == "1"
        same_side = row["infection_side"] == row["opacity_side"]
        assert row["pneumonia"] == str(int(opacity and infection and same_side))
        assert row["mass"] == str(int(opacity and not infection))
        assert row["cardiomegaly"] == str(int(float(row["ctr"]) >= 0.5))
        assert row["effusion"] == str(int(row["effusion_side"] != ""))
        indeterminate += opacity and infection and not same_side
    assert indeterminate > 0


def test_chronic_conditions_are_patient_attributes(truth: dict) -> None:
    by_patient = defaultdict(set)
    for row in truth.values():
        by_patient[row["patient_id"]].add((row["copd"], row["diabetes"]))
    assert all(len(values) == 1 for values in by_patient.values())


def test_masks_mark_true_findings_and_cover_bright_regions(export: Path, truth: dict) -> None:
    masks = np.load(export / "ground_truth" / "masks.npz")
    expected = {
        f"{sid}/{label}"
        for sid, row in truth.items()
        if row["has_image"] == "1"
        for label in ("cardiomegaly", "effusion", "pneumonia", "mass")
        if row[label] == "1"
    }
    assert set(masks.keys()) == expected
    for key in sorted(expected):
        sid, label = key.split("/")
        mask = masks[key].astype(bool)
        assert masks[key].dtype == np.uint8 and mask.shape == (SIZE, SIZE) and mask.sum() >= 4
        pixels = _physical(export / "images" / f"{sid}.dcm")
        chest = pixels[SIZE // 5 : SIZE * 3 // 4, SIZE // 8 : SIZE * 7 // 8]
        lung_mean = chest[chest <= np.percentile(chest, 25)].mean()  # the darkest quarter
        assert pixels[mask].mean() > lung_mean + 300, key
        side = {"effusion": "effusion_side", "pneumonia": "opacity_side", "mass": "opacity_side"}
        if label in side:  # the patient's left is drawn on the image's right
            on_image_right = np.nonzero(mask)[1].mean() > SIZE / 2
            assert on_image_right == (truth[sid][side[label]] == "left"), key


def test_rationale_spans_index_the_evidence_in_the_note(export: Path, truth: dict) -> None:
    lines = (export / "ground_truth" / "rationales.jsonl").read_text(encoding="utf-8")
    records = [json.loads(line) for line in lines.splitlines()]
    assert {r["label"] for r in records} == {"copd", "diabetes", "pneumonia", "mass"}
    for record in records:
        row = truth[record["study_id"]]
        assert row[record["label"]] == "1" and row["has_note"] == "1"
        note = (export / "notes" / f"{record['study_id']}.txt").read_text(encoding="utf-8")
        covered = [note[start:end] for start, end in record["spans"]]
        assert covered == record["text"] and all(covered)
        if record["label"] == "pneumonia":
            assert row["infection_side"] in covered
        if record["label"] == "mass":
            assert any(word in " ".join(covered).lower() for word in ("denies", "no ", "afebrile"))
    positives = {
        (sid, label)
        for sid, row in truth.items()
        if row["has_note"] == "1"
        for label in ("copd", "diabetes", "pneumonia")
        if row[label] == "1"
    }
    assert positives <= {(r["study_id"], r["label"]) for r in records}


def test_notes_never_carry_patient_identifiers(export: Path) -> None:
    checked = 0
    for row in _rows(export / "manifest.csv"):
        if not (row["image"] and row["note_path"]):
            continue
        ds = dcmread(export / row["image"], stop_before_pixels=True)
        note = (export / row["note_path"]).read_text(encoding="utf-8")
        family, given = str(ds.PatientName).split("^")
        words = set(re.findall(r"[A-Za-z]+", note))
        assert family not in words and given not in words
        assert ds.PatientID not in note and ds.PatientBirthDate not in note
        assert ds.StudyDate not in note
        checked += 1
    assert checked > 150


def test_reader_puts_every_encoding_on_one_scale(export: Path, truth: dict) -> None:
    dicom = pytest.importorskip("clinfuse.data.dicom")
    lung_means = defaultdict(list)
    for sid, row in truth.items():
        if row["has_image"] != "1":
            continue
        image = dicom.read_dicom(export / "images" / f"{sid}.dcm")
        pixels = image.pixels[0]  # (H, W)
        np.testing.assert_allclose(pixels, _physical(export / "images" / f"{sid}.dcm"))
        kind = "inverted" if row["photometric"] == "MONOCHROME1" else "plain"
        kind = "rescaled" if row["rescale_intercept"] != "0" else kind
        lung_means[kind].append(np.percentile(pixels, 25))
        lung_means[f"{kind}-body"].append(np.percentile(pixels, 75))
    medians = {kind: float(np.median(v)) for kind, v in lung_means.items()}
    for kind in ("inverted", "rescaled"):
        assert abs(medians[kind] - medians["plain"]) < 150, medians
        assert abs(medians[f"{kind}-body"] - medians["plain-body"]) < 150, medians
