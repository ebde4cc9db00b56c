"""Server aggregation: FedAvg math on hand-made updates, and every malformed reply rejected."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Metadata, MetricRecord, RecordDict
from flwr.app.message.message import make_message
from flwr.common.constant import ErrorCode

from common.exchange import ParamSpec, UpdateError, arrays_digest, check_arrays, payload_bytes
from flwr.serverapp.strategy import FedMedian, FedTrimmedAvg

from server.held_models import HeldModels
from server.identities import SiteIdentities
from server.reply_checks import EvaluationLayout, ReplyValidator
from server.strategy import ClinicFedAvg
from server.strategy_config import StrategyConfig
from server.traffic import TrafficLedger
from tests.conftest import reply

HASH = "frozen:abc"
SPEC = {"head.w": ParamSpec((2, 3), np.dtype("float32")), "head.b": ParamSpec((2,), np.dtype("float32"))}


def _strategy(min_sites: int = 1, identities: SiteIdentities | None = None, **settings: object) -> ClinicFedAvg:
    return ClinicFedAvg(StrategyConfig(spec=SPEC, backbone_hash=HASH, label_names=["injury"], min_sites=min_sites,
                                       **settings), identities)


def _train_content(value: float, n: int, *, site: str, backbone_hash: str = HASH, arrays: dict | None = None,
                   metrics: dict | None = None, status: str = "ok") -> RecordDict:
    arrays = arrays if arrays is not None else {
        "head.w": np.full((2, 3), value, np.float32), "head.b": np.full((2,), value, np.float32)}
    return RecordDict({
        "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
        "metrics": MetricRecord(metrics if metrics is not None else
                                {"num-examples": n, "train-loss": 0.5, "train-seconds": 1.0}),
        "site": ConfigRecord({"status": status, "site-name": site, "backbone-hash": backbone_hash}),
    })


def test_fedavg_is_the_num_examples_weighted_mean():
    strategy = _strategy()
    replies = [reply(_train_content(v, n, site=f"s{i}"), node_id=i)
               for i, (v, n) in enumerate([(1.0, 10), (2.0, 30), (4.0, 60)])]
    arrays, metrics = strategy.aggregate_train(1, replies)
    expected = (1.0 * 10 + 2.0 * 30 + 4.0 * 60) / 100
    assert np.allclose(arrays["head.w"].numpy(), expected) and np.allclose(arrays["head.b"].numpy(), expected)
    assert metrics["train-loss"] == pytest.approx(0.5)
    report = strategy.reports[1]
    assert report.aggregated and not report.rejected and set(report.train) == {"s0", "s1", "s2"}


BAD_REPLIES = {
    "nan": (lambda: _train_content(0, 5, site="bad", arrays={"head.w": np.full((2, 3), np.nan, np.float32),
                                                              "head.b": np.zeros(2, np.float32)}), "non-finite"),
    "shape": (lambda: _train_content(0, 5, site="bad", arrays={"head.w": np.zeros((3, 3), np.float32),
                                                                "head.b": np.zeros(2, np.float32)}), "shape"),
    "names": (lambda: _train_content(0, 5, site="bad", arrays={"head.w": np.zeros((2, 3), np.float32),
                                                                "other": np.zeros(2, np.float32)}), "names differ"),
    "dtype": (lambda: _train_content(0, 5, site="bad", arrays={"head.w": np.zeros((2, 3), np.float64),
                                                                "head.b": np.zeros(2, np.float32)}), "dtype"),
    "metrics": (lambda: _train_content(0, 5, site="bad", metrics={"num-examples": 5}), "lacks"),
    "zero-examples": (lambda: _train_content(0, 0, site="bad"), "integer in 1.."),
    "list-metric": (lambda: _train_content(0, 5, site="bad", metrics={"num-examples": 5, "train-loss": [0.5, 1.0],
                                                                      "train-seconds": 1.0}), "single number"),
    "huge-weight": (lambda: _train_content(0, 2 ** 62, site="bad"), "integer in 1.."),
    "hash": (lambda: _train_content(0, 5, site="bad", backbone_hash="frozen:zzz"), "backbone hash"),
    "site-error": (lambda: RecordDict({"site": ConfigRecord({"status": "error", "reason": "no-usable-studies",
                                                             "site-name": "bad"})}), "no-usable-studies"),
    "flower-error": (lambda: Error(code=0, reason="ClientApp raised an exception"), "site error"),
}


@pytest.mark.parametrize("early", [False, True], ids=["checked-at-aggregation", "checked-as-it-came"])
@pytest.mark.parametrize("kind", sorted(BAD_REPLIES))
def test_malformed_reply_is_rejected_and_the_round_goes_on(kind, early):
    make_bad, reason = BAD_REPLIES[kind]
    strategy = _strategy()
    good = [reply(_train_content(1.0, 10, site="a"), 1), reply(_train_content(3.0, 10, site="b"), 2)]
    replies = [good[0], reply(make_bad(), 3), good[1]]
    for msg in replies if early else ():
        strategy.validator.check_early(1, msg)
    arrays, _ = strategy.aggregate_train(1, replies)
    assert np.allclose(arrays["head.w"].numpy(), 2.0), "the bad reply must not enter the average"
    (rejected,) = strategy.reports[1].rejected
    assert reason in rejected["reason"] and rejected["phase"] == "train"


def test_replies_checked_as_they_came_are_not_decoded_again_and_aggregate_alike():
    strategy = _strategy()
    replies = _replies([1.0, 2.0, 4.0])
    for msg in replies[:2]:
        strategy.validator.check_early(1, msg)
    strategy.validator.check_early(2, replies[2])  # checked for another round: checked again
    checked_again = []
    check = strategy.validator.train_problem
    strategy.validator.train_problem = lambda msg, *args: checked_again.append(msg) or check(msg, *args)
    arrays, _ = strategy.aggregate_train(1, replies)
    assert checked_again == [replies[2]], "only the reply checked for another round is decoded again"
    expected, _ = _strategy().aggregate_train(1, _replies([1.0, 2.0, 4.0]))
    assert all(np.array_equal(arrays[k].numpy(), expected[k].numpy()) for k in expected.keys())
    assert not strategy.validator.waiting_early_checks, "nothing is held after the round"


def test_too_few_valid_replies_keep_the_global_model():
    strategy = _strategy(min_sites=2)
    arrays, metrics = strategy.aggregate_train(1, [reply(_train_content(1.0, 10, site="a"), 1),
                                                   reply(_train_content(0, 0, site="b"), 2)])
    assert arrays is None and metrics is None
    assert not strategy.reports[1].aggregated and "global model unchanged" in strategy.reports[1].notes[0]


def test_check_arrays_accepts_exactly_the_spec():
    good = ArrayRecord({"head.w": Array(np.zeros((2, 3), np.float32)), "head.b": Array(np.zeros(2, np.float32))})
    assert set(check_arrays(good, SPEC)) == set(SPEC)
    with pytest.raises(UpdateError, match="inf|non-finite"):
        check_arrays(ArrayRecord({"head.w": Array(np.full((2, 3), np.inf, np.float32)),
                                  "head.b": Array(np.zeros(2, np.float32))}), SPEC)


def _replies(values: list[float]) -> list:
    return [reply(_train_content(v, 10 * (i + 1), site=f"s{i}"), node_id=i + 1) for i, v in enumerate(values)]


@pytest.mark.parametrize("aggregation, flower_strategy", [
    ("fedmedian", lambda: FedMedian(min_train_nodes=1, min_available_nodes=1)),
    ("trimmed-mean", lambda: FedTrimmedAvg(beta=0.2, min_train_nodes=1, min_available_nodes=1)),
])
def test_robust_aggregation_matches_flowers_strategy_and_resists_an_outlier(aggregation, flower_strategy):
    values = [1.0, 1.5, 2.0, 2.5, 1000.0]  # one site far off
    ours = _strategy(aggregation=aggregation, trim_fraction=0.2)
    arrays, _ = ours.aggregate_train(1, _replies(values))
    flower_arrays, _ = flower_strategy().aggregate_train(1, [reply(RecordDict({
        "arrays": m.content["arrays"], "metrics": m.content["metrics"]}), m.metadata.src_node_id)
        for m in _replies(values)])
    for name in SPEC:
        assert np.allclose(arrays[name].numpy(), flower_arrays[name].numpy())
    assert np.all(arrays["head.w"].numpy() < 3.0), "the outlier does not drag the model"
    fedavg, _ = _strategy().aggregate_train(1, _replies(values))
    assert np.all(fedavg["head.w"].numpy() > 100.0)


def test_update_norm_bound_rejects_a_far_update():
    strategy = _strategy(max_update_norm=5.0)
    start = ArrayRecord({"head.w": Array(np.ones((2, 3), np.float32)), "head.b": Array(np.ones(2, np.float32))})
    strategy.validator.start_round(1, start)
    # distance from the start: 8 entries * 1.0**2 -> 2.83 (kept); 8 * 3.0**2 -> 8.49 (rejected)
    arrays, _ = strategy.aggregate_train(1, [reply(_train_content(2.0, 10, site="near"), 1),
                                             reply(_train_content(4.0, 10, site="far"), 2)])
    assert np.allclose(arrays["head.w"].numpy(), 2.0)
    (rejected,) = strategy.reports[1].rejected
    assert rejected["site"] == "far" and "update norm 8.49 exceeds max-update-norm 5" in rejected["reason"]


def test_an_error_reply_is_named_after_the_site_that_node_was():
    strategy = _strategy()
    strategy.aggregate_train(1, [reply(_train_content(1.0, 10, site="hospital-a"), 7)])
    strategy.aggregate_train(2, [reply(Error(code=5, reason="node unavailable"), 7),
                                 reply(_train_content(1.0, 10, site="hospital-b"), 8)])
    (rejected,) = strategy.reports[2].rejected
    assert rejected["site"] == "hospital-a" and "Node Unavailable" in rejected["reason"]


# --------------------------------------------------------------------------- who sent a reply
def test_two_sites_with_the_same_name_do_not_overwrite_each_other():
    strategy = _strategy()
    strategy.aggregate_train(1, [reply(_train_content(1.0, 10, site="clinic"), 1),
                                 reply(_train_content(3.0, 30, site="clinic"), 2)])
    report = strategy.reports[1]
    assert set(report.train) == {"clinic", "clinic@node-2"}
    assert report.train["clinic"]["num-examples"] == 10 and report.train["clinic@node-2"]["num-examples"] == 30
    (mismatch,) = report.mismatches
    assert mismatch["site"] == "clinic@node-2" and "node 1 already holds" in mismatch["reason"]
    # The next round files the node under the same name again, and records the clash again.
    strategy.aggregate_train(2, [reply(_train_content(1.0, 10, site="clinic"), 2)])
    assert set(strategy.reports[2].train) == {"clinic@node-2"}
    assert [m["site"] for m in strategy.reports[2].mismatches] == ["clinic@node-2"]


def test_a_registered_site_cannot_report_under_another_sites_name(tmp_path):
    import json

    from server.identities import SiteIdentities

    registry = tmp_path / "sites.json"
    registry.write_text(json.dumps({"hospital-a": {"node-id": "101"}, "hospital-b": {"node-id": "202"}}))
    strategy = _strategy(identities=SiteIdentities.from_registry(registry))
    # node 202 (hospital-b's key) claims to be hospital-a, and sends 10x the weight
    strategy.aggregate_train(1, [reply(_train_content(1.0, 10, site="hospital-a"), 101),
                                 reply(_train_content(3.0, 100, site="hospital-a"), 202)])
    report = strategy.reports[1]
    assert report.train["hospital-a"]["num-examples"] == 10, "hospital-a's record is its own"
    assert report.train["hospital-b"]["num-examples"] == 100
    (mismatch,) = report.mismatches
    assert mismatch["site"] == "hospital-b" and "reports site name 'hospital-a'" in mismatch["reason"]


def test_a_reply_from_a_node_outside_the_registry_is_rejected(tmp_path):
    """Seen before: a node id missing from sites.json was filed as node-N and its update averaged in."""
    import json

    from server.identities import SiteIdentities

    registry = tmp_path / "sites.json"
    registry.write_text(json.dumps({"hospital-a": {"node-id": "101"}, "hospital-b": {"node-id": "202"}}))
    strategy = _strategy(identities=SiteIdentities.from_registry(registry))
    arrays, _ = strategy.aggregate_train(1, [reply(_train_content(1.0, 10, site="hospital-a"), 101),
                                             reply(_train_content(1.0, 10, site="hospital-b"), 202),
                                             reply(_train_content(50.0, 1000, site="hospital-c"), 303)])
    assert np.allclose(arrays["head.w"].numpy(), 1.0), "the unregistered node's update is not averaged in"
    (rejected,) = strategy.reports[1].rejected
    assert rejected["site"] == "node-303" and "not in the site registry" in rejected["reason"]
    strategy.aggregate_evaluate(1, [_eval_reply(_good_eval_record(), 101, "hospital-a"),
                                    _eval_reply(_good_eval_record(), 303, "hospital-c")])
    assert strategy.pooled[1].n == 6, "nor are its evaluation statistics pooled"
    assert "not in the site registry" in strategy.reports[1].rejected[-1]["reason"]


def test_a_missing_or_empty_site_registry_is_an_error_or_admits_no_one(tmp_path):
    """A missing sites.json no longer falls back to the names sites report about themselves."""
    from server.identities import RegistryError, SiteIdentities

    with pytest.raises(RegistryError, match="register-site"):
        SiteIdentities.from_registry(tmp_path / "sites.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(RegistryError, match="cannot be read"):
        SiteIdentities.from_registry(tmp_path / "broken.json")
    (tmp_path / "empty.json").write_text("{}")
    strategy = _strategy(identities=SiteIdentities.from_registry(tmp_path / "empty.json"))
    arrays, _ = strategy.aggregate_train(1, [reply(_train_content(1.0, 10, site="a"), 1)])
    assert arrays is None and "not in the site registry" in strategy.reports[1].rejected[0]["reason"]


def test_a_sites_image_count_must_fit_its_test_studies():
    """PSNR/SSIM/FID pool per image: a site claiming more images than its test studies give
    (seq-len per study, at most image-metrics-sample) would dominate them; it is rejected."""
    from common.metrics.catalogue import image_count_range
    from common.metrics.images import ImageStats

    assert image_count_range(6, 0, 4) == (6, 24) and image_count_range(6, 8, 4) == (6, 8)
    assert image_count_range(40, 32, 8) == (32, 32)

    def with_images(n_images: int) -> dict:
        images = ImageStats(n_images, 20.0 * n_images, 0.5 * n_images, None, None)
        return {**_good_eval_record(), **images.to_record()}

    strategy = _strategy(fid_dim=4, image_sample=8, images_per_study=4)
    strategy.validator.expect_fid(1, False)  # this round's message did not ask for FID moments
    strategy.aggregate_evaluate(1, [_eval_reply(with_images(8), 1, "honest"),
                                    _eval_reply(with_images(10_000), 2, "inflated"),
                                    _eval_reply(with_images(2), 3, "deflated")])
    rejected = {r["site"]: r["reason"] for r in strategy.reports[1].rejected}
    assert set(rejected) == {"inflated", "deflated"} and "images claimed" in rejected["inflated"]
    assert strategy.pooled[1].images.n_images == 8


def test_exception_text_in_an_error_reply_is_never_recorded():
    """Flower's runtime puts a ClientApp's exception text in the error reason; it may hold PHI."""
    strategy = _strategy()
    phi = "/data/ortho/DOE^JOHN/19750315/IM0001.dcm"
    strategy.aggregate_train(1, [reply(Error(code=2, reason=f"<class 'OSError'>:{phi}"), 1),
                                 reply(RecordDict({"site": ConfigRecord({"status": "error", "reason": f"bad {phi}",
                                                                         "site-name": "b"})}), 2)])
    reasons = " ".join(r["reason"] for r in strategy.reports[1].rejected)
    assert "DOE" not in reasons and "ortho" not in reasons and "ClientApp raised an exception" in reasons


# --------------------------------------------------------------------------- fuzzing the reply handling
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from common.metrics.catalogue import EvaluationStats  # noqa: E402
from common.metrics.classification import ClassificationStats  # noqa: E402
from common.metrics.errors import ErrorStats  # noqa: E402
from common.metrics.images import InceptionStats  # noqa: E402

_numbers = st.one_of(st.integers(min_value=-2 ** 63, max_value=2 ** 63 - 1),
                     st.floats(allow_nan=True, allow_infinity=True),
                     st.sampled_from([0, 1, -1, 1e308, -1e308, 3.5, 2 ** 62]))
_values = st.one_of(_numbers, st.lists(_numbers, max_size=12), st.lists(st.integers(0, 3), min_size=4, max_size=4))


def _good_eval_record(n: int = 6) -> dict:
    probs = np.linspace(0.05, 0.95, n)
    labels = (np.arange(n) % 2).astype(float)
    stats = EvaluationStats(ClassificationStats.from_predictions(probs[:, None], labels[:, None], 2.0, bins=4),
                            ErrorStats.from_predictions(probs[:, None], labels[:, None], None, np.full(n, np.nan)),
                            None, InceptionStats.from_probabilities(probs[:, None]))
    return {"num-examples": n, **stats.to_record()}


def _good_validation_record(n: int = 4) -> dict:
    """A site's validation statistics: classification counts, histograms and loss sum only."""
    probs = np.linspace(0.1, 0.9, n)
    labels = (np.arange(n) % 2).astype(float)
    return ClassificationStats.from_predictions(probs[:, None], labels[:, None], 1.5, bins=4).to_record()


