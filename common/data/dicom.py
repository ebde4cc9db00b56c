"""DICOM study -> spatially ordered, windowed, normalised, resized image sequence (pydicom 3).

A study folder may hold several series (localisers, other sequences) in any nesting. We group
files by SeriesInstanceUID, pick one series, order its slices along the slice normal and run the
pixel pipeline: modality LUT (rescale) -> VOI window -> [0, 1] -> MONOCHROME1 inversion ->
pad to square -> resize.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import torch
import torch.nn.functional as F
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

from common.data.errors import StudyError
from common.data.listing import list_files
from common.data.study import StudyImages
from common.data.subgroups import header_subgroups


DICOM_SUFFIXES = {".dcm"}  # matched case-insensitively (.DCM from many PACS exports)


@dataclass(frozen=True)
class SliceHeader:
    path: Path
    series_uid: str
    series_description: str
    position: float | None  # along the slice normal; None when the geometry tags are missing
    instance_number: int
    orientation: tuple[float, ...] | None = None
    modality: str = ""
    size: str = ""  # "RowsxColumns" before resizing
    subgroups: tuple[tuple[str, str], ...] = ()  # (kind, category) from common/data/subgroups.py; stays at the site


class FileProblem(Exception):
    """One file cannot be used; ``code`` is its quarantine reason (safe to count and report)."""

    def __init__(self, code: str, detail: str = "") -> None:
        super().__init__(f"{code}: {detail}" if detail else code)
        self.code = code


def read_header(path: Path) -> SliceHeader:
    """Header of one file; FileProblem with a reason code when the file is not a usable image."""
    if path.stat().st_size == 0:
        raise FileProblem("empty-file")
    try:
        ds = pydicom.dcmread(path, defer_size=1024)  # pixel bytes are read later, only if chosen
    except InvalidDicomError:
        raise FileProblem(_why_not_dicom(path)) from None
    except (OSError, EOFError, ValueError, TypeError, KeyError) as exc:
        raise FileProblem("corrupt-header", type(exc).__name__) from exc
    if is_non_image_object(ds):
        raise FileProblem("non-image-object", str(ds.get("Modality", "")))
    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise FileProblem("no-pixel-data", str(ds.get("Modality", "")))
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if photometric not in SUPPORTED_PHOTOMETRIC:
        raise FileProblem("unsupported-photometric", photometric)
    if "SeriesInstanceUID" not in ds:
        raise FileProblem("missing-series-uid")
    return SliceHeader(
        path=path,
        series_uid=str(ds.SeriesInstanceUID),
        series_description=str(ds.get("SeriesDescription", "")),
        position=_position_along_normal(ds),
        instance_number=int(ds.get("InstanceNumber", 0) or 0),
        orientation=_orientation(ds),
        modality=str(ds.get("Modality", "") or "unknown"),
        size=f"{ds.get('Rows', '?')}x{ds.get('Columns', '?')}",
        subgroups=header_subgroups(ds),
    )


# Objects that are not images of the patient, though some carry pixel data (a SEG's masks, an RT
# dose grid): segmentations, RT objects, presentation states, structured reports, key objects,
# registrations, encapsulated documents, waveforms, raw data, parametric maps.
NON_IMAGE_MODALITIES = {"SEG", "RTSTRUCT", "RTDOSE", "RTPLAN", "RTRECORD", "PR", "SR", "KO", "REG", "FID", "DOC",
                        "PLAN", "RWV", "ECG", "HD", "AU", "RESP"}
NON_IMAGE_SOP_CLASS_PREFIXES = (
    "1.2.840.10008.5.1.4.1.1.66",  # raw data, segmentation, spatial registration, fiducials, ...
    "1.2.840.10008.5.1.4.1.1.11.",  # presentation states
    "1.2.840.10008.5.1.4.1.1.88.",  # structured reports and key object selection
    "1.2.840.10008.5.1.4.1.1.481.2", "1.2.840.10008.5.1.4.1.1.481.3",  # RT dose, RT structure set
    "1.2.840.10008.5.1.4.1.1.481.4", "1.2.840.10008.5.1.4.1.1.481.5",  # RT beams record, RT plan
    "1.2.840.10008.5.1.4.1.1.104.",  # encapsulated PDF, CDA, STL, ...
    "1.2.840.10008.5.1.4.1.1.9.",  # waveforms
    "1.2.840.10008.5.1.4.1.1.30",  # parametric map
)


def is_non_image_object(ds: pydicom.Dataset) -> bool:
    sop_class = str(ds.get("SOPClassUID", ""))
    return str(ds.get("Modality", "")).upper() in NON_IMAGE_MODALITIES or sop_class.startswith(
        NON_IMAGE_SOP_CLASS_PREFIXES)


SUPPORTED_PHOTOMETRIC = {"MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT",
                         "PALETTE COLOR"}


def _why_not_dicom(path: Path) -> str:
    """A file pydicom refuses: DICOM without its file meta header, or not DICOM at all. A forced
    read turns anything into a near-empty dataset, so look for tags real images carry."""
    try:
        forced = pydicom.dcmread(path, force=True, defer_size=1024)
        if any(tag in forced for tag in ("SOPClassUID", "Modality", "PixelData", "StudyInstanceUID")):
            return "missing-meta"
    except Exception:  # anything pydicom raises on garbage means the same thing here
        pass
    # A forced read can also stumble on real data; an explicit-VR element of group 0008 (the
    # identifying group every image starts with) near the start still says "DICOM, no meta".
    head = path.read_bytes()[:512]
    for i in range(len(head) - 6):
        if head[i:i + 2] == b"\x08\x00" and head[i + 4:i + 6] in _VRS:
            return "missing-meta"
    return "not-dicom"


_VRS = {vr.encode() for vr in ("AE", "AS", "AT", "CS", "DA", "DS", "DT", "FL", "FD", "IS", "LO", "LT", "OB", "OW",
                               "PN", "SH", "SL", "SQ", "SS", "ST", "TM", "UI", "UL", "UN", "US", "UT")}


def _orientation(ds: pydicom.Dataset) -> tuple[float, ...] | None:
    iop = ds.get("ImageOrientationPatient")
    return tuple(round(float(v), 3) for v in iop) if iop is not None and len(iop) == 6 else None


def _position_along_normal(ds: pydicom.Dataset) -> float | None:
    ipp, iop = ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient")
    if ipp is None or iop is None or len(ipp) != 3 or len(iop) != 6:
        return None
    row, col = np.asarray(iop[:3], float), np.asarray(iop[3:], float)
    return float(np.dot(np.asarray(ipp, float), np.cross(row, col)))


def select_series(headers: list[SliceHeader], description: str = "") -> list[SliceHeader]:
    """The series to use, spatially ordered: the one with most images, optionally among those
    whose SeriesDescription contains ``description`` (case-insensitive)."""
    series: dict[tuple, list[SliceHeader]] = {}
    for h in headers:  # a series that mixes orientations is split into one group per orientation
        series.setdefault((h.series_uid, h.orientation), []).append(h)
    candidates = list(series.values())
    if description:
        candidates = [s for s in candidates if description.lower() in s[0].series_description.lower()]
        if not candidates:
            raise StudyError("no-matching-series", f"no series description contains {description!r}")
    # Most images first; ties broken by UID so the choice is deterministic.
    chosen = max(candidates, key=lambda s: (len(s), s[0].series_uid, str(s[0].orientation)))
    if all(h.position is not None for h in chosen):
        return sorted(chosen, key=lambda h: (h.position, h.instance_number))
    return sorted(chosen, key=lambda h: h.instance_number)


def read_pixels(path: Path) -> np.ndarray:
    """The frames of one file as (frames, H, W) float32 in [0, 1]: modality LUT (rescale), then
    the VOI window, MONOCHROME1 inverted; colour (RGB, YBR, palette) converted to luminance."""
    try:
        ds = pydicom.dcmread(path)
        stored = ds.pixel_array  # pydicom converts YBR to RGB
    except (ValueError, EOFError) as exc:
        raise FileProblem("truncated-pixel-data", type(exc).__name__) from exc
    except RuntimeError as exc:
        missing = "missing dependencies" in str(exc) or "no pixel data handler" in str(exc).lower()
        raise FileProblem("decoder-missing" if missing else "undecodable-pixel-data",
                          str(ds.file_meta.get("TransferSyntaxUID", ""))) from exc
    except (AttributeError, NotImplementedError, TypeError) as exc:
        raise FileProblem("undecodable-pixel-data", type(exc).__name__) from exc
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if photometric == "PALETTE COLOR":
        stored = apply_color_lut(stored, ds)
    if frames == 1:
        stored = stored[None]
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        # ITU-R BT.601 luma: the model sees grey levels; colour carries no extra information
        # for the radiographs and slices it is built for. Palette LUT output spans its dtype.
        if photometric == "PALETTE COLOR":
            peak = float(np.iinfo(stored.dtype).max) if np.issubdtype(stored.dtype, np.integer) else 1.0
        else:
            peak = float(2 ** int(ds.get("BitsStored", 8)) - 1)
        rgb = stored.astype(np.float64) / peak
        values = np.clip(rgb @ np.array([0.299, 0.587, 0.114]), 0.0, 1.0)
        return values.astype(np.float32)
    return np.stack([_grey_levels(frame, ds) for frame in stored]).astype(np.float32)


def _grey_levels(stored: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """One frame's stored values -> [0, 1], in the order pydicom documents: the modality LUT
    (rescale slope/intercept or a Modality LUT Sequence) first, then pydicom's VOI transform on its
    output, as pydicom chooses it (a VOI LUT Sequence before a window; the window with its VOI LUT
    Function: LINEAR, LINEAR_EXACT or SIGMOID), mapped from its output range to [0, 1]. Without a
    VOI transform pydicom can apply, the 0.5-99.5 percentile range of the modality values is used."""
    modality = apply_modality_lut(stored, ds)
    values = _voi_lut(modality, ds) if _has_voi_lut(ds) else _window(modality, ds)
    if values is None:
        values = modality.astype(np.float64)
        lo, hi = np.percentile(values, [0.5, 99.5])
        values = np.clip((values - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.zeros_like(values)
    if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        values = 1.0 - values
    return values


def _has_voi_lut(ds: pydicom.Dataset) -> bool:
    """pydicom's own test for a VOI LUT Sequence it applies (before any window)."""
    items = ds.get("VOILUTSequence")
    return bool(items) and all(items[0].get(tag) is not None for tag in ("LUTDescriptor", "LUTData"))


