"""read_dicom: modality units, display polarity, geometry, colour, codecs, and one typed error
for every way a file can fail, measured over every DICOM file pydicom ships."""

import logging
import os
import random
import re
import shutil
import struct
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import apply_color_lut, convert_color_space, get_decoder
from pydicom.sequence import Sequence
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)

from clinfuse.data.dicom import DicomImage, apply_window, default_window, read_dicom
from clinfuse.errors import DicomError

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
IDENTIFIERS = {"PatientName": "Doe^Jane", "PatientID": "MRN-0042", "PatientBirthDate": "19700101"}


@pytest.fixture(autouse=True)
def _quiet_pydicom():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the odd files it is shown on purpose
        yield


def shipped(name: str) -> str:
    """A test file bundled inside pydicom (never downloaded)."""
    path = get_testdata_file(name, download=False)
    assert path is not None, f"{name} is not bundled with this pydicom"
    return path


def make_dataset(pixels: np.ndarray, photometric: str = "MONOCHROME2", **attrs) -> Dataset:
    """A valid CT image data set holding `pixels`, plus any extra attributes."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.Modality = "CT"
    for keyword, value in IDENTIFIERS.items():
        setattr(ds, keyword, value)
    bits = attrs.pop("BitsStored", pixels.dtype.itemsize * 8)
    ds.set_pixel_data(pixels, photometric, bits)
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    return ds


def write(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_image(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2", **attrs) -> Path:
    return write(make_dataset(pixels, photometric, **attrs), path)


def reason_of(path) -> str:
    with pytest.raises(DicomError) as caught:
        read_dicom(path)
    assert str(path) in str(caught.value)  # every error names the file or folder
    return caught.value.reason


# ----------------------------------------------------------------------------- values


def test_rescale_slope_and_intercept_give_exact_modality_values(tmp_path):
    stored = np.array([[0, 1], [2, 4095]], dtype=np.uint16)
    path = write_image(
        tmp_path / "ct.dcm", stored, BitsStored=12, RescaleSlope=0.5, RescaleIntercept=-1024
    )
    image = read_dicom(path)
    assert image.pixels.dtype == np.float32 and image.pixels.shape == (1, 2, 2)
    assert image.spatial_dims == 2
    np.testing.assert_array_equal(image.pixels[0], [[-1024, -1023.5], [-1023, 1023.5]])
    assert (image.meta["rescale_slope"], image.meta["rescale_intercept"]) == (0.5, -1024)


def test_window_is_the_files_first_value_and_percentiles_otherwise(tmp_path):
    pixels = np.arange(100, dtype=np.int16).reshape(10, 10)
    windowed = write_image(
        tmp_path / "w.dcm", pixels, WindowCenter=[40, 300], WindowWidth=[400, 1500]
    )
    image = read_dicom(windowed)
    assert image.window == (40.0, 400.0) and default_window(image) == (40.0, 400.0)
    plain = read_dicom(write_image(tmp_path / "p.dcm", pixels))
    assert plain.window is None
    center, width = default_window(plain)
    low, high = np.percentile(pixels, [0.5, 99.5])
    assert center == pytest.approx((low + high) / 2) and width == pytest.approx(high - low)


def test_voi_lut_sequence_gives_a_window_over_its_input_range(tmp_path):
    lut = Dataset()
    lut.add_new("LUTDescriptor", "SS", [256, -100, 8])
    lut.add_new("LUTData", "US", list(range(256)))
    pixels = np.zeros((4, 4), dtype=np.int16)
    image = read_dicom(write_image(tmp_path / "v.dcm", pixels, VOILUTSequence=Sequence([lut])))
    assert image.window == (28.0, 256.0)  # maps [-100, 155] like the LUT does


def test_monochrome1_is_inverted_so_the_same_tissue_ends_brighter(tmp_path):
    stored = np.array([[100, 3000]], dtype=np.uint16)  # in MONOCHROME1, 100 displays brighter
    attrs = {"BitsStored": 12, "WindowCenter": 1500, "WindowWidth": 2000, "RescaleIntercept": 0}
    attrs["RescaleSlope"] = 1
    image = read_dicom(write_image(tmp_path / "cr.dcm", stored, "MONOCHROME1", **attrs))
    np.testing.assert_array_equal(image.pixels[0], [[4095 - 100, 4095 - 3000]])
    assert image.window == (4095 - 1500, 2000)
    shown = apply_window(image.pixels, *image.window)[0, 0]
    assert shown[0] > shown[1]
    # what a MONOCHROME1 viewer shows: the inverse of the window applied to the stored values
    viewer = 1 - apply_window(stored.astype(float), 1500, 2000)[0]
    np.testing.assert_allclose(shown, viewer, atol=1 / 1999 + 1e-6)
    assert image.meta["photometric_interpretation"] == "MONOCHROME1"


def test_signed_pixels_and_bits_stored_below_bits_allocated(tmp_path):
    # 12 bits stored in 16 allocated; the high 4 bits hold junk (as overlays once did)
    raw = np.array([[0x0FFB, 0x07FF, 0x0800, 0xF123]], dtype="<u2")
    signed = make_dataset(np.zeros(raw.shape, np.int16), BitsStored=12)
    unsigned = make_dataset(np.zeros(raw.shape, np.uint16), BitsStored=12)
    signed.PixelData = unsigned.PixelData = raw.tobytes()
    np.testing.assert_array_equal(read_dicom(write(signed, tmp_path / "s.dcm")).pixels[0],
                                  [[-5, 2047, -2048, 291]])  # fmt: skip
    np.testing.assert_array_equal(read_dicom(write(unsigned, tmp_path / "u.dcm")).pixels[0],
                                  [[4091, 2047, 2048, 291]])  # fmt: skip


def test_float_pixel_data_is_read_as_is(tmp_path):
    ds = make_dataset(np.zeros((2, 2), dtype=np.uint16))
    del ds.PixelData, ds.BitsStored, ds.HighBit, ds.PixelRepresentation
    ds.BitsAllocated = 32
    ds.FloatPixelData = np.array([1.5, -2.25, 3e3, 0], dtype="<f4").tobytes()
    image = read_dicom(write(ds, tmp_path / "f.dcm"))
    np.testing.assert_array_equal(image.pixels[0], [[1.5, -2.25], [3e3, 0]])
    ds.FloatPixelData = np.array([1, np.nan, 0, 0], dtype="<f4").tobytes()
    assert reason_of(write(ds, tmp_path / "nan.dcm")) == "decode_failed"  # never NaN downstream


def test_modality_lut_sequence_maps_stored_values(tmp_path):
    lut = Dataset()
    lut.add_new("LUTDescriptor", "US", [4, 0, 16])
    lut.add_new("LUTData", "US", [10, 20, 30, 40])
    pixels = np.array([[0, 1], [2, 3]], dtype=np.uint16)
    image = read_dicom(write_image(tmp_path / "m.dcm", pixels, ModalityLUTSequence=[lut]))
    np.testing.assert_array_equal(image.pixels[0], [[10, 20], [30, 40]])
    assert image.meta["rescale_slope"] is None


def test_meta_is_non_identifying(tmp_path):
    path = write_image(tmp_path / "id.dcm", np.zeros((4, 6), np.uint16), BodyPartExamined="CHEST")
    meta = read_dicom(path).meta
    assert set(meta) == {
        "modality", "photometric_interpretation", "transfer_syntax", "bits_stored", "rows",
        "columns", "n_frames", "rescale_slope", "rescale_intercept", "body_part",
        "view_position", "patient_orientation", "sop_class",
    }  # fmt: skip
    assert (meta["rows"], meta["columns"], meta["body_part"]) == (4, 6, "CHEST")
    assert meta["sop_class"] == "CT Image Storage"
    assert meta["transfer_syntax"] == "Explicit VR Little Endian"
    assert not set(map(str, meta.values())) & set(IDENTIFIERS.values())


def test_apply_window_is_the_dicom_linear_function():
    center, width = 40.0, 400.0
    low, high = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
    x = np.array([low - 10, low, center - 0.5, high, high + 10])
    out = apply_window(x, center, width)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [0, 0, 0.5, 1, 1], atol=1e-6)
    np.testing.assert_allclose(apply_window(np.array([0.2, 0.5, 0.8]), 0.5, 0.6), [0, 0.5, 1])
    with pytest.raises(ValueError):
        apply_window(x, center, 0)


def test_dicom_image_is_immutable(tmp_path):
    image = read_dicom(write_image(tmp_path / "a.dcm", np.zeros((2, 2), np.uint8)))
    with pytest.raises(AttributeError):
        image.window = (0.0, 1.0)


# ----------------------------------------------------------------------------- geometry


def test_pixel_spacing_then_imager_pixel_spacing_then_one(tmp_path):
    pixels = np.zeros((2, 2), np.uint8)
    both = write_image(tmp_path / "a.dcm", pixels, PixelSpacing=[0.5, 0.7],
                       ImagerPixelSpacing=[0.1, 0.1])  # fmt: skip
    imager = write_image(tmp_path / "b.dcm", pixels, ImagerPixelSpacing=[0.2, 0.3])
    assert read_dicom(both).spacing == (0.5, 0.7)
    assert read_dicom(imager).spacing == (0.2, 0.3)
    assert read_dicom(write_image(tmp_path / "c.dcm", pixels)).spacing == (1.0, 1.0)


def test_multiframe_file_is_a_channel_first_volume(tmp_path):
    frames = np.arange(3 * 4 * 5, dtype=np.uint16).reshape(3, 4, 5)
    path = write_image(tmp_path / "mf.dcm", frames, NumberOfFrames=3, PixelSpacing=[0.5, 0.7],
                       SpacingBetweenSlices=2.5)  # fmt: skip
    image = read_dicom(path)
    assert image.pixels.shape == (1, 3, 4, 5) and image.spatial_dims == 3
    np.testing.assert_array_equal(image.pixels[0], frames)
    assert image.spacing == (2.5, 0.5, 0.7) and image.meta["n_frames"] == 3
    dose = read_dicom(shipped("rtdose.dcm"))  # frame spacing from GridFrameOffsetVector
    assert dose.pixels.shape == (1, 15, 10, 10) and dose.spacing == (5.0, 10.0, 10.0)


def test_enhanced_multiframe_geometry_from_functional_groups(tmp_path):
    frames = np.zeros((3, 2, 2), dtype=np.uint16)
    measures, shared = Dataset(), Dataset()
    measures.PixelSpacing, measures.SliceThickness = [0.8, 0.9], 5.0
    orientation = Dataset()
    orientation.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    shared.PixelMeasuresSequence, shared.PlaneOrientationSequence = [measures], [orientation]
    per_frame = []
    for z in (0.0, 1.5, 3.0):
        position, item = Dataset(), Dataset()
        position.ImagePositionPatient = [0, 0, z]
        item.PlanePositionSequence = [position]
        per_frame.append(item)
    path = write_image(tmp_path / "e.dcm", frames, NumberOfFrames=3,
                       SharedFunctionalGroupsSequence=[shared],
                       PerFrameFunctionalGroupsSequence=per_frame)  # fmt: skip
    assert read_dicom(path).spacing == (1.5, 0.8, 0.9)

    # frames stored out of position order, each with its own rescale: read along the normal,
    # each frame in its own units (as a series folder of the same slices is read)
    stored = np.stack([np.full((2, 2), v, np.uint16) for v in (30, 10, 20)])
    for item, z, slope in zip(per_frame, (3.0, 0.0, 1.5), (1.0, 2.0, 4.0), strict=True):
        item.PlanePositionSequence[0].ImagePositionPatient = [0, 0, z]
        transform = Dataset()
        transform.RescaleSlope, transform.RescaleIntercept = slope, -1000
        item.PixelValueTransformationSequence = [transform]
    path = write_image(tmp_path / "shuffled.dcm", stored, NumberOfFrames=3,
                       SharedFunctionalGroupsSequence=[shared],
                       PerFrameFunctionalGroupsSequence=per_frame)  # fmt: skip
    image = read_dicom(path)
    values = image.pixels[0, :, 0, 0]  # z = 0, 1.5, 3: stored 10 x 2, 20 x 4, 30 x 1, - 1000
    np.testing.assert_array_equal(values, [-980.0, -920.0, -970.0])
    assert image.spacing == (1.5, 0.8, 0.9)
    for item in per_frame:  # one position for every frame (cine): the file's own order
        item.PlanePositionSequence[0].ImagePositionPatient = [0, 0, 0]
    path = write_image(tmp_path / "cine.dcm", stored, NumberOfFrames=3,
                       SharedFunctionalGroupsSequence=[shared],
                       PerFrameFunctionalGroupsSequence=per_frame)  # fmt: skip
    np.testing.assert_array_equal(read_dicom(path).pixels[0, :, 0, 0], [-970.0, -980.0, -920.0])


def write_series(
    folder: Path, zs, orientation=(1, 0, 0, 0, 1, 0), shape=(3, 4), series=None, prefix="", **attrs
) -> Path:
    """One file per slice, named in an order unrelated to position; each slice's value is z."""
    series = series or generate_uid()
    normal = np.cross(orientation[:3], orientation[3:])
    names = [f"{prefix}{n:03d}.dcm" for n in random.Random(7).sample(range(900), len(zs))]
    for i, (z, name) in enumerate(zip(zs, names, strict=True)):
        pixels = np.full(shape, round(z * 10), dtype=np.int16)  # stored value = 10 * z
        write_image(folder / name, pixels, SeriesInstanceUID=series, RescaleSlope=0.1,
                    RescaleIntercept=0, ImageOrientationPatient=list(orientation),
                    ImagePositionPatient=list(z * normal), InstanceNumber=(7 * i) % 5 + 1,
                    **attrs)  # fmt: skip
    return folder


