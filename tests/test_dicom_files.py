"""Real DICOM files (pydicom's bundled test set): good ones decode correctly, whatever their
transfer syntax; bad ones are quarantined with exact reason codes and never stop the site."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from common.config import DataConfig, SharedConfig
from common.data.dicom import FileProblem, read_header, read_pixels
from common.data.site import load_site

MR_VARIANTS = ["MR_small.dcm", "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm"]
GOOD = MR_VARIANTS + ["CT_small.dcm", "JPEG2000.dcm", "emri_small.dcm", "SC_rgb_rle_2frame.dcm"]
BAD = {"MR_truncated.dcm": "truncated-pixel-data", "no_meta.dcm": "missing-meta",
       # Not images of the patient, though a SEG and an RT dose carry pixel data.
       "rtplan.dcm": "non-image-object", "rtdose.dcm": "non-image-object", "liver_1frame.dcm": "non-image-object",
       "test-SR.dcm": "non-image-object",
       "random.dcm": "not-dicom", "empty.dcm": "empty-file",
       # Its 12-bit JPEG stream has a misplaced marker: libjpeg refuses it and Pillow has no 12-bit
       # JPEG Extended. Both decoders are installed, so this is a broken file, not a missing decoder.
       "JPEG-lossy.dcm": "undecodable-pixel-data"}


def _file(name: str, folder: Path) -> Path:
    target = folder / name
    if name == "random.dcm":
        target.write_bytes(np.random.default_rng(0).bytes(4096))
    elif name == "empty.dcm":
        target.write_bytes(b"")
    else:
        shutil.copy(get_testdata_file(name), target)  # bundled in the pydicom wheel: no network
    return target


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_files_get_their_exact_reason(name, tmp_path):
    path = _file(name, tmp_path)
    with pytest.raises(FileProblem) as info:
        read_pixels(read_header(path).path)
    assert info.value.code == BAD[name]


def test_lossless_variants_of_mr_small_decode_to_the_same_image(tmp_path):
    decoded = [read_pixels(read_header(_file(name, tmp_path)).path) for name in MR_VARIANTS]
    reference = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    assert decoded[0].shape == (1, 64, 64) and decoded[0].std() > 0.1
    for other in decoded[1:]:
        assert np.array_equal(decoded[0], other)
    # ...and equal to the stored values through the same window, computed by hand.
    raw = reference.pixel_array.astype(np.float64) * float(reference.get("RescaleSlope", 1)) + float(
        reference.get("RescaleIntercept", 0))
    assert np.corrcoef(raw.ravel(), decoded[0].ravel())[0, 1] > 0.99


def test_multi_frame_and_colour_files(tmp_path):
    mr = read_pixels(read_header(_file("emri_small.dcm", tmp_path)).path)
    assert mr.shape == (10, 64, 64), "a multi-frame file is a sequence of frames"
    rgb = read_pixels(read_header(_file("SC_rgb_rle_2frame.dcm", tmp_path)).path)
    ds = pydicom.dcmread(get_testdata_file("SC_rgb_rle_2frame.dcm"))
    luma = (ds.pixel_array.astype(np.float64) / 255.0) @ np.array([0.299, 0.587, 0.114])
    assert rgb.shape == (2, 100, 100) and np.allclose(rgb, luma, atol=1e-6)
    ct = read_pixels(read_header(_file("CT_small.dcm", tmp_path)).path)
    assert ct.shape == (1, 128, 128) and 0.0 <= ct.min() < ct.max() <= 1.0


def test_a_site_of_real_files_keeps_the_good_and_quarantines_the_bad(tmp_path):
    site = tmp_path / "site"
    names = GOOD + sorted(BAD)
    for i, name in enumerate(names):
        folder = site / "studies" / f"s{i:02d}" / "any" / "nesting"
        folder.mkdir(parents=True)
        _file(name, folder)
    # One study mixes a good file with a broken one: the good one is kept.
    _file("MR_truncated.dcm", site / "studies" / "s00" / "any")
    (site / "labels.csv").write_text("study,label\n" + "".join(f"s{i:02d},{i % 2}\n" for i in range(len(names))))
    data = load_site(site, DataConfig(SharedConfig(image_size=32, seq_len=4)), num_labels=1, progress=False)
    assert len(data.studies) == len(GOOD)
    assert data.mask.sum(1).tolist() == [1, 1, 1, 1, 1, 1, 4, 2], "emri: 10 frames sampled to 4; RGB: 2"
    reasons = dict(data.quarantine)
    for i, name in enumerate(names):
        if name in BAD:
            folder = f"studies/s{i:02d}"
            assert reasons[f"{folder}/any/nesting/{name}"] == BAD[name]
            assert reasons[folder] == "no-usable-series"
    assert reasons["studies/s00/any/MR_truncated.dcm"] == "truncated-pixel-data"
    assert all(not os.path.isabs(path) for path in reasons), "relative paths only"


def _pixel_file(path: Path, stored: np.ndarray, bits_stored: int, signed: bool, photometric: str,
                slope: float, intercept: float, window: tuple[float, float] | None,
                voi_function: str | None = None) -> Path:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID, ds.Modality = generate_uid(), "OT"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated = 8 if bits_stored == 8 else 16
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits_stored, bits_stored - 1, int(signed)
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if voi_function is not None:
        ds.VOILUTFunction = voi_function
    ds.PixelData = stored.astype({8: np.uint8, 12: np.uint16, 16: np.int16 if signed else np.uint16}[bits_stored]
                                 ).tobytes()
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


@pytest.mark.parametrize("bits, signed, photometric, window", [
    (8, False, "MONOCHROME2", None),
    (12, False, "MONOCHROME2", (1000.0, 1500.0)),
    (16, True, "MONOCHROME2", (0.0, 400.0)),
    (16, True, "MONOCHROME1", (0.0, 400.0)),
])
def test_bit_depths_sign_rescale_window_and_monochrome1(tmp_path, bits, signed, photometric, window):
    """Stored values -> modality values (slope, intercept) -> DICOM linear window -> [0, 1],
    inverted for MONOCHROME1; without a window the 0.5-99.5 percentile range is used."""
    rng = np.random.default_rng(bits)
    low, high = {8: (0, 255), 12: (0, 4095), 16: (-2000, 2000)}[bits]
    stored = rng.integers(low, high + 1, size=(16, 16))
    slope, intercept = (2.0, -1024.0) if bits != 8 else (1.0, 0.0)
    path = _pixel_file(tmp_path / "x.dcm", stored, bits, signed, photometric, slope, intercept, window)
    modality = stored * slope + intercept
    if window is None:
        lo, hi = np.percentile(modality, [0.5, 99.5])
        expected = np.clip((modality - lo) / (hi - lo), 0, 1)
    else:
        center, width = window
        expected = np.clip((modality - (center - 0.5)) / (width - 1) + 0.5, 0, 1)
    if photometric == "MONOCHROME1":
        expected = 1.0 - expected
    (frame,) = read_pixels(read_header(path).path)
    assert np.allclose(frame, expected, atol=1e-6)


def test_voi_lut_sequence_is_applied_as_pydicom_documents(tmp_path):
    """pydicom's VOI LUT test file: modality LUT first, then the VOI LUT on integer values, with no
    warning; the result equals pydicom's own apply_voi_lut output scaled by the LUT's peak."""
    import warnings

    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    path = Path(get_testdata_file("vlut_04.dcm"))  # from pydicom-data (a dev dependency): no network
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "Applying a VOI LUT on a float input array ..." would fail here
        (frame,) = read_pixels(read_header(path).path)
    ds = pydicom.dcmread(path)
    reference = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds).astype(np.float64)
    peak = max(ds.VOILUTSequence[0].LUTData)
    assert np.allclose(frame, reference / peak, atol=1e-6)
    assert frame.min() == 0.0 and frame.max() == 1.0 and len(np.unique(frame)) > 100


def _window_by_hand(x: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 (LINEAR), C.11.2.1.3.2 (LINEAR_EXACT) and C.11.2.1.3.1 (SIGMOID), with
    the output range taken as [0, 1]."""
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    if function == "LINEAR":
        center, width = center - 0.5, width - 1.0
    ramp = (x - center) / width + 0.5
    return np.where(x <= center - width / 2, 0.0, np.where(x > center + width / 2, 1.0, ramp))


