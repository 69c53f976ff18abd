"""Standards exports: FHIR R4 DiagnosticReport and DICOM Comprehensive SR a hospital can ingest,
de-identified, marked as decision support with the model version, and identical on a rerun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pydicom
import pytest

from clinfuse.errors import DicomError
from clinfuse.exports import DISCLAIMER, diagnostic_report, write_study_exports
from clinfuse.exports import files as export_files

hd = pytest.importorskip("highdicom")
STUDY = pytest.importorskip("clinfuse.exports.sr").STUDY  # the SR's study id item
fhir_report = pytest.importorskip("fhir.resources.R4B.diagnosticreport")
from highdicom.sr.utils import find_content_items  # noqa: E402
from pydicom.sr.codedict import codes  # noqa: E402

try:
    from clinfuse.store import PredictionRecord
except ImportError:  # the store lands in its own change; same fields as the contract

    @dataclass
    class PredictionRecord:  # type: ignore[no-redef]
        study_id: str
        patient_pseudonym: str
        probabilities: dict[str, float]
        thresholds: dict[str, float]
        decisions: dict[str, bool]
        modalities: str
        model_version: str


IMAGES = Path(__file__).resolve().parents[1] / "sample_data" / "images"
LABELS = ["cardiomegaly", "effusion", "copd", "diabetes", "pneumonia", "mass"]
ISSUED = datetime(2024, 5, 1, 12, 30, 5, tzinfo=timezone.utc)
MODEL = "fusion-cxr-2024.05+3f2a"


def record(study_id: str = "S00001", model_version: str = MODEL) -> PredictionRecord:
    probabilities = dict(zip(LABELS, [0.8123456789012345, 0.1, 0.5, 0.02, 0.97, 0.3], strict=True))
    thresholds = dict(zip(LABELS, [0.5, 0.4, 0.5, 0.35, 0.6, 0.45], strict=True))
    return PredictionRecord(
        study_id=study_id,
        patient_pseudonym="PSN-0123456789abcdef",
        probabilities=probabilities,
        thresholds=thresholds,
        decisions={label: probabilities[label] >= thresholds[label] for label in LABELS},
        modalities="image+note",
        model_version=model_version,
    )


def identifiers(path: Path) -> list[str]:
    """The patient identifiers of a sample DICOM, as the strings that must never leak."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    name = ds.PatientName
    values = [str(name), name.family_name, name.given_name, ds.PatientID, ds.PatientBirthDate]
    values.append(ds.AccessionNumber)
    assert all(values), f"{path.name} should carry (fake) identifiers to test against"
    return values


def test_fhir_report_validates_and_carries_every_label(tmp_path):
    source = IMAGES / "S00001.dcm"
    (path,) = write_study_exports(tmp_path, record(), LABELS, source, {"fhir"}, issued=ISSUED)
    assert path == tmp_path / "fhir" / "S00001.json"
    report = fhir_report.DiagnosticReport.model_validate_json(path.read_text())
    assert report.status == "preliminary"
    assert report.subject.identifier.value == "PSN-0123456789abcdef"
    uid = pydicom.dcmread(source, stop_before_pixels=True).StudyInstanceUID
    assert report.imagingStudy[0].identifier.value == f"urn:oid:{uid}"
    assert DISCLAIMER in report.conclusion and MODEL in report.conclusion
    assert report.text.div.count(DISCLAIMER) == 1  # said once in the narrative
    # its own identifier, the same from any run or store (a pseudonym is a store's own), so a
    # report ingested again updates the first; the study it answers is what it is based on
    other_store = write_study_exports(
        tmp_path / "b", replace(record(), patient_pseudonym="PSN-fedcba9876543210"), LABELS, source,
        {"fhir"}, issued=ISSUED,
    )[0]  # fmt: skip
    assert json.loads(other_store.read_text())["id"] == report.id  # one StudyInstanceUID
    # without an image, a study id is unique within a manifest only: two sites' S00001 differ
    no_image = [
        diagnostic_report(replace(record(), patient_pseudonym=p), LABELS, ISSUED, None)["id"]
        for p in ("PSN-0123456789abcdef", "PSN-fedcba9876543210")
    ]
    assert no_image[0] != no_image[1]
    # two rows of one DICOM study (its PA and lateral images) are two reports, not one
    lateral = diagnostic_report(replace(record(), study_id="S00001-LAT"), LABELS, ISSUED, "1.2.3")
    assert lateral["id"] != diagnostic_report(record(), LABELS, ISSUED, "1.2.3")["id"]
    assert report.identifier[0].value == f"urn:uuid:{report.id}"
    assert report.basedOn[0].identifier.value == "S00001"
    newer = write_study_exports(
        tmp_path / "c", record(model_version="tiny@0000000000ff"), LABELS, source, {"fhir"},
        issued=ISSUED,
    )[0]  # fmt: skip
    assert json.loads(newer.read_text())["identifier"][0]["value"] != report.identifier[0].value

    device, *observations = report.contained
    assert device.version[0].value == MODEL
    assert [o.code.coding[0].code for o in observations] == LABELS
    assert [r.reference for r in report.result] == [f"#{o.id}" for o in observations]
    pred = record()
    for obs in observations:
        label = obs.code.coding[0].code
        assert obs.status == "preliminary"
        assert float(obs.valueQuantity.value) == pred.probabilities[label]
        assert float(obs.component[0].valueQuantity.value) == pred.thresholds[label]
        expected = "POS" if pred.decisions[label] else "NEG"
        assert obs.interpretation[0].coding[0].code == expected
        assert DISCLAIMER in obs.note[0].text and MODEL in obs.device.display