@pytest.mark.parametrize(
    "orientation",
    [(1, 0, 0, 0, 1, 0), (0, 1, 0, 0, 0, -1)],  # axial; sagittal (normal along -x)
)
def test_series_folder_is_ordered_along_the_normal_with_slice_spacing(tmp_path, orientation):
    zs = [7.5, -5.0, 0.0, 10.0, 2.5, -2.5, 5.0]  # shuffled, 2.5 mm apart
    folder = write_series(tmp_path / "series", zs, orientation, PixelSpacing=[0.6, 0.6])
    (folder / "README.txt").write_text("exported by PACS\n")  # not DICOM: skipped
    image = read_dicom(folder)
    assert image.pixels.shape == (1, 7, 3, 4) and image.spatial_dims == 3
    np.testing.assert_allclose(image.pixels[0, :, 0, 0], sorted(zs), atol=1e-5)
    assert image.spacing == pytest.approx((2.5, 0.6, 0.6))
    assert image.meta["n_frames"] == 7


def test_series_without_positions_is_ordered_by_instance_number(tmp_path):
    for number in (3, 1, 2):
        pixels = np.full((2, 2), number, dtype=np.uint16)
        write_image(tmp_path / "s" / f"{9 - number}.dcm", pixels, InstanceNumber=number,
                    SliceThickness=4.0)  # fmt: skip
    image = read_dicom(tmp_path / "s")
    np.testing.assert_array_equal(image.pixels[0, :, 0, 0], [1, 2, 3])
    assert image.spacing == (4.0, 1.0, 1.0)
    (tmp_path / "s" / "9.dcm").symlink_to(tmp_path / "unmounted" / "slice.dcm")
    with pytest.raises(DicomError, match="entry 4 of 4 .in name order. links to no file") as lost:
        read_dicom(tmp_path / "s")  # a slice on storage not mounted: not a shorter volume
    assert lost.value.reason == "missing"