def _eval_reply(record: dict, node: int, site: str, validation: dict | None = None) -> object:
    """An evaluation reply with the test statistics ``record`` and the validation statistics
    ``validation`` (default: ``_good_validation_record()``)."""
    return reply(RecordDict({"metrics": MetricRecord(record),
                             "validation": MetricRecord(validation or _good_validation_record()),
                             "site": ConfigRecord({"status": "ok", "site-name": site, "backbone-hash": HASH})}),
                 node, message_type="evaluate")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(changes=st.dictionaries(st.sampled_from(sorted(_good_eval_record()) + ["extra", "n", "bins"]), _values,
                               min_size=1, max_size=4),
       drop=st.sets(st.sampled_from(sorted(_good_eval_record())), max_size=2))
def test_fuzzed_evaluation_replies_are_rejected_with_a_reason_and_never_skew_the_pool(changes, drop):
    record = {k: v for k, v in {**_good_eval_record(), **changes}.items() if k not in drop}
    strategy = _strategy()
    try:
        MetricRecord(record)
    except Exception:  # Flower itself refuses this record: it could never arrive
        return
    strategy.aggregate_evaluate(1, [_eval_reply(_good_eval_record(), 1, "good"), _eval_reply(record, 2, "fuzz")])
    report = strategy.reports[1]
    assert "good" in report.evaluation
    if report.rejected:
        (rejected,) = report.rejected
        assert rejected["site"] == "fuzz" and rejected["reason"]
    else:  # accepted: then it was internally consistent, and the pool is the exact sum
        assert strategy.pooled[1].n == 6 + int(record["n"])
    auc = report.catalogue["auc"]["value"]
    assert auc is None or 0.0 <= auc <= 1.0


