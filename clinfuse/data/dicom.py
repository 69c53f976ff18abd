"""DICOM ingestion: a file, or a folder holding one series, becomes a float32 image.

`read_dicom` is the one place clinfuse turns DICOM into pixels. Pixels come out channel-first in
modality units (rescale slope/intercept or Modality LUT applied), MONOCHROME1 inverted so that
larger is always brighter, colour as RGB. Anything that cannot become an image raises exactly
one `DicomError` whose `reason` says why, so a batch pipeline records it and carries on.
"""

from __future__ import annotations

import contextlib
import os
import re
import struct
import threading
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pydicom
import pydicom.uid as uids
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, apply_modality_lut, get_decoder

from clinfuse.data.identifiers import Identifiers, header_identifiers
from clinfuse.errors import DicomError, ImageWarning

__all__ = ["DicomImage", "apply_window", "default_window", "read_dicom"]

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_CODE = re.compile(r"[A-Z0-9_ ]{1,16}")  # a Code String (CS) value, e.g. a Modality
_GREY = ("MONOCHROME1", "MONOCHROME2")
# Colour spaces pydicom's decoders hand back as RGB (YBR_FULL*, and YBR_ICT/RCT inside JPEG 2000).
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "PALETTE COLOR")
# an image a header says needs more values than this is refused before it is decoded, and a
# series folder once its slices hold more (2 GB as float32: a mammogram is ~14 M values, a
# breast tomosynthesis ~270 M, a CT of 2,000 slices of 512x512 524 M; a few MB of compressed
# data can declare gigabytes)
_MAX_VALUES = _MAX_SERIES_VALUES = 2**29
_EOF_ERRORS = (EOFError, struct.error, OSError, zlib.error)  # how pydicom fails on a short file
_UNDEFINED_LENGTH = 0xFFFFFFFF

# The pip package that decodes each compressed transfer syntax, named in `no_decoder` errors.
_DECODER_PACKAGES = {
    **dict.fromkeys(uids.JPEGTransferSyntaxes, "pylibjpeg-libjpeg (or python-gdcm)"),
    **dict.fromkeys(uids.JPEGLSTransferSyntaxes, "pylibjpeg-libjpeg (or pyjpegls)"),
    **dict.fromkeys(uids.JPEG2000TransferSyntaxes, "pylibjpeg-openjpeg"),
    uids.RLELossless: "pylibjpeg-rle",
}
_HINTS = {  # what the user can do, by reason
    "missing": "check the path (manifest paths are relative to the manifest's folder)",
    "not_dicom": "export the image as a DICOM file, or remove it from the manifest",
    "truncated": "copy or export the file again from its source",
    "no_pixel_data": "point the manifest at an image (CT, MR, CR, DX ...), not a report or plan",
    "no_decoder": "transcode to Explicit VR Little Endian first (gdcmconv --raw, dcmtk dcmdjpeg)",
    "unsupported_photometric": "convert the image to MONOCHROME2 or RGB",
    "decode_failed": "the image data is corrupt or malformed; export it again from its source",
    "inconsistent_series": "put each series in its own folder",
    "empty_series": "point the manifest at a folder holding the DICOM files of one series",
}


@dataclass(frozen=True)
class DicomImage:
    """One DICOM image or volume in modality units, channel first."""

    pixels: np.ndarray  # float32 (C, H, W) for one frame, (C, D, H, W) for a volume; C = 1 or 3
    spacing: tuple[float, ...]  # mm per pixel: (row, col) or (slice, row, col); 1.0 when unknown
    window: tuple[float, float] | None  # (center, width) in the units of `pixels`
    meta: dict[str, object]  # non-identifying metadata only (see `_meta`)
    # the header's patient names, ids and birth date, kept only to mask them in the study's
    # note (`clinfuse.data.identifiers`); never written, logged or shown
    identifiers: Identifiers = field(default=Identifiers(), repr=False, compare=False)

    @property
    def spatial_dims(self) -> int:
        """2 for an image, 3 for a volume."""
        return self.pixels.ndim - 1