def test_folder_with_one_file_is_still_a_volume(tmp_path):
    write_image(tmp_path / "mf" / "a.dcm", np.zeros((4, 2, 2), np.uint8), NumberOfFrames=4)
    assert read_dicom(tmp_path / "mf").pixels.shape == (1, 4, 2, 2)
    write_image(tmp_path / "one" / "a.dcm", np.zeros((2, 2), np.uint8), SliceThickness=3.0)
    single = read_dicom(tmp_path / "one")
    assert single.pixels.shape == (1, 1, 2, 2) and single.spacing == (3.0, 1.0, 1.0)


# ----------------------------------------------------------------------------- colour


def test_rgb_is_three_channels_first():
    image = read_dicom(shipped("ExplVR_BigEnd.dcm"))
    reference = pydicom.dcmread(shipped("ExplVR_BigEnd.dcm")).pixel_array  # (H, W, 3)
    assert image.pixels.shape == (3, 60, 80) and image.window is None
    np.testing.assert_array_equal(image.pixels, np.moveaxis(reference, -1, 0))


def test_ybr_full_is_converted_to_rgb(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (8, 10, 3), dtype=np.uint8)
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    image = read_dicom(write_image(tmp_path / "ybr.dcm", ybr, "YBR_FULL"))
    assert image.pixels.shape == (3, 8, 10)
    np.testing.assert_allclose(image.pixels, np.moveaxis(rgb, -1, 0), atol=2)  # 8-bit rounding
    ybr_422 = read_dicom(shipped("SC_ybr_full_422_uncompressed.dcm")).pixels
    assert np.abs(ybr_422 - read_dicom(shipped("SC_rgb_rle.dcm")).pixels).mean() < 1


