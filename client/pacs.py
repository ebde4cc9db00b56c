"""Explanations as DICOM for the hospital's PACS: one Secondary Capture per study (highdicom).

The object belongs to the source study (its Study Instance UID and patient/study attributes are
copied from the study's own DICOM file), in a new series, with new SOP Instance UIDs. The
probability and the model version are in the Series Description, the Derivation Description and
burned into the image as text, so that a radiologist sees them next to the study. The burned-in
text identifies neither the patient nor a date, so Burned In Annotation is NO (PS3.3 C.7.6.1),
unless the source image says YES.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

log = logging.getLogger(__name__)
SERIES_NUMBER = 9001  # high, so the explanation series sorts after the acquired ones


def burn_in(png: Path, text: str) -> np.ndarray:
    from PIL import Image, ImageDraw, ImageFont

    with Image.open(png) as source:
        image = source.convert("RGB")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=max(12, image.height // 30))
    x0, y0, x1, y1 = draw.textbbox((10, 10), text, font=font)
    draw.rectangle((x0 - 4, y0 - 4, x1 + 4, y1 + 4), fill=(0, 0, 0))
    draw.text((10, 10), text, fill=(255, 255, 0), font=font)
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8))


def secondary_capture(reference: Dataset, png: Path, probability: float, label: str, version: str,
                      series_uid: str) -> Dataset:
    from highdicom.sc import SCImage

    text = f"AI {label} probability {probability:.2f} | model {version} | not a diagnosis"
    laterality = reference.get("Laterality") or None
    sc = SCImage.from_ref_dataset(
        ref_dataset=reference, pixel_array=burn_in(png, text), photometric_interpretation="RGB", bits_allocated=8,
        coordinate_system="PATIENT", patient_orientation=("L", "P"), laterality=laterality,
        series_instance_uid=series_uid, series_number=SERIES_NUMBER, sop_instance_uid=generate_uid(),
        instance_number=1, manufacturer="clinicfl", manufacturer_model_name="clinicfl injury model",
        software_versions=version[:64], series_description=f"AI {label} p={probability:.2f} {version}"[:64],
        transfer_syntax_uid=ExplicitVRLittleEndian)
    sc.copy_patient_and_study_information(reference)
    if laterality is None:
        if reference.get("ImageLaterality"):
            sc.ImageLaterality = reference.ImageLaterality
        else:
            sc.Laterality = ""  # type 2C: unknown
    sc.BurnedInAnnotation = "YES" if reference.get("BurnedInAnnotation") == "YES" else "NO"
    sc.ConversionType = "WSD"
    sc.DerivationDescription = f"clinicfl explanation; {label} probability {probability:.4f} (calibrated); model {version}"
    source = Dataset()
    source.ReferencedSOPClassUID = reference.SOPClassUID
    source.ReferencedSOPInstanceUID = reference.SOPInstanceUID
    sc.SourceImageSequence = [source]
    return sc


def write_secondary_captures(run, data) -> None:
    """One SC per scored DICOM study into OUT/dicom/; a study without a DICOM source (MURA PNG,
    MRNet volume) or whose header highdicom refuses is skipped with a reason in the site's log."""
    from client.predict import model_version, safe_name

    folder = run.out / "dicom"
    version = model_version(run.meta)
    for i, study in enumerate(run.studies):
        source = data.source_files[i] if i < len(data.source_files) else None
        if source is None or source.suffix.lower() != ".dcm":
            log.info("no DICOM Secondary Capture for %s: its images are not DICOM", study.study)
            continue
        try:
            reference = pydicom.dcmread(source, stop_before_pixels=True)
            sc = secondary_capture(reference, run.out / study.figure, study.calibrated[0], run.labels[0], version,
                                   generate_uid())
        except (ValueError, AttributeError, KeyError, TypeError) as exc:  # headers highdicom refuses
            log.warning("no DICOM Secondary Capture for %s: %s", study.study, exc)
            continue
        path = folder / safe_name(study.study) / f"{sc.SOPInstanceUID}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        sc.save_as(path, enforce_file_format=True)
        study.dicom = str(path.relative_to(run.out))