@pytest.mark.parametrize("function, expected", [
    # x = 96 ... 104 around a window of centre 100, width 4.
    (None, [0, 0, 0, 1 / 3, 2 / 3, 1, 1, 1, 1]),  # no VOI LUT Function: LINEAR
    ("LINEAR", [0, 0, 0, 1 / 3, 2 / 3, 1, 1, 1, 1]),  # centre - 0.5, width - 1: 98.5 ... 101.5
    ("LINEAR_EXACT", [0, 0, 0, 0.25, 0.5, 0.75, 1, 1, 1]),  # exactly 98 ... 102
    ("SIGMOID", [1 / (1 + np.exp(4 - k)) for k in range(9)]),  # 1 / (1 + exp(-4 (x - 100) / 4))
])
def test_voi_lut_functions_follow_the_dicom_formulas(tmp_path, function, expected):
    """Each VOI LUT Function, on a ramp across a narrow window, gives the values the standard's
    formulas give (worked out by hand above); without one, the window is LINEAR."""
    stored = np.tile(np.arange(96, 105), (2, 1))
    path = _pixel_file(tmp_path / "x.dcm", stored, 12, False, "MONOCHROME2", 1.0, 0.0, (100.0, 4.0), function)
    (frame,) = read_pixels(read_header(path).path)
    assert np.allclose(frame, np.tile(expected, (2, 1)), atol=1e-6)