def test_palette_color_is_applied_to_rgb():
    path = shipped("examples_palette.dcm")
    image = read_dicom(path)
    ds = pydicom.dcmread(path)
    expected = np.moveaxis(apply_color_lut(ds.pixel_array, ds), -1, 0)
    assert image.pixels.shape == (3, 350, 800)
    np.testing.assert_array_equal(image.pixels, expected)


# ----------------------------------------------------------------------------- codecs

LOSSLESS_PAIRS = [  # (compressed, uncompressed original) shipped with pydicom
    ("MR_small_RLE.dcm", "MR_small.dcm"),  # RLE
    ("MR_small_jp2klossless.dcm", "MR_small.dcm"),  # JPEG 2000 lossless
    ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm"),  # JPEG-LS lossless
    ("MR_small_bigendian.dcm", "MR_small.dcm"),  # explicit big endian
    ("MR_small_implicit.dcm", "MR_small.dcm"),  # implicit little endian
    ("SC_rgb_jpeg_gdcm.dcm", "SC_rgb_rle.dcm"),  # JPEG lossless, process 14 SV1
    ("SC_rgb_gdcm_KY.dcm", "SC_rgb_rle.dcm"),  # JPEG 2000 (reversible)
    ("rtdose_rle.dcm", "rtdose.dcm"),  # RLE, 32-bit multi-frame
]
LOSSY_PAIRS = [  # (compressed, original, largest error the codec allows)
    ("SC_rgb_jpeg.dcm", "SC_rgb_jpeg_dcmd.dcm", 1),  # JPEG baseline, RGB
    ("SC_rgb_jpeg_dcmtk.dcm", "SC_rgb_rle.dcm", 6),  # JPEG baseline, YBR_FULL
    ("SC_rgb_jls_lossy_line.dcm", "SC_rgb_rle.dcm", 2),  # JPEG-LS near-lossless, NEAR=2
]


@pytest.mark.parametrize(("compressed", "original"), LOSSLESS_PAIRS)
def test_lossless_syntaxes_decode_to_the_original_pixels(compressed, original):
    image, reference = read_dicom(shipped(compressed)), read_dicom(shipped(original))
    np.testing.assert_array_equal(image.pixels, reference.pixels)
    assert image.window == reference.window and image.spacing == reference.spacing


@pytest.mark.parametrize(("compressed", "original", "tolerance"), LOSSY_PAIRS)
def test_lossy_syntaxes_decode_close_to_the_original(compressed, original, tolerance):
    image, reference = read_dicom(shipped(compressed)), read_dicom(shipped(original))
    assert image.pixels.shape == reference.pixels.shape
    assert np.abs(image.pixels - reference.pixels).max() <= tolerance


