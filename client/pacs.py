"""Explanations as DICOM for the hospital's PACS: one Secondary Capture per study (highdicom).

The object belongs to the source study (its Study Instance UID and patient/study attributes are
copied from the study's own DICOM file), in a new series, with new SOP Instance UIDs. Its pixels
are the study's own figure, handed over in memory. The probability and the model version are in
the Series Description, the Derivation Description and burned into the image as text, so that a
radiologist sees them next to the study. The label name and the model version come from the
centre: they are cleaned to printable ASCII without backslash (``client.text.printable_ascii``)
and cut to each VR's length. The burned-in text identifies neither the patient nor a date, so
Burned In Annotation is NO (PS3.3 C.7.6.1), unless the source image says YES.

This module takes plain values and imports nothing of the prediction code.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from client.text import printable_ascii

log = logging.getLogger(__name__)
SERIES_NUMBER = 9001  # high, so the explanation series sorts after the acquired ones
LO_MAX = 64  # Long String: Series Description, Software Versions (PS3.5 6.2)
ST_MAX = 1024  # Short Text: Derivation Description
LABEL_MAX = 24  # a label name's share of the Series Description, so that the probability always fits
BURNED_IN_MAX = 120  # characters of the burned-in line


def burn_in(figure: np.ndarray, text: str) -> np.ndarray:
    """A copy of the (H, W, 3) uint8 figure with ``text`` on a black box in its top left corner."""
    from PIL import Image, ImageDraw, ImageFont

    image = Image.fromarray(np.ascontiguousarray(figure, dtype=np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=max(12, image.height // 30))
    x0, y0, x1, y1 = draw.textbbox((10, 10), text, font=font)
    draw.rectangle((x0 - 4, y0 - 4, x1 + 4, y1 + 4), fill=(0, 0, 0))
    draw.text((10, 10), text, fill=(255, 255, 0), font=font)
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8))


def secondary_capture(reference: Dataset, figure: np.ndarray, probability: float, label: str, version: str,
                      series_uid: str) -> Dataset:
    """The Secondary Capture of ``figure`` (H, W, 3 uint8) in the study of ``reference``."""
    from highdicom.sc import SCImage

    label, version = printable_ascii(label, LABEL_MAX), printable_ascii(version, LO_MAX)
    text = printable_ascii(f"AI {label} probability {probability:.2f} | model {version} | not a diagnosis",
                           BURNED_IN_MAX)
    laterality = reference.get("Laterality") or None
    sc = SCImage.from_ref_dataset(
        ref_dataset=reference, pixel_array=burn_in(figure, text), photometric_interpretation="RGB", bits_allocated=8,
        coordinate_system="PATIENT", patient_orientation=("L", "P"), laterality=laterality,
        series_instance_uid=series_uid, series_number=SERIES_NUMBER, sop_instance_uid=generate_uid(),
        instance_number=1, manufacturer="clinicfl", manufacturer_model_name="clinicfl injury model",
        software_versions=version or "unknown",
        series_description=printable_ascii(f"AI {label} p={probability:.2f} {version}", LO_MAX),
        transfer_syntax_uid=ExplicitVRLittleEndian)
    sc.copy_patient_and_study_information(reference)
    if laterality is None:
        if reference.get("ImageLaterality"):
            sc.ImageLaterality = reference.ImageLaterality
        else:
            sc.Laterality = ""  # type 2C: unknown
    sc.BurnedInAnnotation = "YES" if reference.get("BurnedInAnnotation") == "YES" else "NO"
    sc.ConversionType = "WSD"
    sc.DerivationDescription = printable_ascii(
        f"clinicfl explanation; {label} probability {probability:.4f} (calibrated); model {version}", ST_MAX)
    source = Dataset()
    source.ReferencedSOPClassUID = reference.SOPClassUID
    source.ReferencedSOPInstanceUID = reference.SOPInstanceUID
    sc.SourceImageSequence = [source]
    return sc


def write_secondary_capture(study: str, source_file: Path | None, figure: np.ndarray, probability: float, label: str,
                            version: str, folder: Path) -> Path | None:
    """The capture of one study's ``figure`` as ``folder/<SOP Instance UID>.dcm``. None, with the
    reason in the site's log, for a study without a DICOM source (MURA PNG, MRNet volume) or one
    whose header highdicom refuses."""
    if source_file is None or source_file.suffix.lower() != ".dcm":
        log.info("no DICOM Secondary Capture for %s: its images are not DICOM", study)
        return None
    try:
        reference = pydicom.dcmread(source_file, stop_before_pixels=True)
        sc = secondary_capture(reference, figure, probability, label, version, generate_uid())
    except (ValueError, AttributeError, KeyError, TypeError) as exc:  # headers highdicom refuses
        # The message may quote header values or the model version: one clean line.
        log.warning("no DICOM Secondary Capture for %s: %s", study, printable_ascii(exc, 300))
        return None
    path = folder / f"{sc.SOPInstanceUID}.dcm"
    folder.mkdir(parents=True, exist_ok=True)
    sc.save_as(path, enforce_file_format=True)
    return path
