"""DICOM Comprehensive SR export: one pseudonymised structured report per study (highdicom).

The report is a study of its own: its patient module carries only the pseudonym (the source's
name, id, birth date, sex, accession number and dates are never copied; Patient Identity
Removed is YES), so it can never be filed into the source study under another patient id, which
a PACS refuses, reconciles by hand or splits into a phantom patient. The source images are
referenced by their UIDs as other pertinent evidence (PS3.15's Retain UIDs option), which is
how the hospital's own systems find the study it reports on. UIDs derive from the model version,
pseudonym, study id and source study, and all timestamps are passed in, so a rerun writes
byte-identical files.

Content tree::

    Diagnostic imaging report (CONTAINER)
      HAS OBS CONTEXT  device observer: clinfuse, model version
      CONTAINS  Comment (TEXT): "Decision support, not a diagnosis: ..."
      CONTAINS  Algorithm Name / Algorithm Version (TEXT)
      CONTAINS  Study (TEXT): the manifest's study_id
      CONTAINS  Findings (CONTAINER)
        CONTAINS  Finding (CODE) = <label>
          HAS PROPERTIES  Probability (NUM), Threshold Value (NUM), Decision (CODE)
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING

import highdicom as hd
from highdicom.sr import (
    CodeContentItem,
    CodedConcept,
    ComprehensiveSR,
    ContainerContentItem,
    ContentSequence,
    DeviceObserverIdentifyingAttributes,
    NumContentItem,
    ObservationContext,
    ObserverContext,
    TextContentItem,
)
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid
from pydicom.valuerep import DA, DT, TM

from clinfuse import __version__
from clinfuse.exports.fhir import DISCLAIMER, Finding, findings, model_name, summary
from clinfuse.exports.files import EVIDENCE_ATTRIBUTES

if TYPE_CHECKING:
    from clinfuse.store import PredictionRecord

SERIES_NUMBER = 990  # high, so the SR series sorts after the images in a viewer
LABEL_SCHEME = "99CLINFUSE"  # private coding scheme ("99" prefix) for label names
DECISION = CodedConcept("decision", LABEL_SCHEME, "Decision at operating threshold")
STUDY = CodedConcept("study", LABEL_SCHEME, "clinfuse study id")
DEIDENTIFIED = "clinfuse pseudonym; source image UIDs kept as evidence"  # LO: 64 at most


def _lo(text: str) -> str:
    """Fit a free text into a DICOM LO value (64 characters): cut in the middle, so a model
    version's closing @hash is kept."""
    if len(text) <= 64:
        return text
    tail = text[text.rfind("@") :] if "@" in text[-20:] else ""
    return text[: 63 - len(tail)] + "~" + tail


def _uid(kind: str, pred: PredictionRecord, study_uid: str, issued: str = "") -> str:
    """A UID derived from what it identifies: a rerun of one run writes the same UIDs, and
    `issued` (the run's start) sets another run's SR apart (two SRs of one UID and different
    contents are one object to a PACS, which keeps one of them)."""
    sources = ["clinfuse", kind, pred.model_version, pred.patient_pseudonym, pred.study_id]
    return generate_uid(entropy_srcs=[*sources, study_uid, issued])


def _evidence(sources: Sequence[Dataset], pred: PredictionRecord) -> list[Dataset]:
    """Reference-only copies of the sources: their four UIDs, nothing else."""
    out = []
    for source in sources:
        missing = [k for k in EVIDENCE_ATTRIBUTES if k not in source]
        if missing:
            raise ValueError(
                f"study {pred.study_id!r}: source DICOM lacks {', '.join(missing)}; "
                "pass the image the prediction was made from, or no source"
            )
        item = Dataset()
        for keyword in EVIDENCE_ATTRIBUTES:
            setattr(item, keyword, getattr(source, keyword))
        out.append(item)
    return out


def _placeholder(pred: PredictionRecord, study_uid: str) -> Dataset:
    """Stand-in evidence when there is no source image (highdicom needs one to start from)."""
    item = Dataset()
    item.StudyInstanceUID = study_uid
    item.SeriesInstanceUID = _uid("placeholder-series", pred, study_uid)
    item.SOPInstanceUID = _uid("placeholder-instance", pred, study_uid)
    item.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.33"  # removed again once the SR is built
    return item


def _deidentify(item: Dataset, pred: PredictionRecord) -> Dataset:
    """Give the evidence item the SR inherits its patient and study modules from the
    pseudonym and nothing else of the patient's."""
    item.PatientName = ""
    item.PatientID = pred.patient_pseudonym
    item.PatientBirthDate = ""
    item.PatientSex = ""
    item.AccessionNumber = ""
    item.StudyID = ""
    item.StudyDate = ""
    item.StudyTime = ""
    item.ReferringPhysicianName = ""
    return item