def test_fhir_report_without_image_or_patient_leaves_them_out():
    report = diagnostic_report(record(), LABELS, ISSUED, None)
    assert "imagingStudy" not in report
    fhir_report.DiagnosticReport.model_validate(report)
    anonymous = diagnostic_report(replace(record(), patient_pseudonym=""), LABELS, ISSUED, None)
    assert "subject" not in anonymous
    assert all("subject" not in resource for resource in anonymous["contained"])
    fhir_report.DiagnosticReport.model_validate(anonymous)


def test_sr_is_a_pseudonymised_study_of_its_own_that_references_the_source(tmp_path):
    """Filed into the source study under the pseudonym, a PACS would see one study with two
    patients; its own study references the source's images by their UIDs instead."""
    source = IMAGES / "S00001.dcm"
    (path,) = write_study_exports(tmp_path, record(), LABELS, source, {"sr"}, issued=ISSUED)
    assert path == tmp_path / "sr" / "S00001.dcm"
    original = pydicom.dcmread(source, stop_before_pixels=True)
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
    assert ds.StudyInstanceUID != original.StudyInstanceUID
    assert "CurrentRequestedProcedureEvidenceSequence" not in ds
    (other,) = ds.PertinentOtherEvidenceSequence
    assert other.StudyInstanceUID == original.StudyInstanceUID
    evidence = other.ReferencedSeriesSequence[0]
    assert evidence.SeriesInstanceUID == original.SeriesInstanceUID
    assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == original.SOPInstanceUID
    assert ds.PatientID == "PSN-0123456789abcdef" and str(ds.PatientName) == ""
    assert not ds.get("PatientBirthDate") and not ds.get("AccessionNumber")
    assert ds.PatientIdentityRemoved == "YES" and "pseudonym" in ds.DeidentificationMethod
    assert (ds.PreliminaryFlag, ds.VerificationFlag) == ("PRELIMINARY", "UNVERIFIED")
    assert ds.SeriesDescription.startswith(DISCLAIMER)  # what a worklist shows first

    sr = hd.sr.srread(path)
    assert isinstance(sr, hd.sr.ComprehensiveSR)
    (comment,) = find_content_items(sr, name=codes.DCM.Comment)
    assert DISCLAIMER in comment.TextValue and MODEL in comment.TextValue
    (version,) = find_content_items(sr, name=codes.DCM.AlgorithmVersion, recursive=True)
    assert version.TextValue == MODEL
    (study,) = find_content_items(sr, name=STUDY)  # which study of the manifest it reports on
    assert study.TextValue == "S00001"
    found = find_content_items(sr, name=codes.DCM.Finding, recursive=True)
    pred = record()
    assert [item.ConceptCodeSequence[0].CodeValue for item in found] == LABELS
    for item in found:
        label = item.ConceptCodeSequence[0].CodeValue
        (prob,) = find_content_items(item, name=codes.DCM.Probability)
        value = prob.MeasuredValueSequence[0].FloatingPointValue
        assert value == pred.probabilities[label]
        decision = item.ContentSequence[2].ConceptCodeSequence[0].CodeMeaning
        assert decision == ("Positive" if pred.decisions[label] else "Negative")