def read_dicom(path: str | Path) -> DicomImage:
    """Read a DICOM file, or a folder holding one series, into a `DicomImage`.

    Raises exactly one `DicomError` (never anything else) when the input cannot become an image.
    """
    path = Path(path)
    try:
        path.stat()
    except (FileNotFoundError, NotADirectoryError, ValueError):  # ValueError: an embedded NUL
        raise _error(path, "missing", "no such file or folder", _path_hint(path)) from None
    except OSError as exc:  # a link that loops, a folder it may not enter, ...
        reached = exc.strerror or type(exc).__name__  # never str(exc): it quotes the path
        raise _error(path, "missing", f"cannot be reached ({reached})") from None
    try:
        with _unchecked_values():
            return _read_series(path) if path.is_dir() else _read_file(path)[0]
    except DicomError:
        raise
    except OSError as exc:
        raise _error(path, "missing", f"cannot be read ({_describe(exc)})") from exc
    except Exception as exc:  # the contract: a user's file never escapes as another error type
        raise _error(path, "decode_failed", _describe(exc)) from exc


def _path_hint(path: Path) -> str | None:
    """What may be wrong with a path that names nothing: a `~` no shell expanded, or Windows'
    backslashes, which are part of a name here, not folder separators."""
    if "~" in path.parts:
        return "a path with ~ is not expanded here: give the folder in full"
    if os.sep == "/" and "\\" in str(path):
        return "backslashes are not folder separators here: write the path with /"
    return None