@pytest.mark.parametrize(
    "syntax",
    [
        RLELossless,
        JPEG2000Lossless,
        DeflatedExplicitVRLittleEndian,
        ExplicitVRBigEndian,
        ImplicitVRLittleEndian,
    ],  # fmt: skip
)
def test_signed_ct_with_rescale_survives_every_writable_syntax(tmp_path, syntax):
    pixels = np.random.default_rng(1).integers(-1024, 3071, (2, 64, 64), dtype=np.int16)
    attrs = {"NumberOfFrames": 2, "RescaleSlope": 1, "RescaleIntercept": -1024}
    original, encoded = make_dataset(pixels, **attrs), make_dataset(pixels, **attrs)
    if syntax in (RLELossless, JPEG2000Lossless):
        encoded.compress(syntax)
    else:
        encoded.file_meta.TransferSyntaxUID = syntax
    if syntax == ExplicitVRBigEndian:  # pydicom writes pixel bytes as given
        encoded.PixelData = pixels.astype(">i2").tobytes()
    expected = read_dicom(write(original, tmp_path / "original.dcm")).pixels
    decoded = read_dicom(write(encoded, tmp_path / "encoded.dcm")).pixels
    np.testing.assert_array_equal(decoded, expected)
    np.testing.assert_array_equal(expected[0], pixels.astype(np.float32) - 1024)


@pytest.mark.parametrize("little_endian", [True, False])
def test_raw_data_set_without_preamble_is_read(tmp_path, little_endian):
    pixels = np.arange(6, dtype=np.uint16).reshape(2, 3)
    ds = make_dataset(pixels)
    del ds.file_meta
    ds.PixelData = pixels.astype("<u2" if little_endian else ">u2").tobytes()
    path = tmp_path / "raw.dcm"
    pydicom.dcmwrite(path, ds, implicit_vr=little_endian, little_endian=little_endian)
    assert path.read_bytes()[128:132] != b"DICM"
    np.testing.assert_array_equal(read_dicom(path).pixels[0], pixels)
    ds.PixelData = encapsulate([b"\xff\x4f" + bytes(20)])  # compressed, but with which codec?
    ds["PixelData"].VR, ds["PixelData"].is_undefined_length = "OB", True
    pydicom.dcmwrite(path, ds, implicit_vr=False, little_endian=True)
    assert reason_of(path) == "no_decoder"


# ----------------------------------------------------------------------------- errors


def test_missing_path(tmp_path):
    assert reason_of(tmp_path / "nowhere.dcm") == "missing"
    assert reason_of(tmp_path / "bad\0name.dcm") == "missing"  # a path no file system holds


def test_a_path_that_names_nothing_says_why_where_it_can(tmp_path):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")  # a loop: not "no such file"
    for path, says in (
        (tmp_path / "a", "cannot be reached (Too many levels of symbolic links)"),
        (tmp_path / "~" / "S1.dcm", "a path with ~ is not expanded here"),
        (tmp_path / "images\\S1.dcm", "backslashes are not folder separators here"),
    ):
        with pytest.raises(DicomError, match=re.escape(says)) as caught:
            read_dicom(path)
        assert caught.value.reason == "missing"


def test_text_file_and_named_pipe_are_not_dicom(tmp_path):
    text = tmp_path / "note.dcm"
    text.write_text("Chest X-ray: no acute findings.\n" * 20)
    assert reason_of(text) == "not_dicom"
    assert reason_of(shipped("zipMR.gz")) == "not_dicom"
    broken = tmp_path / "broken.bin"  # looks like an element header, then breaks the parser
    broken.write_bytes(b"\x08\x00\x05\x00SQ\x00\x00\xff\xff\xff\xff" + bytes(range(256)))
    assert reason_of(broken) == "not_dicom"
    if hasattr(os, "mkfifo"):  # a pipe must not block the reader forever
        os.mkfifo(tmp_path / "pipe")
        assert reason_of(tmp_path / "pipe") == "not_dicom"


@pytest.mark.parametrize("fraction", [0.05, 0.3, 0.6, 0.99])
@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small_RLE.dcm", "examples_ybr_color.dcm"])
def test_truncated_copy_of_a_real_file(tmp_path, name, fraction):
    data = Path(shipped(name)).read_bytes()
    cut = tmp_path / name
    cut.write_bytes(data[: max(400, int(len(data) * fraction))])
    assert reason_of(cut) == "truncated"


def test_truncated_inside_a_header_sequence_and_shipped_truncated_files(tmp_path):
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(Path(shipped("JPEG2000.dcm")).read_bytes()[:1000])  # inside (0008,2112)
    assert reason_of(cut) == "truncated"
    assert reason_of(shipped("MR_truncated.dcm")) == "truncated"
    assert reason_of(shipped("rtplan_truncated.dcm")) == "truncated"


def test_pixel_data_shorter_than_the_header_declares(tmp_path):
    ds = make_dataset(np.zeros((4, 4), np.uint16))
    ds.Rows = 8
    assert reason_of(write(ds, tmp_path / "short.dcm")) == "truncated"


def test_dicom_without_pixel_data(tmp_path):
    ds = make_dataset(np.zeros((2, 2), np.uint8))
    del ds.PixelData
    for keyword in ("Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit"):
        delattr(ds, keyword)
    assert reason_of(write(ds, tmp_path / "report.dcm")) == "no_pixel_data"
    assert reason_of(shipped("rtplan.dcm")) == "no_pixel_data"
    assert reason_of(shipped("test-SR.dcm")) == "no_pixel_data"


def header_as_exports_read_it(path: Path) -> None:
    """The FHIR/SR exports' reading of a source header, and a note's masking of its names:
    values are used after the file is read (pydicom converts them then)."""
    from clinfuse.data.identifiers import header_identifiers
    from clinfuse.exports.files import read_source, referable

    sources = read_source(path)
    referable(sources, "S1")
    header_identifiers(sources[0])


