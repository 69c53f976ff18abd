"""Standards exports a hospital can ingest: FHIR R4 DiagnosticReport JSON and DICOM SR.

Both carry the patient only as the store's pseudonym, say which model version made them, and
say they are decision support, not a diagnosis. `comprehensive_sr` needs highdicom (the
`standards` extra) and is imported on first use, so the FHIR export works without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from clinfuse.exports.fhir import DISCLAIMER, diagnostic_report
from clinfuse.exports.files import FORMATS, write_study_exports

if TYPE_CHECKING:
    from clinfuse.exports.sr import comprehensive_sr

__all__ = ["DISCLAIMER", "FORMATS", "comprehensive_sr", "diagnostic_report", "write_study_exports"]


def __getattr__(name: str) -> Any:
    if name == "comprehensive_sr":
        from clinfuse.exports.sr import comprehensive_sr

        return comprehensive_sr
    raise AttributeError(f"module 'clinfuse.exports' has no attribute {name!r}")
