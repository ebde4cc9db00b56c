"""Every error a site answers with carries its reason code where it is defined, and the site's
handler sends exactly that code: the spelling the centre and docs/ rely on, never the message."""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.app import Context, RecordDict

from client import app as client_app
from client.app import GlobalModelNotHeld
from client.budget import BadBudgetId
from client.session import open_session
from common.config import ConfigError
from common.data.dicom import FileProblem
from common.data.errors import DataError, StudyError
from common.exchange import UpdateError
from common.model import BackboneMismatchError, BackboneWeightsError
from common.policy import PolicyError
from common.reason_codes import ReasonCodeError
from tests.conftest import site_message

RUN = {"image-size": 32, "seq-len": 4, "proj-dim": 16, "gru-hidden": 8, "attn-dim": 8, "batch-size": 4,
       "local-epochs": 1, "num-rounds": 2}
# What a site's log may hold and its reply must not: a patient's folder.
SECRET = "/data/site/studies/ZZFAKE-DOE-JOHN"

# Each error class and the code it puts on the wire (the centre and docs/ read these spellings).
WIRE_CODES: list[tuple[type[ReasonCodeError], str]] = [
    (DataError, "data-error"),
    (ConfigError, "config-error"),
    (PolicyError, "policy-error"),
    (BackboneMismatchError, "backbone-mismatch"),
    (BackboneWeightsError, "backbone-weights-unavailable"),
    (UpdateError, "bad-global-parameters"),
    (GlobalModelNotHeld, "global-model-not-held"),
    (BadBudgetId, "bad-budget-id"),
]


def _raised(error_class: type[ReasonCodeError]) -> ReasonCodeError:
    """An instance as the code raises it, with the secret in its message."""
    if issubclass(error_class, DataError):
        return error_class("missing-labels", f"{SECRET}/labels.csv not found")
    return error_class(f"cannot use {SECRET}")


@pytest.mark.parametrize(("error_class", "code"), WIRE_CODES, ids=[code for _, code in WIRE_CODES])
def test_each_error_class_carries_its_wire_code(error_class, code):
    assert issubclass(error_class, ReasonCodeError)
    assert error_class.code == code


def test_a_data_error_sends_the_code_of_the_check_that_failed():
    assert DataError("missing-labels", "x").code == "missing-labels"
    assert StudyError("bad-biomech", "x").code == "bad-biomech"
    assert DataError.code == "data-error", "an instance's code does not change the class's"


def test_an_error_class_without_a_code_is_refused_where_it_is_defined():
    with pytest.raises(TypeError, match="must set a class attribute code"):
        class NoCode(ReasonCodeError):  # noqa: F841 - defining it is what fails
            pass


def _context(site: Path, state_dir: Path, run_config: dict) -> Context:
    return Context(run_id=7, node_id=1, node_config={"data-path": str(site), "state-dir": str(state_dir),
                                                      "site-name": "site-a"},
                   state=RecordDict(), run_config=run_config)


def _answer(context: Context, exc: Exception, run_config: dict = RUN) -> dict:
    def work(*_: object) -> RecordDict:
        raise exc

    out = client_app._handle(site_message(run_config), context, work)
    return dict(out.content["site"])


def test_the_site_answers_each_error_with_its_code_and_nothing_of_its_message(site, tmp_path):
    open_session.cache_clear()
    context = _context(site, tmp_path / "state", RUN)
    cases = [(_raised(error_class), code) for error_class, code in WIRE_CODES if error_class is not DataError]
    cases += [(_raised(DataError), "missing-labels"), (StudyError("no-usable-series", SECRET), "no-usable-series")]
    for exc, code in cases:
        reply = _answer(context, exc)
        assert reply == {"status": "error", "reason": code, "site-name": "site-a"}, type(exc).__name__
    assert SECRET in (tmp_path / "state" / "logs" / "site.log").read_text(), "the message is in the site's own log"


def test_an_error_with_a_code_attribute_but_no_reason_code_base_is_an_internal_error(site, tmp_path):
    """Only ReasonCodeError's codes reach the wire: a ``code`` attribute elsewhere (a file's
    quarantine reason, a library's error number) is not a reason code the centre knows."""
    open_session.cache_clear()
    reply = _answer(_context(site, tmp_path / "state", RUN), FileProblem("not-dicom", SECRET))
    assert reply["reason"] == "internal-error" and reply["exception-type"] == "FileProblem"
    assert SECRET not in str(reply)


def test_a_run_config_the_site_cannot_parse_is_a_config_error(tmp_path):
    run = {**RUN, "dp-enabled": True, "freeze": "layer4"}  # DP needs the frozen backbone
    with pytest.raises(ConfigError):
        site_message(run)
    reply = dict(client_app._handle(site_message(RUN), _context(tmp_path, tmp_path / "state", run),
                                    lambda *_: RecordDict()).content["site"])
    assert reply == {"status": "error", "reason": "config-error", "site-name": "site-a"}
