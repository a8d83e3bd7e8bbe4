"""The guard in front of every aggregation: a merchant's reply can neither crash a round nor steer it.

`GuardedAggregation` sits before any Flower strategy in the class order. Every reply must answer an
instruction this round sent, come from the node it was sent to, and answer it once. It is then
checked against a strict schema: exactly the tensors of the adapter's shared part ([model] shared),
each decoded here from its bytes (numpy float32 of the expected shape and byte length, finite, within
the update-norm ceiling; whatever fails to decode is a rejection, never an exception in the round),
and a few typed scalars under known keys, each within a sane range. What passes is rebuilt from the
checked values before Flower sees it, with the weight the server chooses, not the one a merchant
claims (`federation.weighting`); what fails is recorded and left out, and the round goes on.

Without client-level DP, each accepted update is then clipped (not rejected) to
`federation.median_norm_clip` times the round's median update norm (norm bounding, as in Sun et al.
2019, "Can you really backdoor federated learning?"): the absolute ceiling `max_update_norm` alone
let one merchant send updates thousands of times an honest one's norm, in any direction, every round.
The median is the lower one, so with two merchants neither can raise the other's bound, and with
three or more one merchant cannot.

A partition id is a label a node claims: it files that node's record under the id (the key reports
name merchants by), bound, for this server's life, to the first node that claims it alone in a round
and holds no other. A node claiming a label bound to another, contested in the round, or other than
its own, is filed under its node id and the conflict recorded; its reply is judged like any other,
and never displaces the label's owner. Replies are keyed by node throughout, so a borrowed label can
neither reject nor replace the real merchant's reply.

The guard also keeps the per-round, per-merchant record (loss, ε, bytes, update norm, holdout
metrics) that checkpoints and the report read. The helpers below serve the SecAgg+ path too
(server/secagg.py), which sees only the mean, and client-level DP's clip check (server/client_dp.py).
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import math
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import SType
from flwr.serverapp import Grid

from shared.adapter import FEDERATION_ROUND, AdapterMismatch, check_update
from shared.config import Config

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Scalar:
    """What one reported number may be: its type and its range (`high` excluded where `open_high`)."""

    kind: type
    low: float
    high: float
    open_high: bool = False

    def admits(self, value: int | float) -> bool:
        return self.low <= value and (value < self.high if self.open_high else value <= self.high)


# Far beyond any honest value, yet small enough that sums and means of them stay exact and finite.
MAX_COUNT = 10**12
MAX_SCORE = 1e6  # losses and scores are scale-free (pinball loss, MASE, WQL): an honest one is near 1
MAX_EPSILON = 1e3  # ε beyond it protects nothing; a ledger refuses to spend past its target long before

COUNT = Scalar(int, 0, MAX_COUNT)
SCORE = Scalar(float, 0.0, MAX_SCORE)
# What a merchant may say, and of which type and range; anything else rejects the reply.
TRAIN_METRICS: dict[str, Scalar] = {
    "train-loss": SCORE, "num-examples": COUNT, "steps": COUNT, "bytes-sent": COUNT, "partition-id": COUNT,
    "epsilon": Scalar(float, 0.0, MAX_EPSILON), "delta": Scalar(float, 0.0, 1.0, open_high=True),
}
EVALUATE_METRICS: dict[str, Scalar] = {
    "mase": SCORE, "wql": SCORE, "coverage-80": Scalar(float, 0.0, 1.0), "num-examples": COUNT, "partition-id": COUNT,
}
REQUIRED_METRICS = ("num-examples",)
WEIGHT = "num-examples"  # the key Flower's mean is weighted by; the guard writes the server's weight into it


class ReplyRejected(ValueError):
    """A reply that must not be averaged in: the reason is recorded and the round goes on."""


def update_norm(update: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> float:
    """L2 distance of an adapter from the round's global one, over all its tensors (in float64)."""
    return float(np.sqrt(sum(np.sum((np.asarray(update[k], dtype=np.float64) - reference[k]) ** 2) for k in update)))