@pytest.mark.parametrize("reader", [read_dicom, header_as_exports_read_it])
def test_a_damaged_header_is_never_quoted_in_an_error_or_a_warning(tmp_path, caplog, reader):
    """A damaged length makes the SOP class swallow the elements after it (the patient's name,
    id and birth date): errors and pydicom's warnings must not quote what it read, when the
    image is read or when its header is read for the exports."""
    source = write_image(tmp_path / "source.dcm", np.zeros((4, 4), np.uint16)).read_bytes()
    at = source.index(b"\x08\x00\x16\x00UI", 132)  # (0008,0016) SOP Class UID, explicit VR
    damaged = tmp_path / "damaged.dcm"
    caplog.set_level(logging.DEBUG)
    told = []
    for length in range(26, 1200, 2):
        data = bytearray(source)
        struct.pack_into("<H", data, at + 6, length)
        damaged.write_bytes(bytes(data))
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            try:
                reader(damaged)
            except DicomError as exc:
                told.append(str(exc))
        told += [str(w.message) for w in warned]
    told.append(caplog.text)
    # the damage was seen: ~50-60 errors and warnings for the exports' reading (the count
    # moves with the random UIDs' lengths; a bound of 50 failed one run in ten), more for read_dicom
    assert len(told) > 25
    for value in IDENTIFIERS.values():
        assert not [t for t in told if value in t or value.replace("^", " ") in t], value


def test_value_checks_are_off_while_any_thread_reads_and_back_on_after_the_last(tmp_path):
    """pydicom's setting is process-wide; dashboard sessions read in threads of one process."""
    import threading

    from clinfuse.data import dicom

    path = write_image(tmp_path / "a.dcm", np.zeros((4, 4), np.uint16))
    before = pydicom.config.settings.reading_validation_mode
    inside = threading.Event()
    release = threading.Event()

    def hold() -> None:
        with dicom._unchecked_values():
            inside.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    inside.wait(10)
    read_dicom(path)  # enters and leaves while the other thread still reads
    assert pydicom.config.settings.reading_validation_mode == pydicom.config.IGNORE
    release.set()
    holder.join(10)
    assert pydicom.config.settings.reading_validation_mode == before


def test_errors_are_printable_text_naming_no_file_of_a_series(tmp_path):
    """A NUL in a damaged UID, or a file name that is not UTF-8, would stop a PostgreSQL write;
    a series' file names may hold the patient's: the error holds none of them."""
    ds = make_dataset(np.zeros((2, 2), np.uint8), SOPClassUID="1.2.3.4\x005")
    del ds.PixelData
    for keyword in ("Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit"):
        delattr(ds, keyword)
    with pytest.raises(DicomError) as caught:
        read_dicom(write(ds, tmp_path / "report.dcm"))
    assert caught.value.reason == "no_pixel_data" and "\x00" not in str(caught.value)
    folder = write_series(tmp_path / "series", [0.0, 1.0], prefix="DOE_JANE_")
    write_image(Path(os.fsdecode(bytes(folder) + b"/M\xfcller.dcm")), np.zeros((5, 5), np.int16))
    with pytest.raises(DicomError) as caught:
        read_dicom(folder)
    text = str(caught.value).replace(str(folder), "")
    assert caught.value.reason == "inconsistent_series"
    assert "DOE" not in text and "ller" not in text and "DICOM image 3 of 3" in text
    text.encode("utf-8")  # no lone surrogate left


def test_pixel_data_on_a_jpip_server_is_no_decoder(tmp_path):
    ds = make_dataset(np.zeros((2, 2), np.uint8))
    del ds.PixelData
    ds.PixelDataProviderURL = "https://pacs.example.org/jpip?id=1"
    assert reason_of(write(ds, tmp_path / "jpip.dcm")) == "no_decoder"


def swap_syntax(path: Path, old: str, new: str) -> Path:
    """Rewrite the transfer syntax UID in place (same padded length, so the meta stays valid)."""
    data = path.read_bytes()
    assert len(old) == len(new) and data.count(old.encode()) == 1
    path.write_bytes(data.replace(old.encode(), new.encode()))
    return path


def test_syntax_without_any_decoder_names_it(tmp_path):
    ds = make_dataset(np.zeros((4, 4), np.uint8))
    ds.file_meta.TransferSyntaxUID = HTJ2KLossless
    ds.PixelData = encapsulate([b"\xff\x0a" + bytes(14)])
    path = swap_syntax(write(ds, tmp_path / "jxl.dcm"), HTJ2KLossless, "1.2.840.10008.1.2.4.110")
    with pytest.raises(DicomError) as caught:
        read_dicom(path)
    assert caught.value.reason == "no_decoder"
    assert "1.2.840.10008.1.2.4.110" in str(caught.value)  # JPEG XL: no pydicom plugin


def test_missing_plugin_names_the_package_to_install(monkeypatch):
    decoder = get_decoder(JPEG2000Lossless)
    monkeypatch.setattr(decoder, "_available", {})  # as if pylibjpeg-openjpeg were absent
    with pytest.raises(DicomError) as caught:
        read_dicom(shipped("MR_small_jp2klossless.dcm"))
    assert caught.value.reason == "no_decoder"
    assert "JPEG 2000" in str(caught.value) and "pylibjpeg-openjpeg" in caught.value.hint


