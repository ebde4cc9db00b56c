"""Text that the centre controls (label names from the model's config, the run name in the export),
made safe for the site's DICOM objects, CSV comments and log lines."""

from __future__ import annotations

import re
import unicodedata

# Everything outside printable ASCII, and the backslash: the value delimiter of every DICOM string
# VR, so "a\b" in a Long String would be read back as two values.
_NOT_PLAIN = re.compile(r"[^\x20-\x5b\x5d-\x7e]+")


def printable_ascii(value: object, max_length: int) -> str:
    """One line of printable ASCII, without backslash, at most ``max_length`` characters.

    Valid in any DICOM text VR (LO, SH, ST, LT: the default repertoire, no control characters, no
    delimiter) and safe as one log or CSV comment line. Accents are dropped (``é`` -> ``e``); any
    other run of characters outside that set, newlines included, becomes one space."""
    folded = "".join(c for c in unicodedata.normalize("NFKD", str(value)) if not unicodedata.combining(c))
    return " ".join(_NOT_PLAIN.sub(" ", folded).split())[:max_length].rstrip()