def _voi_lut(modality: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """The VOI LUT's output over its largest entry, its white (many 16-bit LUTs only use 12 bits).
    A LUT is indexed by integer modality values, so it gets integers (pydicom warns, and may index
    wrongly, when it gets floats)."""
    lut_input = modality if np.issubdtype(modality.dtype, np.integer) else np.rint(modality).astype(np.int64)
    output = apply_voi_lut(lut_input, ds).astype(np.float64)
    descriptor = ds.VOILUTSequence[0].LUTDescriptor  # entries (0 means 65536), first input value, bits
    entries, first_input = int(descriptor[0]) or 2 ** 16, int(descriptor[1])
    peak = float(apply_voi_lut(np.arange(first_input, first_input + entries), ds).max())
    return np.clip(output / peak, 0.0, 1.0) if peak > 0 else np.zeros_like(output)


def _window(modality: np.ndarray, ds: pydicom.Dataset) -> np.ndarray | None:
    """pydicom's window (DICOM PS3.3 C.11.2.1.2) mapped to [0, 1], or None without a usable one.
    pydicom maps the window onto the modality values' full range (set by the bit depth, the sign
    and the rescale); that range's ends are what the window makes of -inf and +inf."""
    if ds.get("WindowCenter") is None or ds.get("WindowWidth") is None:
        return None
    try:
        # SIGMOID: exp overflows to inf far below the centre, and inf gives the right limit (black).
        with np.errstate(over="ignore"):
            black, white = apply_voi_lut(np.array([-np.inf, np.inf]), ds)
            output = apply_voi_lut(modality, ds)
    except (ValueError, AttributeError):
        # A width its VOI LUT Function does not allow, a function DICOM does not define, or no Bits
        # Stored / Pixel Representation to size the output range (float pixel data).
        return None
    if white == black:  # a rescale slope of 0: every value is the same
        return None
    return np.clip((output - black) / (white - black), 0.0, 1.0)


def resize_square(images: np.ndarray, size: int) -> np.ndarray:
    """(n, h, w) -> (n, size, size): zero-pad to a square (keeps the aspect ratio), then resize."""
    n, h, w = images.shape
    side = max(h, w)
    padded = np.zeros((n, side, side), dtype=np.float32)
    top, left = (side - h) // 2, (side - w) // 2
    padded[:, top:top + h, left:left + w] = images
    tensor = torch.from_numpy(padded).unsqueeze(1)
    if side != size:
        tensor = F.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False,
                               antialias=side > size)
    return tensor.squeeze(1).clamp_(0.0, 1.0).numpy()


