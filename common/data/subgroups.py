"""The subgroups a site reports test performance for: scanner maker, magnet field strength, body part.

Each is read from the chosen series' DICOM header (or a layout's own metadata, e.g. MURA's body
part) and mapped, at the site, onto the fixed vocabularies of this module: what may leave the site
is one of these category names, never a header value. A subgroup with fewer test studies than the
site policy's ``min-reported-count`` is not computed at all (common/inference.py).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

SUBGROUP_KINDS = ("manufacturer", "field-strength", "body-part")
UNKNOWN = "unknown"
OTHER = "other"

# Lower-case header text -> the maker's name; matched as a word anywhere in the Manufacturer tag
# ("GE MEDICAL SYSTEMS", "GE Healthcare", "SIEMENS", "Siemens Healthineers", "Philips Medical Systems").
MANUFACTURERS = {"siemens": "Siemens", "ge": "GE", "philips": "Philips", "canon": "Canon", "toshiba": "Canon",
                 "hitachi": "Fujifilm/Hitachi", "fujifilm": "Fujifilm/Hitachi", "esaote": "Esaote",
                 "united": "United Imaging", "uih": "United Imaging", "samsung": "Samsung", "agfa": "Agfa",
                 "carestream": "Carestream", "konica": "Konica Minolta"}
# DICOM BodyPartExamined defined terms (PS3.16 Annex L) of the joints a sports clinic images.
BODY_PARTS = {"KNEE": "knee", "ANKLE": "ankle", "FOOT": "foot", "HIP": "hip", "SHOULDER": "shoulder",
              "ELBOW": "elbow", "WRIST": "wrist", "HAND": "hand", "FINGER": "finger", "HUMERUS": "humerus",
              "FOREARM": "forearm", "LEG": "leg", "THIGH": "thigh", "SPINE": "spine", "LSPINE": "spine",
              "CSPINE": "spine", "TSPINE": "spine"}


FIELD_STRENGTHS = ("below 1.5 T", "1.5 T", "3 T", "above 3 T")
# Every category a site may name, per kind: the centre refuses any other (no free text crosses).
CATEGORIES = {"manufacturer": frozenset(MANUFACTURERS.values()) | {OTHER, UNKNOWN},
              "field-strength": frozenset(FIELD_STRENGTHS) | {UNKNOWN},
              "body-part": frozenset(BODY_PARTS.values()) | {OTHER, UNKNOWN}}


def manufacturer_group(text: Any) -> str:
    """The maker named in a Manufacturer tag, from MANUFACTURERS; ``other`` or ``unknown``."""
    words = [w for w in re.split(r"[^a-z0-9]+", str(text or "").lower()) if w]
    if not words:
        return UNKNOWN
    for word in words:
        if word in MANUFACTURERS:
            return MANUFACTURERS[word]
    return OTHER


def field_strength_group(tesla: Any) -> str:
    """MagneticFieldStrength (tesla) in the bands a radiologist compares: below 1.5 T, 1.5 T, 3 T, above 3 T."""
    try:
        value = float(tesla)
    except (TypeError, ValueError):
        return UNKNOWN
    if not value > 0:
        return UNKNOWN
    if value < 1.2:
        return "below 1.5 T"
    if value < 2.0:
        return "1.5 T"
    if value < 4.0:
        return "3 T"
    return "above 3 T"


def body_part_group(text: Any) -> str:
    """A BodyPartExamined term (or a layout's body-part name) in BODY_PARTS; ``other`` or ``unknown``."""
    key = str(text or "").strip().upper().replace(" ", "").replace("_", "")
    if not key:
        return UNKNOWN
    return BODY_PARTS.get(key, OTHER)


def header_subgroups(dataset: Mapping[str, Any] | Any) -> tuple[tuple[str, str], ...]:
    """(kind, category) pairs of one DICOM dataset; field strength only for MR images."""
    get = dataset.get
    pairs = [("manufacturer", manufacturer_group(get("Manufacturer", ""))),
             ("body-part", body_part_group(get("BodyPartExamined", "")))]
    if str(get("Modality", "")).upper() == "MR":
        pairs.append(("field-strength", field_strength_group(get("MagneticFieldStrength", None))))
    return tuple(sorted(pairs))


def study_subgroups(header: Iterable[tuple[str, str]], layout_info: Iterable[tuple[str, str]]) -> dict[str, str]:
    """A study's subgroups: its header's, and a layout's body part where the header names none."""
    groups = dict(header)
    for name, value in layout_info:
        if name == "body-part" and groups.get("body-part", UNKNOWN) == UNKNOWN:
            groups["body-part"] = body_part_group(value)
    return groups