def update_rejection(update: Mapping[str, np.ndarray], expected: dict[str, tuple[int, ...]], reference: Mapping[str, np.ndarray],
                     bound: float) -> str | None:
    """Why an adapter (one merchant's, or a secure mean) must not be adopted, or None if it may."""
    try:
        check_update({k: torch.from_numpy(np.asarray(v)) for k, v in update.items()}, expected)
    except AdapterMismatch as exc:
        return str(exc)
    norm = update_norm(update, reference)
    return f"update norm {norm:.3g} exceeds the bound {bound}" if norm > bound else None


@contextlib.contextmanager
def rejecting_failures(what: str) -> Iterator[None]:
    """Whatever decoding a merchant's bytes raises in this block becomes a ReplyRejected naming `what`:
    however crafted, a reply must end in a rejection, never in an exception in the round loop."""
    try:
        yield
    except ReplyRejected:
        raise
    except Exception as exc:
        raise ReplyRejected(f"{what}: {type(exc).__name__}: {exc}") from exc


def decoded_tensor(array: Array, shape: tuple[int, ...]) -> np.ndarray:
    """The float32 tensor of shape `shape` that `array`'s bytes hold, read from its .npy header here
    rather than by `Array.numpy()`: that trusts the bytes (garbage or empty data raise, a string or
    float64 payload claiming float32 would be silently cast, a header claiming a huge shape is allocated
    before the data is read). Raises ReplyRejected, whatever is wrong with the bytes."""
    if array.stype != SType.NUMPY or array.dtype != "float32" or tuple(array.shape) != shape:
        raise ReplyRejected(f"claims {array.stype} {array.dtype} {tuple(array.shape)}, expected {SType.NUMPY} float32 {shape}")
    return npy_values(array.data, shape, "f", itemsize=4).astype(np.float32)


def npy_values(data: bytes, shape: tuple[int, ...], kinds: str, itemsize: int | None = None) -> np.ndarray:
    """The array .npy bytes hold, if its header says a dtype of one of `kinds` (numpy's dtype.kind
    letters; of `itemsize` bytes where given) and `shape`, and exactly that many bytes of data follow."""
    with rejecting_failures("undecodable payload"):
        stream = io.BytesIO(data)
        major, _ = np.lib.format.read_magic(stream)
        read_header = {1: np.lib.format.read_array_header_1_0, 2: np.lib.format.read_array_header_2_0}[major]
        stored_shape, fortran_order, dtype = read_header(stream)
        if dtype.kind not in kinds or itemsize not in (None, dtype.itemsize) or tuple(stored_shape) != shape:
            raise ReplyRejected(f"payload holds {dtype} {tuple(stored_shape)}, expected {shape} of kind {kinds!r}")
        payload = memoryview(data)[stream.tell():]
        if len(payload) != dtype.itemsize * math.prod(shape):
            raise ReplyRejected(f"payload holds {len(payload)} bytes of data, expected {dtype.itemsize * math.prod(shape)}")
        return np.frombuffer(payload, dtype=dtype).reshape(shape, order="F" if fortran_order else "C")


def check_record_names(content: RecordDict, arrays: Sequence[str]) -> None:
    """A reply holds the ArrayRecords `arrays`, one MetricRecord "metrics" and nothing else."""
    if list(content.array_records) != list(arrays) or list(content.metric_records) != ["metrics"] or content.config_records:
        raise ReplyRejected(f"expected ArrayRecords {list(arrays)} and one MetricRecord 'metrics', "
                            f"got arrays {sorted(content.array_records)}, "
                            f"metrics {sorted(content.metric_records)} and configs {sorted(content.config_records)}")