def sample_indices(n: int, seq_len: int) -> np.ndarray:
    """Evenly spaced slice indices when a series is longer than the sequence length."""
    if n <= seq_len:
        return np.arange(n)
    return np.round(np.linspace(0, n - 1, seq_len)).astype(int)


def load_dicom_study(study_dir: Path, image_size: int, seq_len: int, series_description: str = "",
                     quarantine: list[tuple[Path, str]] | None = None) -> StudyImages:
    """A study folder -> (n, image_size, image_size) float32 images with 1 <= n <= seq_len.

    Files that cannot be used are appended to ``quarantine`` as (path, reason code) and the study
    goes on without them; a study with nothing usable left is a StudyError."""
    quarantine = quarantine if quarantine is not None else []
    files, _ = list_files(study_dir, DICOM_SUFFIXES)  # broken links are the layout's quarantine entries
    if not files:
        raise StudyError("no-dicom-files", "no .dcm files in the study folder")
    headers = []
    for path in files:
        try:
            headers.append(read_header(path))
        except FileProblem as problem:
            quarantine.append((path, problem.code))
    if not headers:
        raise StudyError("no-usable-series", "no file in the study is a usable image")
    ordered = select_series(headers, series_description)
    frames: list[np.ndarray] = []
    read = 0
    for header in ordered:  # multi-frame files contribute all their frames, in order
        try:
            frames.extend(read_pixels(header.path))
            read += 1
        except FileProblem as problem:
            quarantine.append((header.path, problem.code))
    if not frames:
        raise StudyError("no-usable-series", "no image of the chosen series could be decoded")
    frames = [frames[i] for i in sample_indices(len(frames), seq_len)]
    shapes = {f.shape for f in frames}
    if len(shapes) != 1:
        raise StudyError("inconsistent-geometry", f"images of one series have shapes {sorted(shapes)}")
    return StudyImages(resize_square(np.stack(frames), image_size), modality=ordered[0].modality,
                       series=len({h.series_uid for h in headers}), files=read,
                       sizes=[f"{f.shape[0]}x{f.shape[1]}" for f in frames], subgroups=ordered[0].subgroups)
