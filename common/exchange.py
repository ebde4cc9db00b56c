"""What travels between server and sites: the trainable parameters, by name, and nothing else.

A ResNet50 has 23.5 M frozen parameters; sending them every round would cost ~94 MB per site
per direction, and FedAvg over float32 copies of identical frozen tensors is not even a no-op
(it drifts them by one float step). The frozen part is identified by a hash instead.
"""

from __future__ import annotations

import hashlib
import math
import zlib
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message

from common.model import InjuryNet
from common.reason_codes import ReasonCodeError

ARRAYS_KEY = "arrays"
METRICS_KEY = "metrics"
SITE_KEY = "site"  # ConfigRecord: status, reason code, backbone hash, site name; never data
STATUS_OK = "ok"
STATUS_ERROR = "error"
POLICY_KEY = "policy-key"  # with reason policy-refused: the run-config (or policy) key the site's policy refused
STATUS_BUDGET_EXHAUSTED = "budget-exhausted"  # the site's privacy budget does not allow another round
# A train message may name the global model by digest instead of carrying it: the site already
# holds it from the evaluation message of the previous round (the same model, sent once).
GLOBAL_DIGEST_KEY = "global-digest"
# An evaluation message says whether its round computes FID (run config fid-every).
FID_KEY = "fid"
# A train message with this flag carries the global model and asks the site to evaluate it before
# training from it (federation evaluate-with-training): the previous round's evaluation and this
# round's training in one message. The reply holds the evaluation statistics under EVALUATION_KEY.
EVALUATE_FIRST_KEY = "evaluate-first"
EVALUATION_KEY = "evaluation"
# Every evaluation reply (of an evaluation message or with evaluate-first) also holds the site's
# validation split's classification statistics (counts, histograms, loss sum) in a MetricRecord
# of this name: what the centre chooses the round, stops early, calibrates and sets the threshold
# by. The test statistics only report.
VALIDATION_KEY = "validation"
# MetricRecord: the test split by subgroup (common/metrics/subgroup_stats.py), beside the test statistics
SUBGROUPS_KEY = "subgroups"
# In the site record: the app bundle sha256 the site's gate approved before running this reply's code
GATE_APPROVED_KEY = "gate-approved-sha256"
GLOBAL_NOT_HELD = "global-model-not-held"  # the site's reason code when it does not hold that model
# Secure aggregation: the site record lists the names of the masked arrays, in their order.
UPDATE_NAMES_KEY = "update-names"


class UpdateError(ReasonCodeError, ValueError):
    """A set of parameters does not fit the model (wrong names, shapes, dtypes or values)."""

    code = "bad-global-parameters"  # what a site answers when the centre's model does not fit


@dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    dtype: np.dtype


def trainable_state(model: InjuryNet) -> "OrderedDict[str, torch.Tensor]":
    return OrderedDict((name, p.detach()) for name, p in model.named_parameters() if p.requires_grad)


def trainable_spec(model: InjuryNet) -> dict[str, ParamSpec]:
    return {name: ParamSpec(tuple(t.shape), np.dtype(str(t.dtype).removeprefix("torch.")))
            for name, t in trainable_state(model).items()}


WIRE_DTYPES = ("float32", "float16")
WIRE_COMPRESSIONS = ("zlib", "none")
# Lossless, and cheap enough to be on by default. Of a float's bytes only the top one (the sign
# and the high exponent bits) repeats much in trained weights: it deflates to ~45%, while the
# mantissa bytes do not shrink at all. So only that byte plane is deflated (Huffman coding alone,
# which finds what there is to find in it), and the other bytes travel as they are: about 16%
# fewer bytes for the 0.47 M trainable parameters in ~4 ms, ~4 ms to restore. (Deflating every
# byte plane saved the same bytes in 13-15 ms; full LZ77 matching saved less in 33 ms.)
COMPRESSED_STYPE = "clinicfl.topbyte-zlib"


def encode_array(value: np.ndarray, wire_dtype: str = "float32", compression: str = "none") -> Array:
    """One array as it goes on the wire: in ``wire_dtype``, compressed or as Flower's numpy bytes.
    Compressed: the byte planes of the little-endian values, low to high, the top one deflated."""
    value = np.ascontiguousarray(value, dtype=np.dtype(wire_dtype).newbyteorder("<"))
    if compression == "none":
        return Array(value.astype(wire_dtype, copy=False))
    planes = value.view(np.uint8).reshape(-1, value.itemsize).T.copy()  # (bytes per value, count)
    deflate = zlib.compressobj(1, zlib.DEFLATED, 15, 8, zlib.Z_HUFFMAN_ONLY)
    top = deflate.compress(planes[-1]) + deflate.flush()
    return Array(dtype=np.dtype(wire_dtype).name, shape=tuple(value.shape), stype=COMPRESSED_STYPE,
                 data=planes[:-1].tobytes() + top)


