"""The privacy ledger's name as the server gives it (``budget-id``), checked before it becomes part
of a file name at the site."""

from __future__ import annotations

import re

from common.reason_codes import ReasonCodeError

BUDGET_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


class BadBudgetId(ReasonCodeError, ValueError):
    """The server sent a budget id that is not a plain identifier (e.g. a path)."""

    code = "bad-budget-id"


def check_budget_id(budget_id: str) -> str:
    if not BUDGET_ID_PATTERN.fullmatch(budget_id):
        raise BadBudgetId(f"budget-id {budget_id[:80]!r} is not 1-64 letters, digits, '-' or '_'")
    return budget_id
