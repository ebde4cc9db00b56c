"""Secure aggregation: our SecAgg+ driver (server/secure_aggregation.py) against Flower's own,
unmodified secaggplus_mod at each site (client/secure_aggregation.py), with real key agreement,
Shamir shares and masks. The messages travel through an in-process grid; what each site "trains"
is a known update, so the result can be compared with plain FedAvg.
"""

from __future__ import annotations

import copy
import time
from typing import Callable

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, Metadata, MetricRecord, RecordDict
from flwr.app.message.message import make_message
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from client.secure_aggregation import secure_aggregation_mod, update_for_masking
from common.config import ConfigError, RunConfig
from common.exchange import UPDATE_NAMES_KEY, ParamSpec, numpy_of
from server.secure_aggregation import SecAggSettings, SecureAggregation
from server.strategy import ClinicFedAvg
from server.strategy_config import StrategyConfig

HASH = "frozen:abc"
SPEC = {"head.w": ParamSpec((40, 50), np.dtype("float32")), "head.b": ParamSpec((50,), np.dtype("float32"))}
SETTINGS = SecAggSettings(num_shares=0, threshold=0, clipping_range=1.0, quantization_range=2 ** 24,
                          max_weight=1000.0)


class InProcessGrid:
    """Delivers each message to its site's mod chain in this process. ``silent[node] = stage``
    makes a site stop answering from that protocol stage on (a site that drops out);
    ``hostile[node](stage, reply, context)`` alters a site's replies (and state) after its mod."""

    def __init__(self, updates: dict[int, dict[str, np.ndarray]], num_examples: dict[int, int]) -> None:
        self.updates, self.num_examples = updates, num_examples
        self.contexts = {node: Context(run_id=1, node_id=node, node_config={"site-name": f"site-{node}"},
                                       state=RecordDict(), run_config={}) for node in updates}
        self.silent: dict[int, str] = {}
        self.not_held: set[int] = set()  # sites named a model by digest that they did not hold
        self.masked: dict[int, list[np.ndarray]] = {}  # node -> masked arrays, as the mod sends them
        self.hostile: dict[int, Callable[[str, Message, Context], None]] = {}

    def get_node_ids(self) -> list[int]:
        return list(self.updates)

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            stage = message.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE]
            stages = Stage.all()
            if node in self.silent and stages.index(stage) >= stages.index(self.silent[node]):
                continue  # the SuperLink would answer for it after the timeout; silence is the same here
            metadata = Metadata(run_id=1, message_id=f"{node}-{stage}-{time.time_ns()}", src_node_id=0,
                                dst_node_id=node, reply_to_message_id="", group_id="1", created_at=time.time(),
                                ttl=600.0, message_type=message.metadata.message_type)
            incoming = make_message(metadata, content=copy.deepcopy(message.content))
            reply = secure_aggregation_mod(incoming, self.contexts[node], self._train)
            if stage == Stage.COLLECT_MASKED_VECTORS and RECORD_KEY_CONFIGS in reply.content.config_records:
                self.masked[node] = [bytes_to_ndarray(b) for b in
                                     reply.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]]
            if node in self.hostile:
                self.hostile[node](stage, reply, self.contexts[node])
            replies.append(reply)
        return replies

    def _train(self, msg: Message, context: Context) -> Message:
        """A site's train handler: the global model it was sent, moved by its known update."""
        from client.app import GlobalModelNotHeld, global_model

        node = context.node_id
        try:
            start = {k: numpy_of(v) for k, v in global_model(msg, context).items()}
        except GlobalModelNotHeld:  # as the ClientApp answers it
            self.not_held.add(node)
            return Message(RecordDict({"site": ConfigRecord({"status": "error", "reason": "global-model-not-held",
                                                             "site-name": f"site-{node}"})}), reply_to=msg)
        trained = {k: start[k] + self.updates[node][k] for k in start}
        content = update_for_masking(start, trained, self.num_examples[node])
        content["metrics"] = MetricRecord({"num-examples": self.num_examples[node], "train-loss": 0.5,
                                           "train-seconds": 1.0})
        content["site"] = ConfigRecord({"status": "ok", "site-name": f"site-{node}", "backbone-hash": HASH,
                                        UPDATE_NAMES_KEY: list(start)})
        return Message(content, reply_to=msg)