def _finding_item(row: Finding) -> CodeContentItem:
    item = CodeContentItem(
        name=codes.DCM.Finding,
        value=CodedConcept(row.label, LABEL_SCHEME, _lo(row.label)),
        relationship_type="CONTAINS",
    )
    item.ContentSequence = ContentSequence(
        [
            NumContentItem(
                name=codes.DCM.Probability,
                value=row.probability,
                unit=codes.UCUM.NoUnits,
                relationship_type="HAS PROPERTIES",
            ),
            NumContentItem(
                name=codes.DCM.ThresholdValue,
                value=row.threshold,
                unit=codes.UCUM.NoUnits,
                relationship_type="HAS PROPERTIES",
            ),
            CodeContentItem(
                name=DECISION,
                value=codes.SCT.Positive if row.decision else codes.SCT.Negative,
                relationship_type="HAS PROPERTIES",
            ),
        ]
    )
    return item


def _content(pred: PredictionRecord, rows: Sequence[Finding]) -> ContainerContentItem:
    observer = ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=generate_uid(entropy_srcs=["clinfuse", "device", pred.model_version]),
            name="clinfuse",
            manufacturer_name="clinfuse",
            model_name=_lo(pred.model_version),
        ),
    )
    found = ContainerContentItem(name=codes.DCM.Findings, relationship_type="CONTAINS")
    found.ContentSequence = ContentSequence([_finding_item(row) for row in rows])
    root = ContainerContentItem(name=codes.LN.DiagnosticImagingReport)
    root.ContentSequence = ContentSequence(
        [
            *ObservationContext(observer_device_context=observer),
            TextContentItem(
                name=codes.DCM.Comment,
                value=summary(pred, rows),
                relationship_type="CONTAINS",
            ),
            TextContentItem(
                name=codes.DCM.AlgorithmName, value="clinfuse", relationship_type="CONTAINS"
            ),
            TextContentItem(
                name=codes.DCM.AlgorithmVersion,
                value=pred.model_version,
                relationship_type="CONTAINS",
            ),
            TextContentItem(name=STUDY, value=pred.study_id, relationship_type="CONTAINS"),
            found,
        ]
    )
    return root


def _utc(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        return moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc)


def comprehensive_sr(
    pred: PredictionRecord,
    labels: Sequence[str],
    source: Dataset | Sequence[Dataset] | None = None,
    series_number: int = SERIES_NUMBER,
    *,
    issued: datetime | None = None,
) -> ComprehensiveSR:
    """A pseudonymised Comprehensive SR of one study's prediction, in a study of its own.

    `source` is the image (or every instance of the series) the prediction was made from,
    referenced as other pertinent evidence (its study's UID seeds the SR's). `issued` (naive =
    UTC) stamps every date and time; pass it (e.g. the run's start) for byte-identical reruns,
    as None means now.
    """
    rows = findings(pred, labels)
    when = _utc(issued or datetime.now(timezone.utc))
    sources = [source] if isinstance(source, Dataset) else list(source or [])
    references = _evidence(sources, pred)
    source_study = references[0].StudyInstanceUID if references else ""
    study_uid = _uid("study", pred, source_study)
    evidence = [_deidentify(_placeholder(pred, study_uid), pred), *references]
    scheme = hd.coding_schemes.CodingSchemeIdentificationItem(
        designator=LABEL_SCHEME, name="clinfuse label names"
    )
    sr = ComprehensiveSR(
        evidence=evidence,
        content=_content(pred, rows),
        series_instance_uid=_uid("series", pred, study_uid, when.isoformat()),
        series_number=series_number,
        sop_instance_uid=_uid("instance", pred, study_uid, when.isoformat()),
        instance_number=1,
        manufacturer="clinfuse",
        manufacturer_model_name=_lo(model_name(pred)),
        software_versions=f"clinfuse {__version__}",
        series_description=_lo(f"{DISCLAIMER}: {model_name(pred)}"),  # read first in a list
        is_complete=True,
        is_final=False,
        is_verified=False,
        coding_schemes=[scheme],
        content_date=when.date(),
        content_time=when.time(),
        series_date=when.date(),
        series_time=when.time(),
        specific_character_set="ISO_IR 192",
    )
    del sr.CurrentRequestedProcedureEvidenceSequence  # the placeholder alone
    sr.PatientIdentityRemoved = "YES"
    sr.DeidentificationMethod = DEIDENTIFIED
    # highdicom stamps these from the clock; the passed-in time keeps reruns byte-identical
    sr.InstanceCreationDate = DA(when.date())
    sr.InstanceCreationTime = TM(when.time())
    sr.TimezoneOffsetFromUTC = "+0000"
    for equipment in sr.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in equipment:
            equipment.ContributionDateTime = DT(when.replace(tzinfo=None))
    return sr