def _update(shape_w: tuple[int, ...], value: float, dtype: str) -> dict[str, np.ndarray]:
    with np.errstate(over="ignore"):  # 3e38 does not fit float16: inf, which is the point
        return {"head.w": np.full(shape_w, value).astype(dtype), "head.b": np.full((2,), value).astype(dtype)}


_arrays = st.builds(
    _update,
    st.sampled_from([(2, 3), (3, 3), (6,), (2, 3, 1)]),
    st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([3e38, -3e38, 1e30, 0.0])),
    st.sampled_from(["float32", "float64", "float16"]))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arrays=_arrays, metrics=st.dictionaries(st.sampled_from(["num-examples", "train-loss", "train-seconds",
                                                                "dp-epsilon", "other"]), _numbers, max_size=5),
       site=st.one_of(st.text(max_size=12), st.integers()), status=st.sampled_from(["ok", "error", 3, "budget-exhausted"]))
def test_fuzzed_train_replies_never_crash_and_the_global_model_stays_finite(arrays, metrics, site, status):
    from server.identities import SiteIdentities

    # Names bound to node ids, as a deployment's registry binds them: whatever the fuzzed reply
    # claims (it may claim "b" before node 2 replies), each site keeps its own name.
    strategy = _strategy(identities=SiteIdentities({1: "a", 2: "b", 9: "fuzz"}))
    try:
        fuzz = reply(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                                 "metrics": MetricRecord(metrics),
                                 "site": ConfigRecord({"status": status, "site-name": site, "backbone-hash": HASH})}), 9)
    except Exception:  # Flower itself refuses to build this message
        return
    good = [reply(_train_content(1.0, 10, site="a"), 1), reply(_train_content(3.0, 30, site="b"), 2)]
    new, _ = strategy.aggregate_train(1, [good[0], fuzz, good[1]])
    report = strategy.reports[1]
    assert {"a", "b"} <= set(report.train)
    if new is not None:
        assert all(np.all(np.isfinite(new[name].numpy())) for name in SPEC)
    assert "fuzz" in report.train or any(r["site"] == "fuzz" and r["reason"] for r in report.rejected) \
        or "fuzz" in report.exhausted