def checked_arrays(content: RecordDict, expected: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """The adapter of a train reply, if its ArrayRecord "arrays" holds exactly the expected tensors, each decodable."""
    arrays = content.array_records["arrays"]
    if set(arrays) != set(expected):
        raise ReplyRejected(f"adapter keys differ: missing {sorted(set(expected) - set(arrays))[:3]}, "
                            f"unexpected {sorted(set(arrays) - set(expected))[:3]}")
    decoded = {}
    for name in expected:
        try:
            decoded[name] = decoded_tensor(arrays[name], expected[name])
        except ReplyRejected as exc:
            raise ReplyRejected(f"{name}: {exc}") from exc
    return decoded


def checked_metrics(content: RecordDict, schema: dict[str, Scalar]) -> dict[str, int | float]:
    """The scalars of a reply's MetricRecord "metrics" (see `checked_scalars`)."""
    if "metrics" not in content.metric_records:
        raise ReplyRejected("no MetricRecord 'metrics'")
    return checked_scalars(content.metric_records["metrics"], schema)


def checked_scalars(raw: Mapping[str, Any], schema: dict[str, Scalar]) -> dict[str, int | float]:
    """`raw` if its keys are known, the required ones present, and every value a number of the
    schema's type within its range (counts whole), with those types restored."""
    unknown, missing = sorted(set(raw) - set(schema)), [k for k in REQUIRED_METRICS if k not in raw]
    if unknown or missing:
        raise ReplyRejected(f"metrics: unknown keys {unknown[:3]}, missing {missing}")
    return {key: checked_scalar(key, value, schema[key]) for key, value in raw.items()}


def checked_scalar(key: str, value: Any, scalar: Scalar) -> int | float:
    """`value` as `scalar.kind`, if it is a number in `scalar`'s range (compared exactly: a 301-digit
    integer overflows a float conversion, so range comes before any)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or (isinstance(value, float) and not math.isfinite(value)):
        raise ReplyRejected(f"metric {key} = {value!r:.40} is not a finite number")
    if not scalar.admits(value):
        upper = ")" if scalar.open_high else "]"
        raise ReplyRejected(f"metric {key} = {value!r:.40} is outside [{scalar.low}, {scalar.high}{upper}")
    if scalar.kind is int and value != int(value):
        raise ReplyRejected(f"metric {key} = {value!r} is not a whole number")
    return scalar.kind(value)


class MerchantLabels:
    """Partition ids as labels bound to nodes (see the module's docstring), for this server's life: node
    ids are new after a restart, and a record's key is all the report needs to name a merchant."""

    def __init__(self) -> None:
        self.owners: dict[int, int] = {}  # partition id -> the node it is bound to
        self.held: dict[int, int] = {}  # node -> the partition id bound to it

    def keys(self, claims: Mapping[int, int | None], conflicts: list[dict[str, Any]]) -> dict[int, str]:
        """Per node of `claims` (node -> the partition id it claims, or None), the key its record is filed
        under: the partition id ("3") where it is the node's, else its node id ("node-81723"), in separate
        namespaces so one can never be taken for the other. Conflicts are appended to `conflicts`."""
        claimants = Counter(label for label in claims.values() if label is not None)
        keys = {}
        for node, label in claims.items():
            if label is not None and label not in self.owners and node not in self.held and claimants[label] == 1:
                self.owners[label], self.held[node] = node, label
            if label is not None and self.owners.get(label) == node:
                keys[node] = str(label)
                continue
            keys[node] = f"node-{node}"
            if label is not None:
                conflicts.append({"node": node, "partition-id": label, "bound-to": self.owners.get(label)})
                log.warning("node %d claims partition id %d (bound to node %s, claimed by %d nodes this round; the node holds %s); "
                            "filed under its node id", node, label, self.owners.get(label), claimants[label], self.held.get(node))
        return keys


class Instructions:
    """The messages a round sent: each may be answered once, and only by the node it was sent to.

    Read when the replies come, not when the messages are made: the grid gives a message its id as it
    pushes it, after `configure_*` has returned it.
    """

    def __init__(self, messages: Sequence[Message]) -> None:
        self.messages, self.answered = list(messages), set()

    @functools.cached_property
    def sent(self) -> set[tuple[str, int]]:
        """(message id, addressee) of every message, taken at the first reply, once the ids exist."""
        return {(m.metadata.message_id, m.metadata.dst_node_id) for m in self.messages}

    def bind(self, reply: Message) -> None:
        """Raises ReplyRejected unless `reply` is the first answer to one of these messages, from its addressee."""
        pair = (reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
        sent = self.sent
        if pair not in sent:
            addressees = sorted(node for message_id, node in sent if message_id == pair[0])
            raise ReplyRejected(f"reply from node {pair[1]} to an instruction sent to node {addressees[0]}" if addressees
                                else f"reply to an instruction never sent this round ({pair[0]!r})")
        if pair in self.answered:
            raise ReplyRejected("a second reply to the same instruction")
        self.answered.add(pair)


def median_clip_bound(norms: Sequence[float], multiple: float) -> float:
    """`multiple` times the lower median of `norms`, the norm no accepted update may exceed; inf when off.
    The lower median is an honest merchant's norm as long as fewer than half the merchants are not."""
    return multiple * sorted(norms)[(len(norms) - 1) // 2] if multiple > 0 and norms else math.inf


def clipped(update: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], norm: float, bound: float) -> dict[str, np.ndarray]:
    """`update` moved towards `reference` along its own direction until its distance is at most `bound`."""
    if norm <= bound:
        return dict(update)
    scale = bound / norm
    return {k: (reference[k] + (np.asarray(v, dtype=np.float64) - reference[k]) * scale).astype(np.float32) for k, v in update.items()}


def weighted_means(rows: Sequence[Mapping[str, float]], weights: Sequence[float], keys: Iterable[str]) -> dict[str, float]:
    """Per key, the weighted mean over the rows that have it."""
    means = {}
    for key in keys:
        pairs = [(row[key], w) for row, w in zip(rows, weights, strict=True) if key in row]
        if pairs and (total := sum(w for _, w in pairs)) > 0:
            means[key] = sum(v * w for v, w in pairs) / total
    return means


def new_round(server_round: int) -> dict[str, Any]:
    return {"round": server_round, "merchants": {}, "rejected": [], "failures": [], "late": [], "conflicts": [], "accepted": 0}


def record_evaluations(record: dict[str, Any], labels: MerchantLabels, evaluations: Mapping[int, Mapping[str, Any]]) -> None:
    """Files each node's holdout metrics (node -> metrics) beside its training reply in the round record."""
    keys = labels.keys({node: metrics.get("partition-id") for node, metrics in evaluations.items()}, record.setdefault("conflicts", []))
    for node, metrics in evaluations.items():
        record["merchants"].setdefault(keys[node], {"node": node}).update({f"eval-{k}": v for k, v in metrics.items()})


def guard_options(cfg: Config, expected: dict[str, tuple[int, ...]], history: list[dict[str, Any]] | None) -> dict[str, Any]:
    """The keyword arguments `GuardedAggregation` takes, from the federation config.

    The aggregate's norm is checked against the bound too where the strategy returns a weighted
    mean of the accepted adapters (then it cannot exceed the largest accepted update unless
    something upstream went wrong); noised (client-level DP), server-optimiser (FedAdam) and
    coordinate-wise (FedMedian) aggregates are checked for finiteness only. Under client-level DP the
    median clip is off: the DP clip already bounds every merchant's update, and its adaptive variant
    must see the norms as they came.
    """
    fed = cfg.federation
    mean_like = fed.client_dp == "off" and fed.strategy in ("fedavg", "fedprox", "fedtrimmedavg")
    return {"expected": expected, "max_update_norm": fed.max_update_norm, "min_replies": fed.min_replies, "history": history,
            "equal_weights": fed.weighting == "equal", "bound_aggregate": mean_like,
            "median_norm_clip": fed.median_norm_clip if fed.client_dp == "off" else 0.0}


@dataclass
class TrainReply:
    """A train reply that passed every check, with its decoded adapter and the distance it moves the global one."""

    msg: Message
    update: dict[str, np.ndarray]
    metrics: dict[str, int | float]
    norm: float

    @property
    def node(self) -> int:
        return self.msg.metadata.src_node_id


class GuardedAggregation:
    """Mixin: validate and rebuild replies, then hand the accepted ones to the wrapped strategy.

    `history` is the list of round records so far (a resumed run's, from its checkpoint); rounds
    count on from its length.
    """

    def __init__(self, *args: Any, expected: dict[str, tuple[int, ...]], max_update_norm: float, min_replies: int,
                 history: list[dict[str, Any]] | None = None, equal_weights: bool = True, bound_aggregate: bool = False,
                 median_norm_clip: float = 0.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.expected, self.max_update_norm, self.min_replies = expected, max_update_norm, min_replies
        self.equal_weights, self.bound_aggregate, self.median_norm_clip = equal_weights, bound_aggregate, median_norm_clip
        self.history = history if history is not None else []
        self.round_offset = len(self.history)
        self.labels = MerchantLabels()
        self._train_sent = self._evaluate_sent = Instructions([])

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._global = {k: v.numpy() for k, v in arrays.items()}
        self._started = time.time()
        self._current = new_round(server_round + self.round_offset)
        config[FEDERATION_ROUND] = self._current["round"]  # Flower's server-round restarts at 1 when a run resumes
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._current["asked"] = [m.metadata.dst_node_id for m in messages]
        self._train_sent = Instructions(messages)
        return messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))
        self._evaluate_sent = Instructions(messages)
        return messages

    def _checked_train_reply(self, msg: Message) -> TrainReply:
        self._train_sent.bind(msg)
        check_record_names(msg.content, ["arrays"])
        update, metrics = checked_arrays(msg.content, self.expected), checked_metrics(msg.content, TRAIN_METRICS)
        if (reason := update_rejection(update, self.expected, self._global, self.max_update_norm)) is not None:
            raise ReplyRejected(reason)
        return TrainReply(msg, update, metrics, update_norm(update, self._global))

    def _reject(self, server_round: int, msg: Message, reason: str) -> None:
        """Records why a reply was left out, with the DP steps and ε it says it spent for nothing, where it says so validly."""
        node = msg.metadata.src_node_id
        log.warning("round %d: reply from node %d rejected: %s", server_round, node, reason)
        try:
            spent = {k: v for k, v in checked_metrics(msg.content, TRAIN_METRICS).items() if k in ("steps", "epsilon")}
        except ReplyRejected:
            spent = {}
        self._current["rejected"].append({"node": node, "reason": reason, **spent})

    def _record_late(self, server_round: int, replies: list[Message]) -> None:
        """Merchants asked this round whose reply did not arrive before the round's timeout: Flower drops
        them silently; they are named here, since each may have spent privacy budget on work not used."""
        received = {m.metadata.src_node_id for m in replies}
        late = [node for node in self._current.get("asked", []) if node not in received]
        self._current["late"] = late
        if late:
            log.warning("round %d: %d of %d merchants asked sent no reply in time: %s", server_round, len(late),
                        len(self._current["asked"]), late[:10])

    def _valid_train_replies(self, server_round: int, replies: list[Message]) -> list[TrainReply]:
        """The replies that pass every check; failures and rejections are recorded."""
        valid = []
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                log.warning("round %d: node %d failed or declined: %s", server_round, node, msg.error.reason)
                self._current["failures"].append({"node": node, "code": msg.error.code, "reason": msg.error.reason})
                continue
            try:
                valid.append(self._checked_train_reply(msg))
            except ReplyRejected as exc:
                self._reject(server_round, msg, str(exc))
        return valid

    def _clipped_to_median(self, server_round: int, valid: list[TrainReply], keys: dict[int, str]) -> None:
        """Clips each valid update to `median_norm_clip` times the round's median norm, noting which were."""
        if self.median_norm_clip <= 0:
            return
        bound = median_clip_bound([reply.norm for reply in valid], self.median_norm_clip)
        over = sorted(keys[reply.node] for reply in valid if reply.norm > bound)
        for reply in valid:
            reply.update = clipped(reply.update, self._global, reply.norm, bound)
        self._current["norm_clip"] = {"bound": bound, "clipped": over}
        if over:
            log.info("round %d: updates of %s clipped to %.3g (%g x the median norm)", server_round, over, bound, self.median_norm_clip)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        self._record_late(server_round, replies)
        valid = self._valid_train_replies(server_round, replies)
        keys = self.labels.keys({reply.node: reply.metrics.get("partition-id") for reply in valid}, self._current["conflicts"])
        self._clipped_to_median(server_round, valid, keys)
        accepted: dict[str, tuple[Message, dict[str, int | float], float]] = {}
        for reply in valid:
            weight = 1.0 if self.equal_weights else float(reply.metrics["num-examples"])
            reply.msg.content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in reply.update.items()}),
                                            "metrics": MetricRecord({WEIGHT: weight})})
            self._current["merchants"][keys[reply.node]] = {"node": reply.node, **reply.metrics, "update-norm": reply.norm}
            accepted[keys[reply.node]] = (reply.msg, reply.metrics, weight)
        # summed in the merchants' order, not in the order they answered: the same replies give the same mean, bit for bit
        ordered = [accepted[key] for key in sorted(accepted)]
        messages, rows, weights = [m for m, _, _ in ordered], [r for _, r, _ in ordered], [w for _, _, w in ordered]
        self._current["accepted"] = len(messages)
        self._current["wall_s"] = time.time() - self._started
        self.history.append(self._current)
        if len(messages) < self.min_replies or sum(weights) <= 0:
            log.warning("round %d: %d valid replies < min_replies %d; global adapter unchanged",
                        server_round, len(messages), self.min_replies)
            return None, None
        # the run's round, not this start's: FedAdam corrects its moments' bias by it
        arrays, aggregated = super().aggregate_train(server_round + self.round_offset, messages)
        if arrays is not None and (reason := self._aggregate_rejection(arrays)) is not None:
            log.warning("round %d: aggregate rejected, global adapter unchanged: %s", server_round, reason)
            self._current["rejected"].append({"node": None, "reason": f"aggregate: {reason}"})
            return None, None
        self._current["aggregated"] = weighted_means(rows, weights, ("train-loss", "steps", "bytes-sent", "epsilon", "delta"))
        return arrays, aggregated

    def _aggregate_rejection(self, arrays: ArrayRecord) -> str | None:
        aggregate = {k: np.asarray(v.numpy()) for k, v in arrays.items()}
        bound = self.max_update_norm if self.bound_aggregate else math.inf
        return update_rejection(aggregate, self.expected, self._global, bound)

    def _checked_evaluate_reply(self, msg: Message) -> dict[str, int | float]:
        self._evaluate_sent.bind(msg)
        check_record_names(msg.content, [])
        return checked_metrics(msg.content, EVALUATE_METRICS)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Holdout metrics per merchant into the round record, and their means weighted by the series each evaluated."""
        record, evaluations = self.history[-1], {}
        for msg in replies:
            if msg.has_error():
                continue
            try:
                evaluations[msg.metadata.src_node_id] = self._checked_evaluate_reply(msg)
            except ReplyRejected as exc:
                log.warning("round %d: evaluation from node %d rejected: %s", server_round, msg.metadata.src_node_id, exc)
                record["rejected"].append({"node": msg.metadata.src_node_id, "reason": f"evaluation: {exc}"})
        if not evaluations:
            return None
        record_evaluations(record, self.labels, evaluations)
        rows = [evaluations[node] for node in sorted(evaluations)]
        means = weighted_means(rows, [row["num-examples"] for row in rows], ("mase", "wql", "coverage-80"))
        record.setdefault("aggregated", {}).update({f"eval-{k}": v for k, v in means.items()})
        return MetricRecord(means)