def decode_array(array: Array, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An array from the wire, either form. A compressed one must declare ``shape`` and ``dtype``
    and inflate to exactly that many bytes (never more: a small payload cannot become a huge one)."""
    if array.stype != COMPRESSED_STYPE:
        return array.numpy()
    declared = tuple(array.shape)
    if declared != shape:
        raise UpdateError(f"shape {declared}, expected {shape}")
    if array.dtype != dtype.name:
        raise UpdateError(f"dtype {array.dtype}, expected {dtype.name}")
    count, width = math.prod(shape), dtype.itemsize
    low_size = count * (width - 1)
    if len(array.data) < low_size:
        raise UpdateError("the compressed bytes are shorter than the declared shape")
    inflater = zlib.decompressobj()
    top = inflater.decompress(memoryview(array.data)[low_size:], count)
    if len(top) != count or inflater.unconsumed_tail or not inflater.eof:
        raise UpdateError("the compressed bytes do not inflate to the declared shape")
    planes = np.empty((width, count), np.uint8)
    planes[:-1] = np.frombuffer(array.data, np.uint8, low_size).reshape(width - 1, count)
    planes[-1] = np.frombuffer(top, np.uint8)
    return planes.T.copy().view(dtype.newbyteorder("<")).astype(dtype, copy=False).reshape(shape)


def numpy_of(array: Array) -> np.ndarray:
    """An array from the wire as numpy, by what it declares (for arrays whose spec is not at hand)."""
    return decode_array(array, tuple(array.shape), np.dtype(array.dtype))


def to_array_record(model: InjuryNet, wire_dtype: str = "float32", compression: str = "none") -> ArrayRecord:
    """The trainable parameters, by name, in the wire dtype (float16 halves the bytes; the server
    aggregates in float64 and keeps float32), optionally compressed (lossless)."""
    return ArrayRecord({k: encode_array(v.cpu().numpy(), wire_dtype, compression)
                        for k, v in trainable_state(model).items()})


def to_wire(arrays: ArrayRecord, wire_dtype: str, compression: str = "none") -> ArrayRecord:
    """A float32 ArrayRecord as it goes on the wire."""
    if wire_dtype == "float32" and compression == "none":
        return arrays
    return ArrayRecord({k: encode_array(v.numpy(), wire_dtype, compression) for k, v in arrays.items()})


def arrays_digest(arrays: ArrayRecord) -> str:
    """SHA-256 over the names and serialised arrays (dtype and shape included): the same on both
    sides of the wire, since an Array travels as these bytes."""
    digest = hashlib.sha256()
    for name in sorted(arrays.keys()):
        digest.update(name.encode() + b"\0" + arrays[name].data)
    return digest.hexdigest()


def check_arrays(arrays: ArrayRecord, spec: dict[str, ParamSpec], wire_dtype: str = "float32") -> dict[str, np.ndarray]:
    """The arrays as numpy in the spec's dtype, or UpdateError with the first reason they cannot
    be used. With a 16-bit ``wire_dtype`` the arrays must come in that dtype and are widened."""
    names = set(arrays.keys())
    missing, extra = sorted(set(spec) - names), sorted(names - set(spec))
    if missing or extra:
        raise UpdateError(f"parameter names differ: {len(missing)} missing (e.g. {missing[:2]}), "
                          f"{len(extra)} unexpected (e.g. {extra[:2]})")
    out = {}
    for name, expected in spec.items():
        wanted = np.dtype(wire_dtype) if wire_dtype != "float32" else expected.dtype
        try:
            value = decode_array(arrays[name], expected.shape, wanted)
        except UpdateError as exc:
            raise UpdateError(f"{name}: {exc}") from exc
        except Exception as exc:  # a corrupt payload can fail to deserialise in many ways
            raise UpdateError(f"{name}: cannot be decoded ({type(exc).__name__})") from exc
        if tuple(value.shape) != expected.shape:
            raise UpdateError(f"{name}: shape {tuple(value.shape)}, expected {expected.shape}")
        if value.dtype != wanted:
            raise UpdateError(f"{name}: dtype {value.dtype}, expected {wanted}")
        if not np.all(np.isfinite(value)):
            raise UpdateError(f"{name}: non-finite values")
        out[name] = value.astype(expected.dtype, copy=False)
    return out


def load_array_record(model: InjuryNet, arrays: ArrayRecord, wire_dtype: str = "float32") -> None:
    """Load global trainable parameters into the model after checking every one of them."""
    values = check_arrays(arrays, trainable_spec(model), wire_dtype)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in values.items():
            params[name].copy_(torch.from_numpy(value))


def site_record(message: Message) -> ConfigRecord:
    """The reply's site record, or an empty one when the reply has none."""
    record = message.content.config_records.get(SITE_KEY)
    return record if record is not None else ConfigRecord()


def payload_bytes(message: Message) -> int:
    """Payload size of a message: array bytes, 8 bytes per metric value, config values as text.
    (Protocol framing is not counted.)"""
    if message.has_error():
        return 0
    content = message.content
    total = sum(len(a.data) for record in content.array_records.values() for a in record.values())
    for record in content.metric_records.values():
        total += sum(8 * (len(v) if isinstance(v, list) else 1) for v in record.values())
    for record in content.config_records.values():
        total += sum(len(k) + _config_value_bytes(v) for k, v in record.items())
    return total


def _config_value_bytes(value: object) -> int:
    """Bytes as bytes (SecAgg+'s keys, shares and masked vectors are lists of bytes), else as text."""
    if isinstance(value, bytes):
        return len(value)
    if isinstance(value, list):
        return sum(_config_value_bytes(item) for item in value)
    return len(str(value))