def test_float16_on_the_wire_is_widened_and_aggregated_in_float32():
    strategy = _strategy(wire_dtype="float16")
    half = {"head.w": np.full((2, 3), 1.0009765625, np.float16), "head.b": np.full(2, 3.0, np.float16)}
    full = {"head.w": np.full((2, 3), 9.0, np.float32), "head.b": np.full(2, 9.0, np.float32)}
    arrays, _ = strategy.aggregate_train(1, [reply(_train_content(0, 10, site="a", arrays=half), 1),
                                             reply(_train_content(0, 10, site="b", arrays=full), 2)])
    assert arrays["head.w"].numpy().dtype == np.float32 and np.allclose(arrays["head.w"].numpy(), 1.0009765625)
    (rejected,) = strategy.reports[1].rejected
    assert rejected["site"] == "b" and "dtype float32, expected float16" in rejected["reason"]


def test_a_site_gate_refusal_is_recorded_with_its_reason_and_hash():
    strategy = _strategy()
    digest = "ab" * 32
    strategy.aggregate_train(1, [reply(Error(code=7, reason=f"app-not-approved fab_hash={digest}"), 1),
                                 reply(Error(code=7, reason="app-not-approved /home/DOE^JOHN"), 2)])
    reasons = [r["reason"] for r in strategy.reports[1].rejected]
    assert reasons[0] == f"site refused the app: app-not-approved (bundle sha256 {digest})"
    assert "DOE" not in reasons[1] and "refused the app bundle" in reasons[1]


