"""Data errors. Each has a short reason code that is safe to send to the server (no path, UID or
header text) and a message for the site's own screen and logs."""

from __future__ import annotations

from common.reason_codes import ReasonCodeError


class DataError(ReasonCodeError):
    """The site's data cannot be used at all (missing folder, no labels, ...). Each instance
    carries the code of the check that failed (``missing-labels``, ``no-usable-studies``, ...)."""

    code = "data-error"

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class StudyError(DataError):
    """One study cannot be used; the site goes on without it and reports the reason code."""