def test_sr_without_image_gets_a_study_of_its_own(tmp_path):
    (path,) = write_study_exports(tmp_path, record(), LABELS, None, {"sr"}, issued=ISSUED)
    ds = pydicom.dcmread(path)
    assert "CurrentRequestedProcedureEvidenceSequence" not in ds
    assert isinstance(hd.sr.srread(path), hd.sr.ComprehensiveSR)
    (again,) = write_study_exports(tmp_path / "b", record(), LABELS, None, {"sr"}, issued=ISSUED)
    assert pydicom.dcmread(again).StudyInstanceUID == ds.StudyInstanceUID


@pytest.mark.parametrize(
    "damage",
    [
        lambda ds: delattr(ds, "StudyInstanceUID"),  # as some exports and hand-made files are
        lambda ds: setattr(ds, "SeriesInstanceUID", ""),  # Type 1 in the SR's evidence
        lambda ds: setattr(ds, "StudyInstanceUID", "1." + "2" * 70),  # longer than 64
    ],
)
def test_a_source_without_its_uids_still_gets_both_exports_in_a_study_of_their_own(
    tmp_path, caplog, damage
):
    source = pydicom.dcmread(IMAGES / "S00001.dcm")
    damage(source)
    source.save_as(tmp_path / "no_study_uid.dcm")
    fhir, sr = write_study_exports(
        tmp_path / "out", record(), LABELS, tmp_path / "no_study_uid.dcm", {"fhir", "sr"}
    )
    assert "imagingStudy" not in json.loads(fhir.read_text())
    ds = pydicom.dcmread(sr)
    assert "CurrentRequestedProcedureEvidenceSequence" not in ds
    (alone,) = write_study_exports(tmp_path / "alone", record(), LABELS, None, {"sr"})
    assert ds.StudyInstanceUID == pydicom.dcmread(alone).StudyInstanceUID  # as with no image
    assert "study S00001: 1 of its 1 source DICOM file(s) lack a valid" in caplog.text


@pytest.mark.parametrize("name", ["S00001.dcm", "S00002.dcm", "S00003.dcm"])
def test_no_patient_identifier_reaches_either_export(tmp_path, name):
    source = IMAGES / name
    pred = record(study_id=name.removesuffix(".dcm"))
    paths = write_study_exports(tmp_path, pred, LABELS, source, {"fhir", "sr"}, issued=ISSUED)
    assert len(paths) == 2
    for path in paths:
        data = path.read_bytes()
        for value in identifiers(source):
            assert value.encode() not in data, f"{value!r} from {name} leaked into {path.name}"


def test_same_inputs_write_identical_files(tmp_path):
    source = IMAGES / "S00001.dcm"
    first = write_study_exports(
        tmp_path / "a", record(), LABELS, source, {"fhir", "sr"}, issued=ISSUED
    )
    second = write_study_exports(
        tmp_path / "b", record(), LABELS, source, {"fhir", "sr"}, issued=ISSUED
    )
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]

    newer = record(model_version="fusion-cxr-2024.06")
    third = write_study_exports(tmp_path / "c", newer, LABELS, source, {"sr"}, issued=ISSUED)
    old_uid = pydicom.dcmread(first[1]).SOPInstanceUID
    assert pydicom.dcmread(third[0]).SOPInstanceUID != old_uid
    # another run of the same model on the same study (a shared store: the same pseudonym)
    # writes another object: one UID with two contents would be one object to a PACS
    later = write_study_exports(
        tmp_path / "d", record(), LABELS, source, {"sr"}, issued=ISSUED + timedelta(hours=1)
    )
    again = pydicom.dcmread(later[0])
    assert again.SOPInstanceUID != old_uid
    assert again.SeriesInstanceUID != pydicom.dcmread(first[1]).SeriesInstanceUID
    assert again.StudyInstanceUID == pydicom.dcmread(first[1]).StudyInstanceUID


def test_interrupted_write_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    source = IMAGES / "S00001.dcm"
    (path,) = write_study_exports(tmp_path, record(), LABELS, source, {"fhir"}, issued=ISSUED)
    before = path.read_bytes()

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(export_files.os, "replace", crash)
    changed = replace(record(), probabilities={**record().probabilities, "copd": 0.9})
    with pytest.raises(OSError, match="disk full"):
        write_study_exports(tmp_path, changed, LABELS, source, {"fhir"}, issued=ISSUED)
    assert path.read_bytes() == before
    assert os.listdir(path.parent) == [path.name]