# ------------------------------------------------------------------ the strategy's parts on their own
def _sent(node: int, message_id: str, server_round: int = 1):
    """A message the centre sent to ``node``, with the id the grid gave it when it pushed it."""
    metadata = Metadata(run_id=1, message_id=message_id, src_node_id=0, dst_node_id=node, reply_to_message_id="",
                        group_id=str(server_round), created_at=0.0, ttl=60.0, message_type="train")
    return make_message(metadata, content=RecordDict({"config": ConfigRecord({"server-round": server_round})}))


def _validator(identities: SiteIdentities | None = None, ledger: TrafficLedger | None = None,
               max_update_norm: float = 0.0) -> ReplyValidator:
    return ReplyValidator(SPEC, HASH, identities or SiteIdentities(), (ledger or TrafficLedger()).node_of,
                          EvaluationLayout(num_labels=1), max_update_norm=max_update_norm)


def test_the_validator_gives_a_train_replys_update_or_why_it_cannot_be_used():
    validator = _validator()
    problem, update = validator.train_problem(reply(_train_content(2.0, 10, site="a"), 1))
    assert problem is None and set(update) == set(SPEC) and np.all(update["head.w"] == 2.0)
    masked = reply(RecordDict({"metrics": MetricRecord({"num-examples": 10, "train-loss": 0.5, "train-seconds": 1.0}),
                               "site": ConfigRecord({"status": "ok", "site-name": "a", "backbone-hash": HASH})}), 1)
    assert validator.train_problem(masked, masked=True) == (None, {}), "a masked update is the protocol's to check"
    assert validator.train_problem(masked) == ("reply has no parameter record", {})
    bounded = _validator(max_update_norm=1.0)
    bounded.start_round(2, ArrayRecord({k: Array(np.zeros(p.shape, p.dtype)) for k, p in SPEC.items()}))
    far = reply(_train_content(4.0, 10, site="a"), 1)
    assert "exceeds max-update-norm 1" in bounded.train_problem(far, 2)[0]
    assert bounded.train_problem(far, 3)[0] is None, "the bound needs the model of the reply's own round"