def _setting(sites: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    updates = {node: {name: rng.normal(0, 0.02, p.shape).astype(np.float32) for name, p in SPEC.items()}
               for node in range(1, sites + 1)}
    counts = {node: int(n) for node, n in zip(updates, rng.integers(20, 200, sites))}
    start = ArrayRecord({name: Array(rng.normal(0, 0.5, p.shape).astype(np.float32)) for name, p in SPEC.items()})
    return updates, counts, start


def _fedavg(start: ArrayRecord, updates: dict, counts: dict, nodes: list[int]) -> dict[str, np.ndarray]:
    total = sum(counts[n] for n in nodes)
    return {name: start[name].numpy().astype(np.float64) + sum(counts[n] / total * updates[n][name].astype(np.float64)
                                                                for n in nodes) for name in SPEC}


def _run(grid: InProcessGrid, start: ArrayRecord, strategy: ClinicFedAvg | None = None):
    strategy = strategy or ClinicFedAvg(StrategyConfig(spec=SPEC, backbone_hash=HASH, label_names=["injury"],
                                                       min_sites=2))
    for node in grid.updates:  # round 0's evaluation replies have named every node
        strategy.identities.resolve(node, f"site-{node}")
    result = SecureAggregation(SETTINGS, strategy, grid, timeout=60).train(1, start, ConfigRecord())
    return result, strategy.reports[1]


def test_the_secure_aggregate_equals_fedavg_within_the_stated_quantisation_error(server_task):
    updates, counts, start = _setting(3)
    result, report = _run(InProcessGrid(updates, counts), start)
    expected = _fedavg(start, updates, counts, [1, 2, 3])
    bound = SETTINGS.error_bound([counts[n] for n in (1, 2, 3)])
    assert report.aggregated and report.secure_aggregation["quantization_error_bound"] == pytest.approx(bound)
    assert bound < 1e-4  # small against updates of ~0.02: the comparison means something
    for name in SPEC:
        error = np.abs(result[name].numpy() - expected[name])
        # plus float32 rounding of the new global model (|w| < 3)
        assert error.max() <= bound + 3 * np.finfo(np.float32).eps, name
    assert set(report.train) == {"site-1", "site-2", "site-3"} and report.secure_aggregation["dropped"] == {}
    assert all(t["received"] > 0 and t["sent"] > 0 for t in report.traffic.values())


def test_a_site_that_drops_after_sharing_its_keys_does_not_stop_the_round(server_task):
    updates, counts, start = _setting(4, seed=1)
    grid = InProcessGrid(updates, counts)
    grid.silent[4] = Stage.COLLECT_MASKED_VECTORS  # it has shared its keys, then goes silent
    result, report = _run(grid, start)
    survivors = [1, 2, 3]
    expected = _fedavg(start, updates, counts, survivors)
    bound = SETTINGS.error_bound([counts[n] for n in survivors])
    for name in SPEC:
        assert np.abs(result[name].numpy() - expected[name]).max() <= bound + 3 * np.finfo(np.float32).eps
    # and it is not the mean with the dropped site in it
    with_dropped = _fedavg(start, updates, counts, [1, 2, 3, 4])
    assert np.abs(result["head.w"].numpy() - with_dropped["head.w"]).max() > 100 * bound
    assert report.secure_aggregation["dropped"] == {"site-4": "collect_masked_vectors: no reply"}
    assert report.secure_aggregation["threshold"] == 3 and set(report.train) == {"site-1", "site-2", "site-3"}


def test_too_many_dropouts_leave_the_global_model_unchanged_with_the_reason(server_task):
    updates, counts, start = _setting(3, seed=2)
    grid = InProcessGrid(updates, counts)
    grid.silent[2] = grid.silent[3] = Stage.COLLECT_MASKED_VECTORS
    result, report = _run(grid, start)
    assert result is None and not report.aggregated
    assert "too few to reach the reconstruction threshold" in report.notes[-1]


def test_a_masked_update_is_indistinguishable_from_random(server_task):
    updates, counts, start = _setting(3, seed=3)
    grid = InProcessGrid(updates, counts)
    _run(grid, start)
    masked = np.concatenate([a.ravel() for a in grid.masked[1][1:]]).astype(np.float64)  # [0] is the weight
    true = np.concatenate([updates[1][name].ravel() for name in SPEC]).astype(np.float64)
    n = masked.size
    assert abs(np.corrcoef(masked, true)[0, 1]) < 4 / np.sqrt(n)  # ~0: 4 standard errors of a null correlation
    # uniform on [0, 2^32): Kolmogorov-Smirnov distance below its 0.1% critical value
    u = np.sort(masked / 2 ** 32)
    distance = max(np.max(np.arange(1, n + 1) / n - u), np.max(u - np.arange(n) / n))
    assert distance < 1.95 / np.sqrt(n)
    # whereas the same update quantised without masks is the update itself
    quantised = np.round((true * counts[1] / SETTINGS.max_weight + 1.0) * SETTINGS.quantization_range / 2)
    assert np.corrcoef(quantised, true)[0, 1] > 0.999


@pytest.mark.parametrize("override, reason", [
    ({"aggregation": "fedmedian"}, "aggregation = fedmedian"),
    ({"aggregation": "trimmed-mean"}, "aggregation = trimmed-mean"),
    ({"max-update-norm": 5.0}, "max-update-norm"),
    ({"secagg-num-shares": 3, "secagg-reconstruction-threshold": 3}, "below secagg-num-shares"),
])
def test_combinations_that_cannot_work_on_masked_updates_are_refused_at_start_up(override, reason):
    with pytest.raises(ConfigError, match=reason) as refused:
        RunConfig.from_mapping({"secure-aggregation": True, **override})
    assert "\n" not in str(refused.value)
    RunConfig.from_mapping(override)  # each is fine without secure aggregation


def test_a_federated_run_with_secure_aggregation_and_dp_at_the_sites(tmp_path):
    """The real ServerApp and ClientApp (with secaggplus_mod) in process, every message serialised:
    every round is aggregated through SecAgg+, the sites' DP accountant still charges them, the
    model learns. (tests/test_approval.py runs SecAgg+ over real TLS.)"""
    import torch

    from common.runlog import read_metrics
    from simulations.inprocess import run_inprocess
    from simulations.synthetic import SyntheticSpec, generate_clinics

    generate_clinics(tmp_path / "data", SyntheticSpec(sites=3, studies_per_site=16, image_size=32,
                                                      slices_per_study=3, seed=11), progress=False)
    overrides = {"num-rounds": 2, "min-sites": 3, "image-size": 32, "seq-len": 3, "recon-head": False,
                 "secure-aggregation": True, "dp-enabled": True, "dp-noise-multiplier": 0.5,
                 "dp-target-epsilon": 1000.0, "feature-norm": "none", "site-policy": str(tmp_path / "site-policy.toml")}
    # Little noise, so that two rounds visibly move the model: these synthetic sites accept it, and
    # require secure aggregation, which every train message must then use.
    (tmp_path / "site-policy.toml").write_text("max-epsilon = 1000.0\nrequire-secure-aggregation = true\n")
    run_dir = run_inprocess(tmp_path / "data", tmp_path / "runs", 3, overrides)
    records = read_metrics(run_dir)
    assert [r["round"] for r in records] == [0, 1, 2]
    sites = {"site-01", "site-02", "site-03"}
    for record in records[1:]:
        secure = record["secure_aggregation"]
        assert record["aggregated"] and not record["rejected"], record["notes"]
        assert secure["sites"] == 3 and secure["dropped"] == {} and secure["threshold"] == 2
        assert 0 < secure["quantization_error_bound"] < 1e-3
        assert set(record["train"]) == sites and set(record["privacy"]) == sites
    epsilon = [{s: r["privacy"][s]["epsilon"] for s in sites} for r in records[1:]]
    assert all(0 < epsilon[0][s] < epsilon[1][s] for s in sites), "each round is charged to each site's budget"
    first = torch.load(run_dir / "checkpoints" / "round-000.pt", weights_only=False)["trainable"]
    last = torch.load(run_dir / "checkpoints" / "round-002.pt", weights_only=False)["trainable"]
    assert any(not torch.equal(first[k], last[k]) for k in first), "the secure aggregate moved the model"


def test_a_simulation_with_an_incompatible_combination_is_refused_before_flower_starts(tmp_path):
    from simulations.runner import run_simulation

    with pytest.raises(ConfigError, match="trimmed-mean"):
        run_simulation(tmp_path, tmp_path / "runs", 2, {"secure-aggregation": True, "aggregation": "trimmed-mean"},
                       flwr_home=tmp_path / "flwr-home", timeout=30)
    assert not (tmp_path / "flwr-home" / "logs").exists() or not any((tmp_path / "flwr-home" / "logs").iterdir())


def test_a_site_weighing_in_above_max_weight_is_left_out_of_the_sum_and_the_rest_aggregate(server_task):
    updates, counts, start = _setting(4, seed=4)
    counts[4] = 1500  # above secagg-max-weight: its clipped, weighted update would be wrong
    result, report = _run(InProcessGrid(updates, counts), start)
    expected = _fedavg(start, updates, counts, [1, 2, 3])
    bound = SETTINGS.error_bound([counts[n] for n in (1, 2, 3)])
    assert np.abs(result["head.w"].numpy() - expected["head.w"]).max() <= bound + 3 * np.finfo(np.float32).eps
    assert "exceeds secagg-max-weight 1000" in report.secure_aggregation["dropped"]["site-4"]
    assert any(r["site"] == "site-4" and "secagg-max-weight" in r["reason"] for r in report.rejected)


def test_a_site_named_a_model_it_does_not_hold_gets_it_in_full_within_the_protocol(server_task):
    """The centre believes the sites hold the global model (they evaluated it), so the masked-vector
    stage names it by digest; the sites lost it (restarted): the same stage is sent again with the
    model itself, and the round completes."""
    from tests.test_strategy import _eval_reply, _good_eval_record

    updates, counts, start = _setting(3, seed=5)
    grid = InProcessGrid(updates, counts)
    strategy = ClinicFedAvg(StrategyConfig(spec=SPEC, backbone_hash=HASH, label_names=["injury"], min_sites=2))
    strategy.configure_evaluate(0, start, ConfigRecord(), grid)
    strategy.aggregate_evaluate(0, [_eval_reply(_good_eval_record(), node, f"site-{node}") for node in (1, 2, 3)])
    result, report = _run(grid, start, strategy)
    assert grid.not_held == {1, 2, 3}
    expected = _fedavg(start, updates, counts, [1, 2, 3])
    bound = SETTINGS.error_bound([counts[n] for n in (1, 2, 3)])
    assert np.abs(result["head.w"].numpy() - expected["head.w"]).max() <= bound + 3 * np.finfo(np.float32).eps
    assert report.secure_aggregation["dropped"] == {} and not report.rejected


# --------------------------------------------------------------------------- one hostile site
def _protocol(reply: Message) -> ConfigRecord:
    return reply.content.config_records[RECORD_KEY_CONFIGS]


def _assert_fedavg(result: ArrayRecord | None, start: ArrayRecord, updates: dict, counts: dict,
                   nodes: list[int]) -> None:
    assert result is not None, "the round did not aggregate"
    expected = _fedavg(start, updates, counts, nodes)
    bound = SETTINGS.error_bound([counts[n] for n in nodes])
    for name in SPEC:
        assert np.abs(result[name].numpy() - expected[name]).max() <= bound + 3 * np.finfo(np.float32).eps, name


def test_a_malformed_key_share_is_left_out_and_the_other_shares_remove_the_masks(server_task):
    updates, counts, start = _setting(3, seed=6)
    grid = InProcessGrid(updates, counts)

    def corrupt_one_share(stage: str, reply: Message, context: Context) -> None:
        if stage == Stage.UNMASK:
            record = _protocol(reply)
            shares = list(record[Key.SHARE_LIST])
            shares[list(record[Key.NODE_ID_LIST]).index(2)] = b"\x00"
            record[Key.SHARE_LIST] = shares

    grid.hostile[1] = corrupt_one_share
    result, report = _run(grid, start)
    _assert_fedavg(result, start, updates, counts, [1, 2, 3])  # sites 2 and 3 hold the threshold of 2
    assert report.aggregated
    assert any("site-1" in note and "site-2" in note and "left out" in note for note in report.notes), report.notes


def test_a_key_share_its_holder_altered_is_found_among_the_others_and_left_out(server_task):
    """Five sites, threshold 3: the five shares of a seed must agree, and only leaving out the
    altered one makes the other four agree. The altered chunk leaves the padding intact."""
    updates, counts, start = _setting(5, seed=13)
    grid = InProcessGrid(updates, counts)

    def alter_one_share(stage: str, reply: Message, context: Context) -> None:
        if stage == Stage.UNMASK:
            record = _protocol(reply)
            shares = list(record[Key.SHARE_LIST])
            at = list(record[Key.NODE_ID_LIST]).index(2)
            shares[at] = shares[at][:4] + bytes([shares[at][4] ^ 1]) + shares[at][5:]  # first chunk, first byte
            record[Key.SHARE_LIST] = shares

    grid.hostile[1] = alter_one_share
    result, report = _run(grid, start)
    _assert_fedavg(result, start, updates, counts, [1, 2, 3, 4, 5])
    assert report.notes == ["secure aggregation: the key share site-1 handed in for site-2 does not fit the others: "
                            "left out"]


def test_key_shares_count_once_per_site_that_hands_them_in(server_task):
    updates, counts, start = _setting(4, seed=7)  # 4 shares, threshold 3
    grid = InProcessGrid(updates, counts)
    grid.silent[4] = Stage.COLLECT_MASKED_VECTORS  # its pairwise masks need 3 shares of its key
    grid.silent[3] = Stage.UNMASK  # summed, then hands in nothing: only sites 1 and 2 do

    def hand_in_each_share_twice(stage: str, reply: Message, context: Context) -> None:
        if stage == Stage.UNMASK:
            record = _protocol(reply)
            record[Key.NODE_ID_LIST] = list(record[Key.NODE_ID_LIST]) * 2
            record[Key.SHARE_LIST] = list(record[Key.SHARE_LIST]) * 2

    grid.hostile[1] = hand_in_each_share_twice
    result, report = _run(grid, start)
    assert result is None and not report.aggregated
    assert "too few key shares" in report.notes[-1] and "global model unchanged" in report.notes[-1]


def test_a_rebuilt_private_key_must_match_the_public_key_its_site_sent_at_setup(server_task):
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_STATE
    from flwr.supercore.primitives.asymmetric import generate_key_pairs, private_key_to_bytes

    updates, counts, start = _setting(4, seed=8)
    grid = InProcessGrid(updates, counts)
    grid.silent[4] = Stage.COLLECT_MASKED_VECTORS  # its key is rebuilt to remove its pairwise masks

    def share_another_private_key(stage: str, reply: Message, context: Context) -> None:
        if stage == Stage.SETUP:  # its public key has gone out; the private key it shares next is another
            context.state.config_records[RECORD_KEY_STATE]["sk1"] = private_key_to_bytes(generate_key_pairs()[0])

    grid.hostile[4] = share_another_private_key
    result, report = _run(grid, start)
    assert result is None and not report.aggregated
    assert "site-4" in report.notes[-1] and "does not match the public key" in report.notes[-1], report.notes


def test_a_masked_coordinate_moved_by_2_to_the_31_is_refused_after_unmasking(server_task):
    from flwr.common import ndarray_to_bytes

    updates, counts, start = _setting(3, seed=9)
    grid = InProcessGrid(updates, counts)

    def shift_one_coordinate(stage: str, reply: Message, context: Context) -> None:
        if stage == Stage.COLLECT_MASKED_VECTORS:
            record = _protocol(reply)
            arrays = [bytes_to_ndarray(b) for b in record[Key.MASKED_PARAMETERS]]
            arrays[1].flat[0] = (int(arrays[1].flat[0]) + 2 ** 31) % 2 ** 32  # still within the modulus
            record[Key.MASKED_PARAMETERS] = [ndarray_to_bytes(a) for a in arrays]

    grid.hostile[1] = shift_one_coordinate
    result, report = _run(grid, start)
    assert result is None and not report.aggregated
    assert "outside the clipping range" in report.notes[-1], report.notes


def test_a_site_whose_public_key_cannot_be_used_is_dropped_at_setup_and_the_others_aggregate(server_task):
    updates, counts, start = _setting(3, seed=10)
    grid = InProcessGrid(updates, counts)

    def unusable_key(stage: str, reply: Message, context: Context) -> None:
        if stage == Stage.SETUP:  # every neighbour would fail to encrypt its key shares for it
            _protocol(reply)[Key.PUBLIC_KEY_2] = b"-----BEGIN PUBLIC KEY-----\nnot a key\n"

    grid.hostile[1] = unusable_key
    result, report = _run(grid, start)
    _assert_fedavg(result, start, updates, counts, [2, 3])
    assert "unusable public key" in report.secure_aggregation["dropped"]["site-1"]


def test_a_site_that_withholds_its_key_shares_from_a_neighbour_is_dropped_before_anyone_masks(server_task):
    updates, counts, start = _setting(3, seed=11)
    grid = InProcessGrid(updates, counts)

    def withhold_one(stage: str, reply: Message, context: Context) -> None:
        if stage == Stage.SHARE_KEYS:  # that neighbour would not mask against it, the others would
            record = _protocol(reply)
            record[Key.DESTINATION_LIST] = list(record[Key.DESTINATION_LIST])[1:]
            record[Key.CIPHERTEXT_LIST] = list(record[Key.CIPHERTEXT_LIST])[1:]

    grid.hostile[1] = withhold_one
    result, report = _run(grid, start)
    _assert_fedavg(result, start, updates, counts, [2, 3])
    assert report.secure_aggregation["dropped"]["site-1"].startswith(f"{Stage.SHARE_KEYS}: ")


# --------------------------------------------------------------------------- fuzzing the protocol records
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from flwr.common import ndarray_to_bytes  # noqa: E402
from flwr.supercore.primitives.asymmetric import generate_key_pairs, public_key_to_bytes  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_FOREIGN_KEYS = [public_key_to_bytes(generate_key_pairs()[1]),  # a valid key whose private key no site holds
                 public_key_to_bytes(ec.generate_private_key(ec.SECP256R1()).public_key())]  # another curve
_scalars = st.one_of(st.integers(min_value=-2 ** 63, max_value=2 ** 63 - 1), st.sampled_from([0, 1, 2, 3, 4, -1]),
                     st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.text(max_size=8),
                     st.binary(max_size=80), st.sampled_from([b"", b"\x00", *_FOREIGN_KEYS]))
_record_values = st.one_of(_scalars, st.lists(st.sampled_from([1, 2, 3, 4, 0, -1]), max_size=6),
                           st.lists(st.binary(max_size=80), max_size=6), st.lists(_scalars, max_size=4))
_PROTOCOL_KEYS = {Stage.SETUP: [Key.PUBLIC_KEY_1, Key.PUBLIC_KEY_2],
                  Stage.SHARE_KEYS: [Key.DESTINATION_LIST, Key.CIPHERTEXT_LIST],
                  Stage.COLLECT_MASKED_VECTORS: [Key.MASKED_PARAMETERS],
                  Stage.UNMASK: [Key.NODE_ID_LIST, Key.SHARE_LIST]}


def _altered_bytes(data: st.DataObject, value: bytes) -> bytes:
    """A masked array with one coordinate moved (within the modulus, or out of it) or another
    dtype/shape, or the bytes cut, padded, flipped."""
    try:
        array = bytes_to_ndarray(value)
    except Exception:  # not an array: a key, a share or a ciphertext
        array = None
    # a moved coordinate passes every check before unmasking: drawn most often
    array_changes = ["move"] * 6 + ["set", "cast"] if array is not None else []
    how = data.draw(st.sampled_from(["cut", "pad", "flip"] + array_changes))
    if how in ("move", "set") and array.size:
        array = array.copy()
        at = data.draw(st.integers(0, array.size - 1))
        if how == "move":
            by = data.draw(st.sampled_from([2 ** 31, 1, 2 ** 23, 2 ** 32 - 1]) | st.integers(1, 2 ** 32 - 1))
            array.flat[at] = (int(array.flat[at]) + by) % 2 ** 32
        else:
            array.flat[at] = data.draw(st.sampled_from([2 ** 32, -1, 2 ** 63 - 1]))
        return ndarray_to_bytes(array)
    if how == "cast" and array is not None:
        return ndarray_to_bytes(array.astype(data.draw(st.sampled_from(["float64", "uint32", "int8"]))).reshape(-1))
    if how == "cut":
        return value[:data.draw(st.integers(0, max(len(value) - 1, 0)))]
    if how == "pad":
        return value + data.draw(st.binary(min_size=1, max_size=32))
    at = data.draw(st.integers(0, max(len(value) - 1, 0)))
    return value[:at] + bytes([value[at] ^ data.draw(st.integers(1, 255))]) + value[at + 1:] if value else b"\x01"


def _hostile_value(data: st.DataObject, value: object) -> object:
    """A drawn hostile version of one protocol value (None: the key is left out). Changes that keep
    the record well-formed reach the deeper checks: they are drawn most often."""
    how = data.draw(st.sampled_from(["replace", "remove"] + ["alter"] * 4))
    if how == "remove":
        return None
    if how == "replace" or not value:
        return data.draw(_record_values)
    if isinstance(value, bytes):
        return _altered_bytes(data, value)
    if not isinstance(value, list):
        return data.draw(_record_values)
    value = list(value)
    at = data.draw(st.integers(0, len(value) - 1))
    change = data.draw(st.sampled_from(["element"] * 3 + ["repeat", "drop", "move"]))
    if change == "element":
        value[at] = _altered_bytes(data, value[at]) if isinstance(value[at], bytes) else data.draw(_scalars)
    elif change == "repeat":
        value.append(value[at])
    elif change == "drop":
        del value[at]
    else:
        value.insert(0, value.pop(at))
    return value


@pytest.mark.parametrize("stage", Stage.all())
@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_protocol_records_from_one_site_never_end_the_round_nor_move_the_model_out_of_range(
        server_task, stage, data):
    updates, counts, start = _setting(3, seed=12)  # 3 shares, threshold 2: the two other sites suffice
    grid = InProcessGrid(updates, counts)

    def hostile(now: str, reply: Message, context: Context) -> None:
        if now != stage or RECORD_KEY_CONFIGS not in reply.content.config_records:
            return
        record = _protocol(reply)
        for key in data.draw(st.lists(st.sampled_from(_PROTOCOL_KEYS[stage]), min_size=1, max_size=2, unique=True)):
            value = _hostile_value(data, record.get(key))
            try:
                if value is None:
                    record.pop(key, None)
                else:
                    record[key] = value
            except Exception:  # Flower refuses such a record: it could never arrive
                pass

    grid.hostile[1] = hostile
    result, report = _run(grid, start)  # nothing escapes the round
    if stage == Stage.UNMASK:  # its vector is in the sum already: a share it altered is found before unmasking
        assert result is not None or "could not rebuild" in report.notes[-1], report.notes
    if result is None:
        assert not report.aggregated and report.notes[-1].startswith("secure aggregation: ")
        return
    assert report.aggregated
    bound = report.secure_aggregation["quantization_error_bound"]
    for name in SPEC:
        moved = result[name].numpy().astype(np.float64) - start[name].numpy()
        assert np.all(np.isfinite(moved))
        assert np.abs(moved).max() <= SETTINGS.clipping_range + bound + 3 * np.finfo(np.float32).eps
    summed = sorted(int(site.removeprefix("site-")) for site in report.train)
    if stage != Stage.COLLECT_MASKED_VECTORS:  # only the masked vector itself can move the sum
        _assert_fedavg(result, start, updates, counts, summed)
    if stage == Stage.UNMASK:
        assert summed == [1, 2, 3]