@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_voi_lut_functions_with_rescale_and_sign(tmp_path, function, photometric):
    """Signed stored values through a rescale and a wide window: pydicom's output range (set by
    the bit depth, sign and rescale) maps back to exactly the formula's [0, 1], inverted for
    MONOCHROME1."""
    stored = np.random.default_rng(7).integers(-2000, 2001, size=(16, 16))
    path = _pixel_file(tmp_path / "x.dcm", stored, 16, True, photometric, 2.0, -1024.0, (40.0, 400.0), function)
    expected = _window_by_hand(stored * 2.0 - 1024.0, 40.0, 400.0, function)
    if photometric == "MONOCHROME1":
        expected = 1.0 - expected
    (frame,) = read_pixels(read_header(path).path)
    assert np.allclose(frame, expected, atol=1e-6)
    assert 0.0 <= frame.min() and frame.max() <= 1.0


@pytest.mark.parametrize("window, function", [((100.0, 0.5), "LINEAR"), ((100.0, 0.0), "SIGMOID"),
                                              ((100.0, 4.0), "GAMMA")])
def test_a_window_pydicom_refuses_falls_back_to_the_percentile_range(tmp_path, window, function):
    """A width below what the function allows, or a function DICOM does not define: the image is
    still used, scaled by the 0.5-99.5 percentile range as if it had no window."""
    stored = np.random.default_rng(3).integers(0, 4096, size=(16, 16))
    path = _pixel_file(tmp_path / "x.dcm", stored, 12, False, "MONOCHROME2", 1.0, 0.0, window, function)
    lo, hi = np.percentile(stored, [0.5, 99.5])
    (frame,) = read_pixels(read_header(path).path)
    assert np.allclose(frame, np.clip((stored - lo) / (hi - lo), 0, 1), atol=1e-6)


@pytest.mark.parametrize("name", [
    "MR_small.dcm",  # signed 16-bit, window 600/1600 (bundled with pydicom)
    "examples_overlay.dcm",  # two windows (450/790 and 200/443): the first is the one used
    "693_UNCI.dcm",  # CT: signed 14-bit, rescale -1024, abdomen window 40/100 (pydicom-data)
    "MR2_UNCI.dcm",  # a fractional rescale slope (3.77), window 1000/2000 (pydicom-data)
    "RG3_UNCI.dcm",  # MONOCHROME1 radiograph, 10-bit, window 550/1024 (pydicom-data)
])
def test_windows_of_pydicom_test_files_match_the_dicom_formula(name):
    path = Path(get_testdata_file(name))  # pydicom-data (a dev dependency) is read offline
    ds = pydicom.dcmread(path)
    modality = ds.pixel_array * float(ds.get("RescaleSlope", 1.0)) + float(ds.get("RescaleIntercept", 0.0))
    first = lambda value: float(value[0]) if isinstance(value, pydicom.multival.MultiValue) else float(value)
    expected = _window_by_hand(modality, first(ds.WindowCenter), first(ds.WindowWidth))
    if ds.PhotometricInterpretation == "MONOCHROME1":
        expected = 1.0 - expected
    (frame,) = read_pixels(path)
    assert np.allclose(frame, expected, atol=1e-6)
    assert 0.0 < frame.mean() < 1.0


@pytest.mark.parametrize("function", ["LINEAR_EXACT", "SIGMOID"])
def test_voi_lut_function_on_a_pydicom_test_file(tmp_path, function):
    """pydicom's MR_small with a VOI LUT Function added: the same formulas on a real image."""
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ds.VOILUTFunction = function
    ds.save_as(tmp_path / "mr.dcm")
    (frame,) = read_pixels(tmp_path / "mr.dcm")
    assert np.allclose(frame, _window_by_hand(ds.pixel_array.astype(np.float64), 600.0, 1600.0, function), atol=1e-6)


def test_a_voi_lut_sequence_comes_before_a_window(tmp_path):
    """pydicom applies the VOI LUT Sequence when a file also has a window, and so does the pipeline."""
    path = Path(get_testdata_file("vlut_04.dcm"))
    (without_window,) = read_pixels(path)
    ds = pydicom.dcmread(path)
    ds.WindowCenter, ds.WindowWidth = 10.0, 2.0  # a window that would make the image almost binary
    ds.save_as(tmp_path / "both.dcm")
    (with_window,) = read_pixels(tmp_path / "both.dcm")
    assert np.array_equal(with_window, without_window)


def test_hidden_files_are_ignored_and_broken_links_quarantined(site, tiny_data_config):
    """macOS AppleDouble files and .DS_Store are not images; a dangling link is listed, not dropped."""
    study = next(p for p in sorted((site / "studies").iterdir()) if p.is_dir())
    dicom = next(study.rglob("*.dcm"))
    (dicom.parent / f"._{dicom.name}").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (site / "studies" / ".DS_Store").write_bytes(b"Bud1")
    (site / "studies" / ".Trashes").mkdir()
    (dicom.parent / "gone.dcm").symlink_to(dicom.parent / "missing-target.dcm")
    data = load_site(site, tiny_data_config, num_labels=1, progress=False)
    reasons = dict(data.quarantine)
    assert reasons == {str((dicom.parent / "gone.dcm").relative_to(site)): "broken-link"}
    assert len(data.studies) == 16
