"""The base of every error a site answers the centre with a reason code.

A reason code is a fixed word chosen in the code (``data-error``, ``backbone-mismatch``, ...): it is
safe to send, because it holds no path, no value of the site and no header text. The exception's
message may hold all of those, so it stays in the site's own log. ``client/app.py`` answers any
``ReasonCodeError`` with its ``code``; the centre and docs/ rely on the codes, so a code, once
sent, keeps its spelling.
"""

from __future__ import annotations


class ReasonCodeError(Exception):
    """An error the site reports to the centre by its ``code`` alone.

    Every subclass names its code as a class attribute; an instance may carry a finer one (a
    DataError says which check failed, e.g. ``missing-labels``)."""

    code: str  # set by every subclass; an instance may replace it with a finer code

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        # Checked when the class is defined: a missing code would otherwise surface only when the
        # error is raised at a site, as an AttributeError in the handler that reports it.
        if not isinstance(getattr(cls, "code", None), str) or not cls.code:
            raise TypeError(f"{cls.__qualname__} must set a class attribute code = '<reason-code>'")
