"""clinfuse: multimodal (DICOM image + clinical note) decision support.

Decision support, not a diagnosis: every score clinfuse produces is for review by a clinician.
"""

from clinfuse.errors import (
    ClinfuseError,
    ConfigError,
    DicomError,
    ImageWarning,
    ManifestError,
    ModelFolderError,
    NoteError,
    NoteWarning,
)

__version__ = "0.1.0"

__all__ = [
    "ClinfuseError",
    "ConfigError",
    "DicomError",
    "ImageWarning",
    "ManifestError",
    "ModelFolderError",
    "NoteError",
    "NoteWarning",
    "__version__",
]