def test_an_error_reply_is_admitted_or_refused_by_the_node_its_message_went_to():
    ledger = TrafficLedger()
    ledger.remember_sent(1, "train", [_sent(2, "q")])
    lost = reply(Error(code=ErrorCode.NODE_UNAVAILABLE, reason="unreachable"), node_id=0)  # the SuperLink's, for "q"
    assert _validator(SiteIdentities({1: "a"}), ledger).reply_problem(lost) == "node 2 is not in the site registry"
    assert "Node Unavailable" in _validator(SiteIdentities({1: "a", 2: "b"}), ledger).reply_problem(lost)


def test_an_early_check_is_taken_once_for_its_own_reply_and_round():
    validator = _validator()
    msg = reply(_train_content(1.0, 10, site="a"), 1)
    checked_again = []
    check = validator.train_problem
    validator.train_problem = lambda m, *args: checked_again.append(m) or check(m, *args)
    validator.check_early(1, msg)
    assert checked_again == [msg] and validator.waiting_early_checks == 1
    problem, update = validator.train_update(msg, 1)
    assert problem is None and np.all(update["head.w"] == 1.0)
    assert checked_again == [msg] and validator.waiting_early_checks == 0, "taken, not checked again"
    validator.check_early(1, msg)
    validator.train_update(msg, 2)  # another round's aggregation
    validator.check_early(1, msg)
    validator.train_update(msg, 1, masked=True)  # a masked update is checked as such
    assert checked_again == [msg] * 5
    validator.check_early(1, msg)
    validator.check_early(1, reply(Error(code=0, reason="x"), 2))  # an error reply has no update to decode
    assert validator.waiting_early_checks == 1
    validator.end_round()
    assert validator.waiting_early_checks == 0


def test_the_validator_reads_evaluation_statistics_from_the_record_they_came_in():
    validator = _validator()
    good = _eval_reply(_good_eval_record(), 1, "a")
    problem, stats = validator.evaluation_stats(good, 1)
    assert problem is None and stats.n == 6
    assert validator.evaluation_stats(good, 1, "evaluation") == ("reply lacks the evaluation statistics", None)
    problem, stats = validator.evaluation_stats(_eval_reply({**_good_eval_record(), "tp": [1, 2]}, 1, "a"), 1)
    assert problem.startswith("malformed evaluation statistics") and stats is None
    validator.expect_fid(3, False)
    assert validator.fid_expected(2) and not validator.fid_expected(3)


def test_the_ledger_counts_the_bytes_sent_under_their_round_phase_and_node():
    ledger = TrafficLedger()
    first, resent, scoring = _sent(5, "a"), _sent(5, "b"), _sent(5, "c", server_round=3)
    ledger.remember_sent(2, "train", [first, _sent(6, "x")])
    ledger.remember_sent(2, "train", [resent], append=True)
    ledger.remember_sent(3, "train", [scoring], counted_as=(2, "evaluate"))  # a train message that scores first
    assert ledger.sent_bytes(2, "train", 5) == payload_bytes(first) + payload_bytes(resent)
    assert ledger.sent_bytes(2, "evaluate", 5) == payload_bytes(scoring) and ledger.sent_bytes(3, "train", 5) == 0
    assert [m.metadata.message_id for m in ledger.sent_to("train", 5)] == ["c"], \
        "a phase keeps the messages of its latest exchange"


def test_the_ledger_names_the_node_an_error_reply_stands_for():
    ledger = TrafficLedger()
    ledger.remember_sent(1, "train", [_sent(7, "q")])
    ledger.remember_sent(1, "evaluate", [_sent(8, "r")])
    lost = reply(Error(code=ErrorCode.NODE_UNAVAILABLE, reason="unreachable"), node_id=0)  # answers "q"
    assert ledger.node_of(lost) == 7 and ledger.node_of(reply(_train_content(1.0, 1, site="a"), 9)) == 9
    ledger.remember_sent(2, "train", [_sent(7, "s")])
    assert ledger.node_of(lost) == 0, "a message of an earlier exchange no longer names the node"
    ledger.remember_sent(2, "train", [_sent(7, "q")], append=True)
    assert [m.metadata.message_id for m in ledger.sent_to("train", 7)] == ["s", "q"] and ledger.node_of(lost) == 7


def test_a_site_holds_the_model_it_scored_until_it_replies_again():
    held = HeldModels()
    model = ArrayRecord({"head.w": Array(np.full((2, 3), 0.5, np.float32)), "head.b": Array(np.zeros(2, np.float32))})
    wire, digest = held.wire(model)
    assert held.wire(model)[0] is wire and digest == arrays_digest(wire), "converted and hashed once"
    held.sent_to_evaluate(4, digest)
    held.evaluated(1, 3)  # a reply of another round's evaluation
    assert not held.holds(1, digest)
    held.evaluated(1, 4)
    assert held.holds(1, digest) and not held.holds(2, digest)
    held.forget(1)
    assert not held.holds(1, digest)