def test_unsupported_photometric(tmp_path):
    ds = make_dataset(np.zeros((2, 2, 3), np.uint8), "RGB")
    ds.PhotometricInterpretation = "HSV"
    assert reason_of(write(ds, tmp_path / "hsv.dcm")) == "unsupported_photometric"
    palette = make_dataset(np.zeros((2, 2), np.uint8), "PALETTE COLOR")  # but no palette
    assert reason_of(write(palette, tmp_path / "pal.dcm")) == "unsupported_photometric"
    grey_rgb = make_dataset(np.zeros((2, 2, 3), np.uint8), "RGB")
    grey_rgb.PhotometricInterpretation = "MONOCHROME2"  # three samples cannot be grey
    assert reason_of(write(grey_rgb, tmp_path / "grey.dcm")) == "unsupported_photometric"


def test_decoder_failure_on_corrupt_data(tmp_path):
    ds = make_dataset(np.zeros((4, 4), np.uint8))
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(40)])  # a J2K marker, then nonsense
    assert reason_of(write(ds, tmp_path / "bad.dcm")) == "decode_failed"
    assert reason_of(shipped("JPEG2000-embedded-sequence-delimiter.dcm")) == "decode_failed"
    assert reason_of(shipped("badVR.dcm")) == "decode_failed"  # NumberOfFrames '1A'
    lut = Dataset()
    lut.add_new("LUTDescriptor", "US", [4])  # needs three values
    lut.add_new("LUTData", "US", [1, 2, 3, 4])
    bad_lut = make_dataset(np.zeros((2, 2), np.uint16), ModalityLUTSequence=[lut])
    assert reason_of(write(bad_lut, tmp_path / "lut.dcm")) == "decode_failed"


def test_header_declaring_a_giant_image_fails_fast(tmp_path):
    ds = make_dataset(np.zeros((4, 4), np.uint16))
    ds.Rows, ds.Columns, ds.NumberOfFrames = 60000, 60000, 1000  # 7 TB of float32
    assert reason_of(write(ds, tmp_path / "giant.dcm")) == "decode_failed"


@pytest.mark.parametrize(
    "odd",
    [
        {"shape": (5, 5)},
        {"orientation": (0, 1, 0, 0, 0, -1)},
        {"series": "1.2.3.4.5"},
        {"zs": [2.5]},  # a second slice at a position already taken
    ],
    ids=["size", "orientation", "series", "same_position"],
)
def test_inconsistent_series(tmp_path, odd):
    series = generate_uid()
    folder = write_series(tmp_path / "s", [0.0, 2.5, 5.0], series=series)
    write_series(folder, **{"zs": [7.5], "series": series, "prefix": "odd", **odd})
    assert reason_of(folder) == "inconsistent_series"


def test_multiframe_file_among_slices_is_inconsistent(tmp_path):
    folder = write_series(tmp_path / "s", [0.0, 2.5])
    write_image(folder / "cine.dcm", np.zeros((2, 3, 4), np.int16), NumberOfFrames=2)
    assert reason_of(folder) == "inconsistent_series"


def test_empty_series(tmp_path):
    (tmp_path / "empty").mkdir()
    assert reason_of(tmp_path / "empty") == "empty_series"
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "report.txt").write_text("no images here")
    shutil.copy(shipped("rtplan.dcm"), tmp_path / "notes" / "plan.dcm")
    assert reason_of(tmp_path / "notes") == "empty_series"


def test_error_inside_a_series_names_the_bad_file(tmp_path):
    folder = write_series(tmp_path / "s", [0.0, 2.5])
    (folder / "bad.dcm").write_bytes(Path(shipped("CT_small.dcm")).read_bytes()[:20000])
    with pytest.raises(DicomError) as caught:
        read_dicom(folder)
    assert caught.value.reason == "truncated" and caught.value.path.endswith("bad.dcm")


# ----------------------------------------------------------------------------- every shipped file


def expected_shape(ds: Dataset) -> tuple[int, ...]:
    channels = 3 if int(ds.get("SamplesPerPixel", 1)) == 3 else 1
    if ds.PhotometricInterpretation == "PALETTE COLOR":
        channels = 3
    frames = int(ds.get("NumberOfFrames") or 1)
    return (
        (channels, frames, ds.Rows, ds.Columns) if frames > 1 else (channels, ds.Rows, ds.Columns)
    )