def apply_window(pixels: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM LINEAR VOI function (PS3.3 C.11.2.1.2.1) mapped to float32 in [0, 1].

    A width in (0, 1], legal only for LINEAR_EXACT, uses that function (C.11.2.1.3.2).
    """
    if not width > 0:
        raise ValueError(f"window width must be > 0, got {width}")
    values = np.asarray(pixels, dtype=np.float32)
    if width > 1:
        out = (values - np.float32(center - 0.5)) / np.float32(width - 1) + np.float32(0.5)
    else:
        out = (values - np.float32(center)) / np.float32(width) + np.float32(0.5)
    return np.clip(out, 0.0, 1.0, out=out)


def default_window(image: DicomImage) -> tuple[float, float]:
    """The file's window when it has one, else `percentile_window`."""
    return image.window if image.window is not None else percentile_window(image)


def percentile_window(image: DicomImage) -> tuple[float, float]:
    """(center, width) spanning the pixels' 0.5-99.5 percentiles."""
    low, high = np.percentile(image.pixels, [0.5, 99.5])
    return float((low + high) / 2), float(max(high - low, 1e-6))


# ----------------------------------------------------------------------------- one file


def _read_file(path: Path) -> tuple[DicomImage, Dataset]:
    """A DICOM file -> (its image, its header without the pixel data)."""
    if not path.is_file():
        raise _error(path, "not_dicom", "not a regular file")
    ds = _parse(path)
    try:
        image = _to_image(path, ds)
    except DicomError:
        raise
    except Exception as exc:
        raise _error(path, "decode_failed", _describe(exc)) from exc
    for keyword in _PIXEL_KEYWORDS:  # a series keeps headers around; drop the bulk
        if keyword in ds:
            del ds[keyword]
    return image, ds


def read_header(path: str | Path) -> Dataset:
    """A file's data set without its pixels, read as `read_dicom` reads it (a raw data set
    without the 128-byte preamble too); `DicomError` "not_dicom" when it is not DICOM."""
    path = Path(path)
    try:
        with path.open("rb") as f, _unchecked_values():
            has_prefix = _has_preamble(f)
            ds = _converted(pydicom.dcmread(f, stop_before_pixels=True, force=not has_prefix))
    except OSError:
        raise
    except Exception as exc:
        raise _error(path, "not_dicom", _describe(exc)) from exc
    _check_raw(path, ds, has_prefix)
    return ds


def _converted(ds: Dataset) -> Dataset:
    """`ds` with every value converted now, while pydicom's checks are off: it converts a value
    on first access, when the checks may be back on and their warning would quote it. A value
    that cannot be converted is left out."""
    for tag in list(ds.keys()):
        try:
            element = ds[tag]
        except Exception:
            del ds[tag]
            continue
        if element.VR == "SQ":
            for item in element.value:
                _converted(item)
    return ds


_UNCHECKED = threading.Lock()
_readers = 0  # how many threads read a file with pydicom's value checks off
_checks_were = pydicom.config.settings.reading_validation_mode


@contextlib.contextmanager
def _unchecked_values() -> Iterator[None]:
    """pydicom's checks of values off while a file is read: their warnings quote the value,
    which in a damaged header can be the patient's name, id or birth date. Process-wide in
    pydicom, so counted across threads (dashboard sessions): the first reader turns them off,
    the last one back on."""
    global _readers, _checks_were
    with _UNCHECKED:
        if _readers == 0:
            _checks_were = pydicom.config.settings.reading_validation_mode
            pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
        _readers += 1
    try:
        yield
    finally:
        with _UNCHECKED:
            _readers -= 1
            if _readers == 0:
                pydicom.config.settings.reading_validation_mode = _checks_were


def _has_preamble(f: BinaryIO) -> bool:
    """Whether the open file starts with the 128-byte preamble and "DICM"; rewound after."""
    found = f.read(132)[128:] == b"DICM"
    f.seek(0)
    return found


def _check_raw(path: Path, ds: Dataset, has_prefix: bool) -> str | None:
    """Without a preamble pydicom parses anything; accept it only if it reads as DICOM.
    Returns the data set's SOP class (its name where pydicom knows it), or None."""
    sop_class = _text(ds, "SOPClassUID", uid=True)
    known_sop = sop_class is not None and not sop_class[:1].isdigit()  # pydicom knows its name
    if not (has_prefix or known_sop or all(k in ds for k in ("Rows", "Columns", "BitsAllocated"))):
        raise _error(path, "not_dicom", "no DICOM preamble, and not readable as a raw data set")
    return sop_class


def _parse(path: Path) -> Dataset:
    """Read the data set, telling a truncated file from one that is not DICOM at all."""
    with path.open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        has_prefix = _has_preamble(f)
        try:
            ds = pydicom.dcmread(f, force=not has_prefix)
        except Exception as exc:
            reason = "truncated" if has_prefix and isinstance(exc, _EOF_ERRORS) else "not_dicom"
            raise _error(path, reason, _describe(exc)) from exc
        unread = size - f.tell()
    sop_class = _check_raw(path, ds, has_prefix)
    # pydicom keeps what it could read of a short file; look for the evidence it left behind.
    last = _last_raw_element(ds)
    if unread >= 8 or len(ds) == 0 or (last and len(last.value or b"") < last.length):
        raise _error(path, "truncated", f"the file ends before its declared data ({size} bytes)")
    if not any(keyword in ds for keyword in _PIXEL_KEYWORDS):
        if "PixelDataProviderURL" in ds:
            detail = "the pixel data lives on a JPIP server, not in the file"
            raise _error(path, "no_decoder", detail, "retrieve the image as a complete file")
        if "Rows" in ds or (last and last.value_tell + last.length < size):  # cut-off tag
            raise _error(
                path,
                "truncated",
                "the file ends before its Pixel Data (it describes an image, Rows and Columns, "
                "but holds no pixels: cut short, or the pixels were removed)",
            )
        # named only by values that cannot be anything else: a damaged header's element can
        # swallow the ones after it (the patient's name, ids, birth date)
        modality = _text(ds, "Modality") or ""
        what = sop_class or (f"{modality} object" if _CODE.fullmatch(modality) else "")
        raise _error(path, "no_pixel_data", f"{what or 'this data set'} holds no Pixel Data")
    if not ds.file_meta.get("TransferSyntaxUID"):  # raw data set: use the encoding pydicom found
        if "PixelData" in ds and ds["PixelData"].is_undefined_length:
            raise _error(path, "no_decoder", "compressed Pixel Data but no Transfer Syntax UID")
        implicit, little = ds.original_encoding
        explicit = uids.ExplicitVRLittleEndian if little else uids.ExplicitVRBigEndian
        ds.file_meta.TransferSyntaxUID = uids.ImplicitVRLittleEndian if implicit else explicit
    return ds


def _last_raw_element(ds: Dataset) -> RawDataElement | None:
    """The last element, if it is still raw bytes of a defined length whose size can be checked."""
    last = ds.get_item(next(reversed(ds.keys()))) if ds else None
    deflated = ds.file_meta.get("TransferSyntaxUID") == uids.DeflatedExplicitVRLittleEndian
    checkable = isinstance(last, RawDataElement) and last.length != _UNDEFINED_LENGTH
    return last if checkable and not deflated else None


def _to_image(path: Path, ds: Dataset) -> DicomImage:
    """Decode, apply the modality LUT and invert MONOCHROME1: a parsed data set -> image."""
    rows, columns = _positive_int(path, ds, "Rows"), _positive_int(path, ds, "Columns")
    frames = _positive_int(path, ds, "NumberOfFrames", 1)
    samples = _positive_int(path, ds, "SamplesPerPixel", 1)
    if rows * columns * frames * samples > _MAX_VALUES:
        detail = f"{frames} frames of {rows}x{columns}x{samples} exceed {_MAX_VALUES} values"
        raise _error(path, "decode_failed", detail, "downsample or split the image")
    photometric = (_text(ds, "PhotometricInterpretation") or "").upper()
    if photometric not in _GREY + _COLOUR:
        detail = f"PhotometricInterpretation {photometric or '(missing)'!r} is not supported"
        raise _error(path, "unsupported_photometric", detail)

    array, decoded_as = _decode(path, ds)
    array = array.reshape(frames, rows, columns, -1)  # (F, H, W, S)
    window = None
    if decoded_as == "PALETTE COLOR":
        try:
            array = apply_color_lut(array[..., 0], ds)[..., :3]  # (F, H, W, 3); drop any alpha
        except Exception as exc:
            detail = f"its PALETTE COLOR lookup table cannot be applied ({_describe(exc)})"
            raise _error(path, "unsupported_photometric", detail) from exc
    elif decoded_as in _GREY and array.shape[-1] == 1:
        array, window = _to_modality_units(ds, array, decoded_as)
    elif decoded_as != "RGB" or array.shape[-1] != 3:
        detail = f"decoded as {decoded_as} with {array.shape[-1]} samples per pixel"
        raise _error(path, "unsupported_photometric", detail)

    array = array.astype(np.float32, copy=False)
    pixels = np.ascontiguousarray(np.moveaxis(array, -1, 0))  # (C, F, H, W)
    if not np.isfinite(pixels).all():
        raise _error(path, "decode_failed", "pixel values include NaN or infinity")
    spacing = _pixel_spacing(ds)
    if frames == 1:
        pixels = pixels[:, 0]  # (C, H, W)
    else:
        offsets = _frame_positions(ds)  # each frame's, read once for order and spacing
        order = _frame_order(offsets, frames)  # along the slice normal, as a series folder's
        if order != sorted(order):
            pixels = np.ascontiguousarray(pixels[:, order])
        spacing = (_frame_spacing(ds, offsets), *spacing)
    meta = _meta(ds, photometric, frames)
    _warn_if_mirrored(meta)
    return DicomImage(pixels, spacing, window, meta, header_identifiers(ds))


def stored_flipped(meta: dict[str, object]) -> str | None:
    """ "mirrored" or "upside down" for a projection image stored so (its PatientOrientation
    rows run to the patient's right, or its columns to the head; a standard view is L\\F),
    else None."""
    orientation = str(meta.get("patient_orientation") or "").upper().split("\\")
    if len(orientation) != 2 or not all(orientation):
        return None
    across, down = orientation[0][0], orientation[1][0]
    if across not in "LR" or down not in "FH" or (across, down) == ("L", "F"):
        return None
    return "mirrored" if across == "R" else "upside down"


def _warn_if_mirrored(meta: dict[str, object]) -> None:
    """An `ImageWarning` for an image `stored_flipped`: it is read and shown as stored, so a
    side the note names and the image shows would disagree."""
    flipped = stored_flipped(meta)
    if flipped:
        warnings.warn(  # without its path: a folder name may hold the patient's name
            f"stored {flipped} (PatientOrientation {meta['patient_orientation']}, a standard "
            f"view is L\\F): it is read and shown as stored, so a model of standard views "
            f"reads it {flipped}",
            ImageWarning,
            stacklevel=2,
        )


def _decode(path: Path, ds: Dataset) -> tuple[np.ndarray, str]:
    """pydicom's decoded pixel array and the photometric interpretation it came out in."""
    syntax = ds.file_meta.TransferSyntaxUID
    named = f"transfer syntax {syntax.name}" + (f" ({syntax})" if syntax.name != syntax else "")
    package = _DECODER_PACKAGES.get(syntax)
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise _error(path, "no_decoder", f"no pydicom decoder exists for {named}") from None
    if not decoder.is_available:
        hint = f"pip install {package}" if package else None
        raise _error(path, "no_decoder", f"no installed plugin decodes {named}", hint)
    try:
        array, info = decoder.as_array(ds, raw=False)  # options from ds's Image Pixel module
    except Exception as exc:
        if "less than expected" in str(exc) or isinstance(exc, EOFError):
            raise _error(path, "truncated", _describe(exc)) from exc
        missing = "; ".join(decoder.missing_dependencies)  # plugins pydicom knows but cannot load
        hint = f"the data may be corrupt, or a plugin not installed may read it ({missing})"
        hint = hint if missing else None
        raise _error(path, "decode_failed", f"{named}: {_describe(exc)}", hint) from exc
    return array, str(info.get("photometric_interpretation", "")).upper()


def _to_modality_units(
    ds: Dataset, array: np.ndarray, photometric: str
) -> tuple[np.ndarray, tuple[float, float] | None]:
    """Apply the modality LUT and invert MONOCHROME1; the file's window in the same units."""
    stored = np.array([0, 0])  # the range of stored values; float pixel data reflects about 0
    if "PixelData" in ds:
        bits = int(ds.get("BitsStored") or ds.BitsAllocated)
        signed = ds.get("PixelRepresentation") == 1
        stored = np.array([-(2 ** (bits - 1)), 2 ** (bits - 1) - 1] if signed else [0, 2**bits - 1])
    if "ModalityLUTSequence" in ds:
        values = apply_modality_lut(array, ds).astype(np.float32)
        stored = apply_modality_lut(stored, ds)[None]  # (1, 2)
    else:
        slope, intercept = _frame_rescale(ds, len(array))  # (F,) each: per frame when given so
        values = array.astype(np.float32)
        stored = stored[None] * slope[:, None] + intercept[:, None]  # (F, 2)
        values *= slope[:, None, None, None].astype(np.float32)  # in place: held once
        values += intercept[:, None, None, None].astype(np.float32)
    window = _file_window(ds)
    if photometric == "MONOCHROME1":  # reflect about the middle of the representable range
        pivot = stored.min(axis=1) + stored.max(axis=1)  # (F,) or (1,)
        np.subtract(pivot[:, None, None, None].astype(np.float32), values, out=values)
        window = None if window is None else (float(pivot[0]) - window[0], window[1])
    return values, window


def _rescale(ds: Dataset) -> tuple[float, float]:
    """Rescale slope and intercept, from the header or its functional groups; (1, 0) if absent."""
    source = ds
    if "RescaleSlope" not in ds:
        source = _functional_item(ds, "PixelValueTransformationSequence")
    slope, intercept = _floats(source, "RescaleSlope", 1), _floats(source, "RescaleIntercept", 1)
    return (slope[0] if slope else 1.0), (intercept[0] if intercept else 0.0)


def _frame_rescale(ds: Dataset, frames: int) -> tuple[np.ndarray, np.ndarray]:
    """Each frame's rescale slope and intercept (F,): an enhanced multi-frame file may give
    every frame its own (PerFrameFunctionalGroupsSequence); else the one of `_rescale`."""
    slope, intercept = _rescale(ds)
    slopes, intercepts = np.full(frames, slope), np.full(frames, intercept)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    if "RescaleSlope" in ds or len(per_frame) != frames:
        return slopes, intercepts
    for f, item in enumerate(per_frame):
        found = item.get("PixelValueTransformationSequence")
        if found:
            own_slope = _floats(found[0], "RescaleSlope", 1)
            own_intercept = _floats(found[0], "RescaleIntercept", 1)
            slopes[f] = own_slope[0] if own_slope else slope
            intercepts[f] = own_intercept[0] if own_intercept else intercept
    return slopes, intercepts


def _file_window(ds: Dataset) -> tuple[float, float] | None:
    """(center, width) of the first VOI window; a VOI LUT's input range when only a LUT is given."""
    source = ds if "WindowCenter" in ds else _functional_item(ds, "FrameVOILUTSequence")
    center, width = _floats(source, "WindowCenter", 1), _floats(source, "WindowWidth", 1)
    if center and width and width[0] > 0:
        return center[0], width[0]
    lut = ds.get("VOILUTSequence")
    descriptor = _floats(lut[0], "LUTDescriptor", 3) if lut else None
    if descriptor:
        entries = descriptor[0] or 65536.0
        return descriptor[1] + entries / 2, entries
    return None


# ----------------------------------------------------------------------------- geometry


def _functional_item(ds: Dataset, keyword: str) -> Dataset | None:
    """The first item of `keyword` in the shared, else first per-frame, functional groups."""
    for groups in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        group = ds.get(groups)
        if group and group[0].get(keyword):
            return group[0].get(keyword)[0]
    return None


def _pixel_spacing(ds: Dataset) -> tuple[float, float]:
    """(row, col) spacing in mm: PixelSpacing, else ImagerPixelSpacing, else 1.0."""
    for source in (ds, _functional_item(ds, "PixelMeasuresSequence")):
        for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
            values = _floats(source, keyword, 2)
            if values and min(values) > 0:
                return values[0], values[1]
    return 1.0, 1.0


def _frame_positions(ds: Dataset) -> list[float] | None:
    """Each frame's position along the slice normal (per-frame PlanePositionSequence), or None
    when the file does not give every frame one."""
    normal = _normal(_functional_item(ds, "PlaneOrientationSequence") or ds)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    planes = [(item.get("PlanePositionSequence") or [None])[0] for item in per_frame]
    positions = [_floats(plane, "ImagePositionPatient", 3) for plane in planes]
    if normal is None or not positions or not all(positions):
        return None
    return [float(np.dot(p, normal)) for p in positions]


def _frame_order(offsets: list[float] | None, frames: int) -> list[int]:
    """The frames' order along the slice normal, as a series folder's files are ordered; the
    file's own order when the frames do not each have a position of their own (a cine or
    dynamic series repeats one position: its order is time's). `offsets`: `_frame_positions`."""
    if offsets is None or len(offsets) != frames:
        return list(range(frames))
    if len({round(o, 3) for o in offsets}) != frames:  # within 1e-3 mm: one position, as
        return list(range(frames))  # a series folder's slices are told apart
    return sorted(range(frames), key=offsets.__getitem__)


def _frame_spacing(ds: Dataset, offsets: list[float] | None) -> float:
    """Distance between the frames of a multi-frame file in mm; 1.0 when unknown."""
    gap = _median_gap(offsets) if offsets is not None and len(offsets) > 1 else None
    gap = gap or _median_gap(_floats(ds, "GridFrameOffsetVector") or [])  # RT dose
    return gap or _nominal_slice_spacing(_functional_item(ds, "PixelMeasuresSequence") or ds)


def _normal(ds: Dataset | None) -> np.ndarray | None:
    """The slice normal: row x column direction cosines of ImageOrientationPatient."""
    cosines = _floats(ds, "ImageOrientationPatient", 6)
    return None if cosines is None else np.cross(cosines[:3], cosines[3:])


def _median_gap(offsets: list[float]) -> float | None:
    gaps = np.abs(np.diff(np.sort(offsets)))
    return float(np.median(gaps)) if len(gaps) and np.median(gaps) > 0 else None


def _nominal_slice_spacing(ds: Dataset) -> float:
    for keyword in ("SpacingBetweenSlices", "SliceThickness"):
        value = _floats(ds, keyword, 1)
        if value and value[0] > 0:
            return value[0]
    return 1.0


# ----------------------------------------------------------------------------- a series folder


def _read_series(folder: Path) -> DicomImage:
    """A folder of single-frame files of one series -> a volume ordered along the slice normal."""
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    dangling = [n for n, p in enumerate(entries, 1) if p.is_symlink() and not p.exists()]
    if dangling:  # a slice on storage that is not mounted: the volume would lack it
        detail = f"its entry {dangling[0]} of {len(entries)} (in name order) links to no file"
        raise _error(folder, "missing", detail)
    slices: list[tuple[DicomImage, Dataset]] = []
    values = 0
    for entry in filter(Path.is_file, entries):
        try:
            slices.append(_read_file(entry))
        except DicomError as err:
            if err.reason not in ("not_dicom", "no_pixel_data"):  # a README, DICOMDIR, SR: skip
                raise
            continue
        values += slices[-1][0].pixels.size
        if values > _MAX_SERIES_VALUES:  # each slice is below the file limit; all together not
            detail = f"its first {len(slices)} slices hold more than {_MAX_SERIES_VALUES} values"
            raise _error(folder, "decode_failed", detail, "downsample the series or split it")
    if not slices:
        raise _error(folder, "empty_series", f"no DICOM image among its {len(entries)} entries")
    if len(slices) == 1 and slices[0][0].spatial_dims == 3:
        return slices[0][0]  # one multi-frame file
    _check_one_series(folder, slices)
    order, slice_spacing = _slice_order(folder, [header for _, header in slices])
    first = slices[order[0]][0]
    pixels = np.stack([slices[i][0].pixels for i in order], axis=1)  # (C, D, H, W)
    meta = dict(first.meta, n_frames=len(slices))
    identifiers = Identifiers()
    for image, _ in slices:
        identifiers |= image.identifiers
    return DicomImage(pixels, (slice_spacing, *first.spacing), first.window, meta, identifiers)


def _check_one_series(folder: Path, slices: list[tuple[DicomImage, Dataset]]) -> None:
    """Raise inconsistent_series unless every file is a 2D slice of the same series and shape."""
    series = {_text(header, "SeriesInstanceUID") for _, header in slices} - {None}
    if len(series) > 1:
        raise _error(folder, "inconsistent_series", f"holds {len(series)} different series")
    first, orientation = slices[0][0], _floats(slices[0][1], "ImageOrientationPatient", 6)
    for number, (image, header) in enumerate(slices, 1):
        # by its place, not its name: an export's file names can hold the patient's
        name, problem = f"its DICOM image {number} of {len(slices)} (in name order)", None
        other = _floats(header, "ImageOrientationPatient", 6)
        if image.spatial_dims != 2:
            problem = f"is multi-frame ({image.pixels.shape[1]} frames) among other files"
        elif image.pixels.shape != first.pixels.shape:
            problem = f"is {image.pixels.shape} (C, H, W) where others are {first.pixels.shape}"
        elif (orientation is None) != (other is None) or (
            other is not None and not np.allclose(orientation, other, atol=1e-3)
        ):
            problem = "has a different ImageOrientationPatient"
        if problem:
            raise _error(folder, "inconsistent_series", f"{name} {problem}")


def _slice_order(folder: Path, headers: list[Dataset]) -> tuple[list[int], float]:
    """Slice order and spacing: by position along the normal, else by InstanceNumber."""
    normal = _normal(headers[0])
    positions = [_floats(h, "ImagePositionPatient", 3) for h in headers]
    if normal is not None and all(positions):
        offsets = [float(np.dot(p, normal)) for p in positions]
        order = sorted(range(len(headers)), key=offsets.__getitem__)
        gaps = np.diff([offsets[i] for i in order])
        if len(gaps) and gaps.min() < 1e-3:
            detail = "two files lie at the same slice position (repeated or mixed acquisitions)"
            raise _error(folder, "inconsistent_series", detail)
        return order, float(np.median(gaps)) if len(gaps) else _nominal_slice_spacing(headers[0])
    numbers = [_floats(h, "InstanceNumber", 1) for h in headers]
    order = list(range(len(headers)))
    if all(numbers):
        order.sort(key=lambda i: numbers[i][0])
    return order, _nominal_slice_spacing(headers[0])


# ----------------------------------------------------------------------------- small readers


def _meta(ds: Dataset, photometric: str, frames: int) -> dict[str, object]:
    """Non-identifying metadata: never names, ids, dates or other PS3.15 identifiers."""
    bits = _floats(ds, "BitsStored", 1)
    slope, intercept = (None, None) if "ModalityLUTSequence" in ds else _rescale(ds)
    return {
        "modality": _text(ds, "Modality"),
        "photometric_interpretation": photometric,
        "transfer_syntax": ds.file_meta.TransferSyntaxUID.name,
        "bits_stored": int(bits[0]) if bits else None,
        "rows": int(ds.Rows),
        "columns": int(ds.Columns),
        "n_frames": frames,
        "rescale_slope": slope,
        "rescale_intercept": intercept,
        "body_part": _text(ds, "BodyPartExamined"),
        "view_position": _text(ds, "ViewPosition"),
        "patient_orientation": _joined(ds, "PatientOrientation"),
        "sop_class": _text(ds, "SOPClassUID", uid=True),
    }


def _joined(ds: Dataset, keyword: str) -> str | None:
    """A multi-valued text (PatientOrientation "L\\F") as DICOM writes it, None if absent."""
    try:
        value = ds.get(keyword)
        values = value if isinstance(value, (list, tuple, MultiValue)) else [value]
        text = "\\".join(str(v).strip() for v in values if v is not None)
        return text or None
    except Exception:
        return None


def _text(ds: Dataset, keyword: str, uid: bool = False) -> str | None:
    """A header value as stripped text (a UID as its name), None when absent or unreadable
    (with `uid`, also when not a valid UID)."""
    try:
        value = ds.get(keyword)
        text = "" if value is None else str(value).strip()
        if not text or not uid:
            return text or None
        value = uids.UID(text, validation_mode=pydicom.config.IGNORE)  # a warning would quote it
        return value.name if value.is_valid else None
    except Exception:
        return None


def _floats(ds: Dataset | None, keyword: str, count: int | None = None) -> list[float] | None:
    """The first `count` (default all) values of a numeric attribute as finite floats, or None."""
    try:
        value = ds.get(keyword) if ds is not None else None
        many = isinstance(value, (MultiValue, list, tuple))
        values = [float(v) for v in (value if many else [value])][:count]
    except Exception:
        return None
    wanted = count or max(len(values), 1)
    return values if len(values) == wanted and np.isfinite(values).all() else None


def _positive_int(path: Path, ds: Dataset, keyword: str, default: int | None = None) -> int:
    """A required positive integer attribute; decode_failed when missing or invalid."""
    value = number = None
    try:
        value = ds.get(keyword)
        number = default if value in (None, "") else int(value)
    except Exception:
        pass
    if number is None or number <= 0:
        raise _error(path, "decode_failed", f"missing or invalid {keyword} ({value!r})")
    return number


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


def _error(path: Path, reason: str, detail: str, hint: str | None = None) -> DicomError:
    return DicomError(path, reason, detail, hint or _HINTS[reason])