def test_the_strategy_config_comes_from_the_run_config():
    from common.config import RunConfig
    from server.strategy import ClinicFedProx, make_strategy

    run = RunConfig.from_mapping({"aggregation": "fedprox", "proximal-mu": 0.3, "min-sites": 3, "recon-head": False,
                                  "wire-dtype": "float16", "max-update-norm": 2.0})
    settings = StrategyConfig.from_run_config(run, SPEC, HASH)
    assert (settings.min_sites, settings.proximal_mu, settings.wire_dtype, settings.max_update_norm, settings.fid_dim) \
        == (3, 0.3, "float16", 2.0, None)
    strategy = make_strategy(settings)
    assert isinstance(strategy, ClinicFedProx) and strategy.proximal_mu == 0.3 and strategy.min_train_nodes == 3
    assert strategy.validator.max_update_norm == 2.0 and strategy.held.wire_dtype == "float16"
    with pytest.raises(ValueError, match="aggregation must be one of"):
        StrategyConfig(spec=SPEC, backbone_hash=HASH, label_names=["injury"], min_sites=1, aggregation="mean")


# ------------------------------------------------------------------ the global model is sent once
class _TwoNodes:
    def get_node_ids(self) -> list[int]:
        return [1, 2]


def _site_message(sent, message_id: str):
    """A sent message as the site receives it (content and type kept)."""
    metadata = Metadata(run_id=1, message_id=message_id, src_node_id=0, dst_node_id=sent.metadata.dst_node_id,
                        reply_to_message_id="", group_id="1", created_at=0.0, ttl=60.0,
                        message_type=sent.metadata.message_type)
    return make_message(metadata, content=sent.content)


def test_a_site_that_evaluated_the_model_gets_only_its_digest_and_a_site_without_it_gets_it_in_full(server_task):
    from client.app import GlobalModelNotHeld, global_model

    strategy = _strategy()
    model = ArrayRecord({"head.w": Array(np.full((2, 3), 0.25, np.float32)), "head.b": Array(np.zeros(2, np.float32))})
    evaluate = {m.metadata.dst_node_id: m for m in strategy.configure_evaluate(1, model, ConfigRecord(), _TwoNodes())}
    site_state = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    assert arrays_digest(global_model(_site_message(evaluate[1], "e1"), site_state)) == arrays_digest(model)
    # node 1 evaluated; node 2 failed, so it cannot be assumed to hold anything
    strategy.aggregate_evaluate(1, [_eval_reply(_good_eval_record(), 1, "a"),
                                    reply(_train_content(0, 1, site="b", status="error"), 2, "evaluate")])

    train = {m.metadata.dst_node_id: m for m in strategy.configure_train(2, model, ConfigRecord(), _TwoNodes())}
    assert "arrays" not in train[1].content.array_records and "arrays" in train[2].content.array_records
    assert train[1].content["config"]["global-digest"] == arrays_digest(model)
    model_bytes = sum(len(model[k].data) for k in model.keys())
    assert payload_bytes(train[1]) < 120 and payload_bytes(train[2]) > model_bytes
    held = global_model(_site_message(train[1], "t1"), site_state)  # the site loads what it kept
    assert all(np.array_equal(held[k].numpy(), model[k].numpy()) for k in model.keys())

    restarted = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    with pytest.raises(GlobalModelNotHeld):
        global_model(_site_message(train[1], "t2"), restarted)
    (resent,) = strategy.resend_in_full(2, model, [
        reply(RecordDict({"site": ConfigRecord({"status": "error", "reason": "global-model-not-held",
                                                "site-name": "a"})}), 1)])
    assert resent.metadata.dst_node_id == 1 and "global-digest" not in resent.content["config"]
    assert resent.content["config"]["server-round"] == 2
    assert arrays_digest(resent.content["arrays"]) == arrays_digest(model)


def test_a_train_message_that_scores_first_carries_the_model_and_its_reply_is_pooled_once(server_task):
    """evaluate-with-training: round 3's train message carries round 2's model even to a site that
    holds it (from an evaluation message), its bytes are round 2's evaluation's, and its reply's
    ``evaluation`` record is pooled as round 2's evaluation while its update is round 3's (each
    reply's bytes counted once)."""
    strategy = _strategy()
    model = ArrayRecord({"head.w": Array(np.full((2, 3), 0.25, np.float32)), "head.b": Array(np.zeros(2, np.float32))})
    strategy.configure_evaluate(1, model, ConfigRecord(), _TwoNodes())
    strategy.aggregate_evaluate(1, [_eval_reply(_good_eval_record(), 1, "a"), _eval_reply(_good_eval_record(), 2, "b")])
    config = ConfigRecord({"evaluate-first": True, "fid": False})
    train = {m.metadata.dst_node_id: m for m in strategy.configure_train(3, model, config, _TwoNodes())}
    assert all(arrays_digest(m.content["arrays"]) == arrays_digest(model) for m in train.values()), \
        "the site scores the model it is sent, so it is sent in full"
    assert all("global-digest" not in m.content["config"] for m in train.values())

    def combined(node: int, site: str, evaluation: dict | None):
        content = _train_content(float(node), 10, site=site)
        if evaluation is not None:
            content["evaluation"] = MetricRecord(evaluation)
            content["validation"] = MetricRecord(_good_validation_record())
        return reply(content, node)

    replies = [combined(1, "a", _good_eval_record()), combined(2, "b", None)]
    strategy.aggregate_evaluate(2, replies, within_training=True)
    arrays, _ = strategy.aggregate_train(3, replies)
    first, second = strategy.reports[2], strategy.reports[3]
    assert set(first.evaluation) == {"a"} and strategy.pooled[2].n == 6
    assert first.rejected == [{"site": "b", "phase": "evaluate", "reason": "reply lacks the evaluation statistics"}]
    assert set(second.train) == {"a", "b"} and np.allclose(arrays["head.w"].numpy(), 1.5), \
        "a site whose scores are missing still trained"
    assert first.traffic["a"]["sent"] == payload_bytes(train[1]) and first.traffic["a"]["received"] == 0
    assert second.traffic["a"] == {"sent": 0, "received": payload_bytes(replies[0])}