def test_every_file_pydicom_ships_decodes_or_raises_one_typed_error():
    """The measurement: no file escapes as another exception, and whatever pydicom itself can
    decode, read_dicom decodes too, to a finite float32 array of the header's shape."""
    files = sorted(p for p in TEST_FILES.rglob("*") if p.is_file())
    assert len(files) > 50
    decoded, failed = 0, {}
    for path in files:
        try:
            pydicom_ds = pydicom.dcmread(path)
            _ = pydicom_ds.pixel_array
        except Exception:
            pydicom_ds = None  # not something pydicom decodes either
        try:
            image = read_dicom(path)
        except DicomError as err:
            assert err.reason in DicomError.REASONS
            assert pydicom_ds is None, f"{path.name}: pydicom decodes it but read_dicom: {err}"
            failed[path.name] = err.reason
            continue
        assert isinstance(image, DicomImage) and image.pixels.dtype == np.float32
        assert np.isfinite(image.pixels).all(), path.name
        assert image.pixels.flags.c_contiguous
        assert len(image.spacing) == image.spatial_dims
        if pydicom_ds is not None:
            assert image.pixels.shape == expected_shape(pydicom_ds), path.name
        decoded += 1
    assert decoded >= 80, f"only {decoded} decoded; failures: {failed}"
    assert failed["MR_truncated.dcm"] == "truncated"
    assert failed["rtplan.dcm"] == "no_pixel_data"
    assert failed["README.txt"] == "not_dicom"


@pytest.mark.parametrize(
    ("original", "target", "fit"),
    [
        ((100, 80), (64, 64), "pad"),  # shrink, pad the short side
        ((30, 200), (64, 64), "pad"),  # a thin strip: odd padding, the smaller half first
        ((64, 64), (64, 64), "pad"),  # already the model's size
        ((20, 24), (64, 64), "stretch"),  # enlarge without padding
        ((10, 40, 20), (16, 32, 32), "pad"),  # a volume
    ],
)
def test_the_model_input_is_what_monai_resize_and_pad_make(original, target, fit):
    """Checkpoints trained with MONAI's Resize(mode="area") + SpatialPad(symmetric) see the
    same input from `fit_to_input`."""
    from monai.transforms import Resize, SpatialPad

    from clinfuse.config import PreprocessConfig
    from clinfuse.data.transforms import fit_geometry, fit_to_input

    spec = PreprocessConfig(spatial_size=target, fit=fit)
    pixels = torch.rand(2, *original, generator=torch.Generator().manual_seed(0))
    resized = Resize(fit_geometry(original, spec).resized, mode="area")(pixels)
    expected = torch.as_tensor(SpatialPad(target, method="symmetric")(resized))
    got = fit_to_input(pixels, spec)
    assert got.shape == (2, *target) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_an_image_stored_mirrored_is_read_as_stored_with_a_warning_naming_its_row(tmp_path):
    """A side the note names would disagree with the image's: said, study by study, by the
    manifest row (a folder name may hold the patient's name), never silently."""
    from clinfuse.data.manifest import StudyRow
    from clinfuse.data.study import load_study
    from clinfuse.errors import ImageWarning

    sample = Path(__file__).resolve().parents[1] / "sample_data" / "images" / "S00001.dcm"
    standard = pydicom.dcmread(sample)
    assert list(standard.PatientOrientation) == ["L", "F"]  # the sample data's standard view
    with warnings.catch_warnings():
        warnings.simplefilter("error", ImageWarning)  # a standard view: no warning
        stored = read_dicom(sample)
    folder = tmp_path / "DOE_JOHN"
    folder.mkdir()
    for name, orientation, says in (
        ("r.dcm", ["R", "F"], "mirrored"),
        ("h.dcm", ["L", "H"], "upside down"),
    ):
        standard.PatientOrientation = orientation
        standard.save_as(folder / name)
        with pytest.warns(ImageWarning, match=f"stored {says} \\(PatientOrientation") as said:
            image = read_dicom(folder / name)
        assert all("DOE" not in str(w.message) for w in said)  # as explain and the dashboard say it
        assert np.array_equal(image.pixels, stored.pixels)  # as stored
        assert image.meta["patient_orientation"] == "\\".join(orientation)
    row = StudyRow(4, "S1", "P1", folder / "r.dcm", None, None, "train", np.zeros(1, np.float32))
    with pytest.warns(ImageWarning, match="manifest row 4's image: stored mirrored") as said:
        load_study(row)
    assert all("DOE" not in str(w.message) for w in said)


def test_a_header_declaring_gigabytes_is_refused_before_decoding(tmp_path, monkeypatch):
    """A few MB of compressed data can declare a 46,000-pixel square: a decompression bomb
    that took a worker's memory. A series is bounded as a whole too."""
    from clinfuse.data import dicom

    sample = Path(__file__).resolve().parents[1] / "sample_data" / "images" / "S00001.dcm"
    ds = pydicom.dcmread(sample)
    ds.Rows = ds.Columns = 30000  # 900 M values: over the limit, and never decoded
    ds.save_as(tmp_path / "bomb.dcm")
    with pytest.raises(DicomError, match="1 frames of 30000x30000x1 exceed 536870912") as caught:
        read_dicom(tmp_path / "bomb.dcm")
    assert caught.value.reason == "decode_failed" and "downsample" in caught.value.hint
    series = tmp_path / "series"
    series.mkdir()
    for number in range(3):
        slice_ = pydicom.dcmread(sample)
        slice_.InstanceNumber = number + 1
        slice_.SOPInstanceUID = pydicom.uid.generate_uid(entropy_srcs=["bomb", str(number)])
        slice_.save_as(series / f"{number}.dcm")
    monkeypatch.setattr(dicom, "_MAX_SERIES_VALUES", 2 * 96 * 96)  # 2 slices of 96x96 at most
    with pytest.raises(DicomError, match="its first 3 slices hold more than 18432 values"):
        read_dicom(series)