def test_stale_temporaries_from_a_killed_run_are_cleared_when_the_run_is_opened_again(
    tmp_path, tiny_model, small_export
):
    """Once an invocation (a listing of each folder of per-study files), not at every file's
    write, which made a run of n studies list its folders n times."""
    from clinfuse.inference.pipeline import InferenceSettings, open_run

    killed = subprocess.Popen([sys.executable, "-c", "pass"])
    killed.wait()  # a writer that is gone
    stale = [tmp_path / "fhir" / f".S00001.json.{killed.pid}.1.tmp"]
    stale.append(tmp_path / "sr" / f".S2.dcm.{killed.pid}.9.tmp")
    # a killed run's writer whose pid a later process was given (a container's pid 1): the
    # start time in the name tells them apart
    stale.append(tmp_path / "sr" / f".S4.dcm.{os.getpid()}-1.9.tmp")
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b'{"resourceType": "Diagn')
    # another run writing into the same folder right now: its file is not pulled from under it
    live = tmp_path / "sr" / f".S3.dcm.{os.getppid()}.1.tmp"
    live.write_bytes(b"DICM")
    write_study_exports(tmp_path, record(), LABELS, None, {"fhir"}, issued=ISSUED)
    run = open_run(tiny_model, small_export, tmp_path, None, InferenceSettings(standards=("fhir",)))
    run.release()
    run.store.close()
    assert sorted(os.listdir(tmp_path / "fhir")) == ["S00001.json"]
    assert os.listdir(tmp_path / "sr") == [live.name]


def test_study_ids_that_are_not_file_names_stay_inside_the_folder(tmp_path):
    pred = record(study_id="../../etc/passwd")
    (path,) = write_study_exports(tmp_path, pred, LABELS, None, {"fhir"}, issued=ISSUED)
    assert path.parent == tmp_path / "fhir" and path.name.startswith("etc_passwd-")
    based_on = json.loads(path.read_text())["basedOn"][0]["identifier"]
    assert based_on == {"system": "urn:clinfuse:study", "value": "../../etc/passwd"}


def test_bad_requests_say_what_is_wrong(tmp_path):
    with pytest.raises(ValueError, match="unknown export format.*'pdf'"):
        write_study_exports(tmp_path, record(), LABELS, None, {"pdf"}, issued=ISSUED)
    with pytest.raises(ValueError, match="label 'atelectasis' is missing"):
        diagnostic_report(record(), [*LABELS, "atelectasis"], ISSUED, None)
    with pytest.raises(DicomError, match="missing"):
        write_study_exports(tmp_path, record(), LABELS, tmp_path / "nope.dcm", {"sr"})


def test_series_folder_source_references_every_instance(tmp_path):
    series = tmp_path / "series"
    series.mkdir()
    uids = []
    for number in (1, 2):
        ds = pydicom.dcmread(IMAGES / "S00001.dcm")
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid(
            entropy_srcs=["slice", str(number)]
        )
        ds.InstanceNumber = number
        ds.save_as(series / f"{number}.dcm")
        uids.append(ds.SOPInstanceUID)
    (series / "README.txt").write_text("not DICOM")  # a stray file in the folder is skipped
    (path,) = write_study_exports(tmp_path / "out", record(), LABELS, series, {"sr"}, issued=ISSUED)
    evidence = pydicom.dcmread(path).PertinentOtherEvidenceSequence[0]
    referenced = evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence
    assert sorted(item.ReferencedSOPInstanceUID for item in referenced) == sorted(uids)


def test_a_long_model_name_keeps_its_version_hash_in_the_sr_header(tmp_path):
    long = "Modèle_pneumonie_Hôpital_Saint-Éloi_version_2025_final@5f92afa01d02"
    (path,) = write_study_exports(
        tmp_path, record(model_version=long), LABELS, None, {"sr"}, issued=ISSUED
    )
    ds = pydicom.dcmread(path)
    for value in (ds.ManufacturerModelName, ds.SeriesDescription):
        assert len(value) <= 64 and value.endswith("~@5f92afa01d02")
    assert ds.SeriesDescription.startswith(DISCLAIMER)
