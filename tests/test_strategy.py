"""Server aggregation: FedAvg math on hand-made updates, and every malformed reply rejected."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, MetricRecord, RecordDict

from common.exchange import ParamSpec, UpdateError, check_arrays
from flwr.serverapp.strategy import FedMedian, FedTrimmedAvg

from server.strategy import ClinicFedAvg
from tests.conftest import reply

HASH = "frozen:abc"
SPEC = {"head.w": ParamSpec((2, 3), np.dtype("float32")), "head.b": ParamSpec((2,), np.dtype("float32"))}


def _strategy(min_sites: int = 1) -> ClinicFedAvg:
    return ClinicFedAvg(spec=SPEC, backbone_hash=HASH, label_names=["injury"], min_sites=min_sites)


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
    "zero-examples": (lambda: _train_content(0, 0, site="bad"), "positive integer"),
    "hash": (lambda: _train_content(0, 5, site="bad", backbone_hash="frozen:zzz"), "backbone hash"),
    "site-error": (lambda: RecordDict({"site": ConfigRecord({"status": "error", "reason": "no-usable-studies",
                                                             "site-name": "bad"})}), "no-usable-studies"),
    "flower-error": (lambda: Error(code=0, reason="ClientApp raised an exception"), "site error"),
}


@pytest.mark.parametrize("kind", sorted(BAD_REPLIES))
def test_malformed_reply_is_rejected_and_the_round_goes_on(kind):
    make_bad, reason = BAD_REPLIES[kind]
    strategy = _strategy()
    good = [reply(_train_content(1.0, 10, site="a"), 1), reply(_train_content(3.0, 10, site="b"), 2)]
    arrays, _ = strategy.aggregate_train(1, [good[0], reply(make_bad(), 3), good[1]])
    assert np.allclose(arrays["head.w"].numpy(), 2.0), "the bad reply must not enter the average"
    (rejected,) = strategy.reports[1].rejected
    assert reason in rejected["reason"] and rejected["phase"] == "train"


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
    ours = ClinicFedAvg(spec=SPEC, backbone_hash=HASH, label_names=["injury"], min_sites=1, aggregation=aggregation,
                        trim_fraction=0.2)
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
    strategy = ClinicFedAvg(spec=SPEC, backbone_hash=HASH, label_names=["injury"], min_sites=1, max_update_norm=5.0)
    start = ArrayRecord({"head.w": Array(np.ones((2, 3), np.float32)), "head.b": Array(np.ones(2, np.float32))})
    strategy.start_round(1, start)
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
    assert rejected["site"] == "hospital-a" and "node unavailable" in rejected["reason"]