def test_validation_statistics_are_pooled_apart_from_the_test_statistics_and_checked_alike():
    """Each evaluation reply carries its validation split's statistics in a record of their own:
    they are pooled into the round's validation figures (what chooses the round), and a reply
    whose validation statistics are missing, inconsistent or carry more than classification
    statistics counts for neither pool."""
    from common.metrics.classification import summarize

    strategy = _strategy()
    no_validation = reply(RecordDict({"metrics": MetricRecord(_good_eval_record()), "site": ConfigRecord(
        {"status": "ok", "site-name": "silent", "backbone-hash": HASH})}), 5, message_type="evaluate")
    strategy.aggregate_evaluate(1, [
        _eval_reply(_good_eval_record(), 1, "a"),
        _eval_reply(_good_eval_record(), 2, "b", validation=_good_validation_record(8)),
        _eval_reply(_good_eval_record(), 3, "forged", validation={**_good_validation_record(), "tp": [3]}),
        _eval_reply(_good_eval_record(), 4, "extra", validation={**_good_validation_record(), "err": [1.0]}),
        no_validation])
    report = strategy.reports[1]
    reasons = {r["site"]: r["reason"] for r in report.rejected}
    assert set(report.evaluation) == {"a", "b"} and set(reasons) == {"forged", "extra", "silent"}
    assert reasons["forged"] == "malformed validation statistics: confusion counts do not add up to n"
    assert reasons["extra"] == "malformed validation statistics: unexpected err"
    assert reasons["silent"] == "reply lacks the validation statistics"
    assert strategy.pooled[1].n == 12, "a reply whose validation statistics fail adds no test statistics either"
    expected = ClassificationStats.from_record(_good_validation_record(), 1) + \
        ClassificationStats.from_record(_good_validation_record(8), 1)
    assert strategy.pooled_validation[1].n == 12 and strategy.pooled_validation[1].histograms.keys() == {4}
    assert report.validation["loss"]["value"] == pytest.approx(expected.loss_sum / 12)
    assert report.validation["auc"]["value"] == pytest.approx(summarize(expected)["auc"])
    assert report.validation["loss"]["value"] != report.catalogue["loss"]["value"], "the test figures are apart"


# ------------------------------------------------------------------ lossless compression on the wire
@pytest.mark.parametrize("wire_dtype", ["float32", "float16"])
def test_compressed_parameters_arrive_bit_exact_and_smaller(wire_dtype):
    from common.exchange import decode_array, encode_array

    rng = np.random.default_rng(0)
    value = rng.normal(0, 0.05, (64, 128)).astype(np.float32)
    packed = encode_array(value, wire_dtype, "zlib")
    plain = encode_array(value, wire_dtype, "none")
    assert len(packed.data) < 0.95 * len(plain.data)
    restored = decode_array(packed, (64, 128), np.dtype(wire_dtype))
    assert restored.dtype == np.dtype(wire_dtype) and np.array_equal(restored, value.astype(wire_dtype))
    spec = {"w": ParamSpec((64, 128), np.dtype("float32"))}
    assert np.array_equal(check_arrays(ArrayRecord({"w": packed}), spec, wire_dtype)["w"],
                          value.astype(wire_dtype).astype(np.float32))


def test_a_compressed_array_that_inflates_beyond_its_declared_shape_is_refused():
    import zlib

    from common.exchange import COMPRESSED_STYPE

    # (2, 3) float32 on the wire: 6 x 3 low bytes as they are, then the 6 deflated top bytes.
    low = bytes(18)

    def packed(top: bytes, shape=(2, 3), head: bytes = low) -> Array:
        return Array(dtype="float32", shape=shape, stype=COMPRESSED_STYPE, data=head + zlib.compress(top))

    bomb, short, liar = packed(bytes(50_000_000)), packed(bytes(2)), packed(bytes(6), shape=(3, 2))
    truncated = Array(dtype="float32", shape=(2, 3), stype=COMPRESSED_STYPE, data=bytes(10))
    spec = {"head.w": SPEC["head.w"]}
    for array, reason in ((bomb, "do not inflate"), (short, "do not inflate"), (liar, r"shape \(3, 2\)"),
                          (truncated, "shorter than the declared shape")):
        with pytest.raises(UpdateError, match=reason):
            check_arrays(ArrayRecord({"head.w": array}), spec)
