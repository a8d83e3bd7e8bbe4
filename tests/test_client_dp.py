"""Client-level DP (Flower's DP strategy wrappers) and SecAgg+ (Flower's legacy workflow) as options.

Fast tests drive the strategies directly with hand-made replies: the guard still sees every raw
update before clipping, the mean is unweighted, the noise is calibrated to the merchants actually
averaged, adaptive clipping moves the right way, ε is Opacus' RDP analysis, the legacy bridge
round-trips, and unsafe combinations are refused.

Three real simulations (configs/tiny.toml, marked slow; each ~1 min, mostly Ray start-up):
  server_fixed: 2 merchants, 2 rounds; the server's noise is recovered exactly from recorded replies
  client_fixed: 2 merchants, 2 rounds; what leaves a merchant is clipped, the server adds the noise
  secagg:       3 merchants, 2 rounds, client_fixed with negligible noise, merchant 2 drops out in
                round 2; the server gets only masked vectors and the global adapter is the mean of
                the surviving merchants' clipped adapters
"""

from __future__ import annotations

import math
import pickle
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fed_helpers import TINY_CONFIG, FakeGrid, enter_task, float32_arrays
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.common import Code, EvaluateIns, FitIns, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from opacus.accountants import RDPAccountant
from safetensors.numpy import load_file

from client.app import make_app
from client.mods import client_mods, client_privacy_mod, legacy_bridge_mod
from server.client_dp import DP_WEIGHT, ClientLevelDP, client_epsilon
from server.strategy import make_strategy
from shared.adapter import ADAPTER_KEYS, adapter_state
from shared.config import ConfigError, load_config
from shared.pipeline import ForecastPipeline
from shared.privacy import dp_learning_rate
from simulations.federated import federate

pytestmark = pytest.mark.filterwarnings("ignore:Optimal order:UserWarning")

SHAPES = {"w": (300, 200), "b": (50,)}  # 60,050 coordinates: enough to measure a noise std to ~1%


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    enter_task(monkeypatch)


def _cfg(**federation: Any):
    return load_config(overrides={"federation.num_merchants": 3, "federation.min_replies": 2,
                                  **{f"federation.{k}": v for k, v in federation.items()}})


def _norm(update: dict[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(np.sum(np.asarray(v, dtype=np.float64) ** 2) for v in update.values())))


def _clip(update: dict[str, np.ndarray], clip: float) -> dict[str, np.ndarray]:
    factor = min(1.0, clip / _norm(update))
    return {k: v * factor for k, v in update.items()}


def _round(strategy, global_: dict[str, np.ndarray], updates: list[Any], examples: list[int] | None = None):
    """One train round: configure on a fake grid, reply with global + update (or an Error), aggregate."""
    messages = list(strategy.configure_train(1, float32_arrays(global_), ConfigRecord({}), FakeGrid(len(updates))))
    replies = []
    for i, (msg, update) in enumerate(zip(messages, updates)):
        if isinstance(update, Error):
            replies.append(Message(update, reply_to=msg))
            continue
        metrics = MetricRecord({"train-loss": 1.0, "num-examples": (examples or [100] * len(updates))[i], "partition-id": i})
        local = {k: global_[k] + update[k] for k in global_}
        replies.append(Message(RecordDict({"arrays": float32_arrays(local), "metrics": metrics}), reply_to=msg))
    arrays, _ = strategy.aggregate_train(1, replies)
    return None if arrays is None else {k: np.asarray(v.numpy(), dtype=np.float64) for k, v in arrays.items()}


def _random(rng: np.random.Generator, norm: float) -> dict[str, np.ndarray]:
    update = {k: rng.normal(size=s) for k, s in SHAPES.items()}
    return {k: v * norm / _norm(update) for k, v in update.items()}


@pytest.fixture
def global_() -> dict[str, np.ndarray]:
    return {k: np.zeros(s, dtype=np.float32) for k, s in SHAPES.items()}


# --- the strategy: order, weighting, calibration, accounting -----------------------------------------------


def test_guard_sees_raw_replies_before_the_dp_wrapper_clips(global_) -> None:
    np.random.seed(0)
    strategy = make_strategy(_cfg(client_dp="server_fixed", client_dp_noise=1e-9, client_dp_clip=1.0, max_update_norm=50.0), SHAPES)
    wrappers = [c.__name__ for c in type(strategy).__mro__[1:4]]
    assert wrappers == ["GuardedAggregation", "ClientLevelDP", "DifferentialPrivacyServerSideFixedClipping"]
    assert strategy.strategy.weighted_by_key == DP_WEIGHT  # the wrapped FedAvg averages with weight 1 each
    rng = np.random.default_rng(0)
    good = [_random(rng, 3.0), _random(rng, 0.5)]
    outsized = _random(rng, 80.0)  # clipping would shrink it to 1.0 and hide it; the guard must see 80
    nan = {k: np.full(s, np.nan) for k, s in SHAPES.items()}
    mean = _round(strategy, global_, [*good, outsized, nan, Error(code=901, reason="budget spent")])
    record = strategy.history[-1]
    assert record["accepted"] == 2 and len(record["rejected"]) == 2 and record["failures"][0]["code"] == 901
    assert any("exceeds the bound" in r["reason"] for r in record["rejected"])
    assert any("non-finite" in r["reason"] for r in record["rejected"])
    expected = {k: (_clip(good[0], 1.0)[k] + _clip(good[1], 1.0)[k]) / 2 for k in SHAPES}  # equal weights
    for k in SHAPES:
        np.testing.assert_allclose(mean[k], expected[k], atol=1e-6)


def test_mean_is_unweighted_and_noise_is_calibrated_to_the_merchants_averaged(global_) -> None:
    np.random.seed(1)
    z, clip = 1.0, 2.0
    strategy = make_strategy(_cfg(client_dp="server_fixed", client_dp_noise=z, client_dp_clip=clip), SHAPES)
    rng = np.random.default_rng(1)
    updates = [_random(rng, 5.0), _random(rng, 0.5), Error(code=901, reason="budget spent")]
    result = _round(strategy, global_, updates, examples=[10_000, 10, 1])
    release = strategy.history[-1]["client_dp"]
    clipped = [_clip(u, clip) for u in updates[:2]]
    # the global is 0, so the released step is result / step: the noised mean before the step's scaling
    noise = np.concatenate([(result[k] / release["step"] - (clipped[0][k] + clipped[1][k]) / 2).ravel() for k in SHAPES])
    expected_std = z * clip / 2  # two merchants averaged, not the three configured
    assert abs(noise.std() / expected_std - 1) < 0.02
    assert abs(noise.mean()) < 5 * expected_std / math.sqrt(noise.size)
    assert release["cohort"] == 2 and release["noise_std"] == pytest.approx(expected_std)
    assert release["epsilon"] == client_epsilon([z], release["delta"])


def test_a_mostly_noise_release_keeps_only_its_signal_to_noise_share_of_the_step(global_) -> None:
    """The noised mean's step is scaled by s²/(1 + s²), s = n·√R / (z·√d): two merchants, 3 rounds and
    60,050 numbers under z = 1 keep 0.02% of it (the global barely moves); a nearly noiseless one all of it."""
    rounds, dims = load_config().federation.num_rounds, sum(math.prod(shape) for shape in SHAPES.values())
    rng = np.random.default_rng(4)
    for z, kept in ((1.0, dp_learning_rate(1.0, 2 * math.sqrt(rounds) / math.sqrt(dims))), (1e-9, 1.0)):
        np.random.seed(4)
        strategy = make_strategy(_cfg(client_dp="server_fixed", client_dp_noise=z, client_dp_clip=1.0), SHAPES)
        updates = [_random(rng, 0.5), _random(rng, 0.5)]
        result = _round(strategy, global_, updates)
        assert strategy.history[-1]["client_dp"]["step"] == pytest.approx(kept)
        released_norm = _norm({k: (updates[0][k] + updates[1][k]) / 2 for k in SHAPES}) if z < 1e-6 else z * 1.0 / 2 * math.sqrt(dims)
        assert _norm(result) == pytest.approx(kept * released_norm, rel=0.02)


def test_client_fixed_rejects_an_update_that_was_not_clipped(global_) -> None:
    np.random.seed(2)
    strategy = make_strategy(_cfg(client_dp="client_fixed", client_dp_noise=1e-9, client_dp_clip=1.0), SHAPES)
    rng = np.random.default_rng(2)
    clipped = [_random(rng, 1.0), _random(rng, 0.3)]
    mean = _round(strategy, global_, [*clipped, _random(rng, 4.0)])
    record = strategy.history[-1]
    assert record["accepted"] == 2 and "client clip" in record["rejected"][0]["reason"]
    for k in SHAPES:
        np.testing.assert_allclose(mean[k], (clipped[0][k] + clipped[1][k]) / 2, atol=1e-6)
    # and the clipping norm travels to the merchants' fixedclipping_mod in the train config
    messages = strategy.configure_train(2, float32_arrays(global_), ConfigRecord({}), FakeGrid(2))
    assert all(m.content["config"]["clipping_norm"] == 1.0 for m in messages)


def test_adaptive_clip_grows_when_updates_are_clipped_and_noise_uses_the_clip_applied(global_) -> None:
    np.random.seed(3)
    # a (nearly) noiseless count, which Flower only allows with an even smaller noise multiplier (z < 2 σ_b)
    cfg = _cfg(client_dp="server_adaptive", client_dp_noise=1e-9, client_dp_clip=0.1, client_dp_count_stddev=1e-6)
    strategy = make_strategy(cfg, SHAPES)
    rng = np.random.default_rng(3)
    clips = [strategy.clipping_norm]
    for _ in range(3):  # every update is far longer than the bound: Andrew et al.'s rule raises it
        _round(strategy, global_, [_random(rng, 10.0), _random(rng, 10.0), _random(rng, 10.0)])
        clips.append(strategy.clipping_norm)
        release = strategy.history[-1]["client_dp"]
        assert release["clip"] == clips[-2]  # the noise of a round is calibrated to the bound that clipped it
        assert release["noise_std"] == pytest.approx(release["noise_multiplier"] * clips[-2] / 3)
    assert clips == sorted(clips) and clips[-1] == pytest.approx(0.1 * math.exp(0.2 * 0.5) ** 3, rel=1e-3)


def test_adaptive_release_accounts_for_the_clipped_count_too() -> None:
    strategy = make_strategy(_cfg(client_dp="server_adaptive", client_dp_noise=1.0, client_dp_count_stddev=2.0), SHAPES)
    z_update = strategy.noise_multiplier  # Flower raises it so that z_update^-2 + (2 σ_b)^-2 = z^-2
    assert z_update == pytest.approx((1.0 - 0.25**2) ** -0.5)
    released = strategy._release_noise_multiplier(z_update)
    assert released == pytest.approx((z_update**-2 + 2.0**-2) ** -0.5)  # uncentred count: sensitivity 1
    assert released < 1.0


@pytest.mark.parametrize("rounds, z", [(1, 1.0), (3, 1.0), (10, 2.5)])
def test_client_epsilon_is_opacus_rdp_of_the_unsampled_gaussian(rounds: int, z: float) -> None:
    accountant = RDPAccountant()
    for _ in range(rounds):
        accountant.step(noise_multiplier=z, sample_rate=1.0)
    assert client_epsilon([z] * rounds, 1e-5) == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-12)
    assert client_epsilon([], 1e-5) == 0.0


@pytest.mark.parametrize(
    "federation, message",
    [
        ({"client_dp": "server_fixed", "strategy": "fedmedian"}, "needs strategy fedavg or fedprox"),
        ({"client_dp": "server_fixed", "strategy": "fedadam"}, "needs strategy fedavg or fedprox"),
        ({"secagg": True, "client_dp": "server_fixed"}, "cannot clip"),
        ({"secagg": True, "strategy": "fedtrimmedavg"}, "only the mean"),
        ({"client_dp": "server_fixed", "client_dp_noise": 0.0}, "client_dp_noise > 0"),
    ],
)
def test_unsafe_combinations_are_refused(federation: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make_strategy(_cfg(**federation), SHAPES)


def test_unknown_client_dp_mode_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="client_dp"):
        _cfg(client_dp="local")


def test_off_keeps_the_plain_guarded_strategy() -> None:
    strategy = make_strategy(_cfg(), SHAPES)
    assert type(strategy).__name__ == "GuardedFedAvg" and not isinstance(strategy, ClientLevelDP)
    assert strategy.weighted_by_key == "num-examples"


# --- the merchants' side: mods chosen by config, and the legacy bridge -------------------------------------


def test_client_mods_follow_the_config() -> None:
    assert client_mods(_cfg()) == []
    assert client_mods(_cfg(client_dp="server_fixed")) == []
    assert len(client_mods(_cfg(client_dp="client_fixed"))) == 1
    names = [m.__name__ for m in client_mods(_cfg(secagg=True, client_dp="client_fixed"))]
    assert names == ["secaggplus_mod", "fixedclipping_mod", "legacy_bridge_mod"]


def _context() -> Context:
    return Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})


def test_legacy_bridge_serves_fitins_with_the_unchanged_train_function() -> None:
    keys = ["b.weight", "a.lora_A"]
    values = [np.arange(6, dtype=np.float32).reshape(2, 3), np.ones(4, dtype=np.float32)]
    fitins = FitIns(ndarrays_to_parameters(values), {"server-round": 2, "local-steps": 3, ADAPTER_KEYS: "\n".join(keys)})
    msg = Message(compat.fitins_to_recorddict(fitins, True), dst_node_id=1, message_type=MessageType.TRAIN)
    original = msg.content
    seen: dict[str, Any] = {}

    def train(m: Message, _ctx: Context) -> Message:
        seen["keys"] = list(m.content["arrays"].keys())
        seen["config"] = dict(m.content["config"])
        trained = {k: np.asarray(v.numpy()) + 1 for k, v in reversed(list(m.content["arrays"].items()))}  # any key order
        metrics = MetricRecord({"train-loss": 0.5, "num-examples": 77})
        return Message(RecordDict({"arrays": float32_arrays(trained), "metrics": metrics}), reply_to=m)

    reply = legacy_bridge_mod(msg, _context(), train)
    assert seen == {"keys": keys, "config": {"server-round": 2, "local-steps": 3}}
    assert msg.content is original
    fitres = compat.recorddict_to_fitres(reply.content, keep_input=True)
    assert fitres.status.code == Code.OK and fitres.num_examples == 1  # equal weights in the secure sum
    for got, sent in zip(parameters_to_ndarrays(fitres.parameters), values):
        np.testing.assert_array_equal(got, sent + 1)  # back in the server's key order
    assert fitres.metrics["train-loss"] == 0.5


def test_legacy_bridge_serves_evaluateins_and_raises_declines() -> None:
    keys = ["w"]
    ins = EvaluateIns(ndarrays_to_parameters([np.zeros(3, dtype=np.float32)]), {ADAPTER_KEYS: "w"})
    msg = Message(compat.evaluateins_to_recorddict(ins, True), dst_node_id=1, message_type=MessageType.EVALUATE)

    def evaluate(m: Message, _ctx: Context) -> Message:
        assert list(m.content["arrays"].keys()) == keys
        return Message(RecordDict({"metrics": MetricRecord({"wql": 0.25, "mase": 1.5, "num-examples": 9})}), reply_to=m)

    res = compat.recorddict_to_evaluateres(legacy_bridge_mod(msg, _context(), evaluate).content)
    assert (res.loss, res.num_examples, res.metrics["mase"]) == (0.25, 9, 1.5)

    fit_ins = FitIns(ndarrays_to_parameters([np.zeros(3, np.float32)]), {ADAPTER_KEYS: "w"})
    fit = Message(compat.fitins_to_recorddict(fit_ins, True), dst_node_id=1, message_type=MessageType.TRAIN)
    with pytest.raises(RuntimeError, match="code 901"):
        legacy_bridge_mod(fit, _context(), lambda m, _c: Message(Error(code=901, reason="privacy budget spent"), reply_to=m))


# --- real simulations ----------------------------------------------------------------------------------------


class Tap:
    """Mod: pickles each train message's incoming records and its reply (whatever format they are in)."""

    def __init__(self, directory: Path) -> None:
        self.directory = str(directory)

    def __call__(self, msg: Message, context: Context, call_next) -> Message:
        incoming = {name: _plain(record) for name, record in msg.content.items()}
        reply = call_next(msg, context)
        if msg.metadata.message_type == MessageType.TRAIN:
            entry = {
                "partition": int(context.node_config.get("partition-id", -1)),
                "incoming": incoming,
                "reply": None if reply.has_error() else {name: _plain(record) for name, record in reply.content.items()},
                "reply_array_records": [] if reply.has_error() else list(reply.content.array_records),
            }
            Path(self.directory, f"{uuid.uuid4().hex}.pkl").write_bytes(pickle.dumps(entry))
        return reply


def _plain(record) -> Any:
    if isinstance(record, ArrayRecord):
        return {k: np.array(v.numpy(), copy=True) for k, v in record.items()}
    return dict(record)


def _taps(directory: Path) -> list[dict[str, Any]]:
    return [pickle.loads(p.read_bytes()) for p in sorted(directory.glob("*.pkl"))]


def _simulate(base: Path, n: int, federation: dict[str, Any], mods_for) -> tuple[Any, dict[str, Any], dict[str, Path]]:
    taps = {"outer": base / "outer", "inner": base / "inner"}
    for path in taps.values():
        path.mkdir(parents=True)
    overrides = {
        "federation.out_dir": str(base / "out"), "privacy.ledger_dir": str(base / "ledgers"), "data.synthetic.n_merchants": n,
        "federation.num_merchants": n, "federation.num_rounds": 2, **{f"federation.{k}": v for k, v in federation.items()},
        "privacy.lr": 2e-3,  # DP-SGD steps as large as plain ones, so the updates outgrow the clip under test
    }
    cfg = load_config(TINY_CONFIG, overrides)
    app = make_app([Tap(taps["outer"]), *mods_for(cfg), Tap(taps["inner"])])
    return cfg, federate(cfg, n, client_app=app).summary, taps


def _by_round(entries: list[dict[str, Any]]) -> dict[int, dict[int, dict[str, Any]]]:
    """round -> partition -> tap entry, for entries in the ClientApp's own format."""
    out: dict[int, dict[int, dict[str, Any]]] = {}
    for e in entries:
        if "config" in e["incoming"]:
            out.setdefault(int(e["incoming"]["config"]["server-round"]), {})[e["partition"]] = e
    return out


def _final(cfg) -> dict[str, np.ndarray]:
    return load_file(str(Path(cfg.federation.out_dir) / "final_adapter" / "adapter.safetensors"))


def _update(entry: dict[str, Any]) -> dict[str, np.ndarray]:
    return {k: entry["reply"]["arrays"][k].astype(np.float64) - entry["incoming"]["arrays"][k] for k in entry["incoming"]["arrays"]}


def _check_server_noise(cfg, summary, rounds, clip_on_server: bool) -> None:
    """Recovers each round's noise exactly: next global - (global + mean of clipped updates)."""
    z, clip, n = cfg.federation.client_dp_noise, cfg.federation.client_dp_clip, cfg.federation.num_merchants
    final = _final(cfg)
    for r in (1, 2):
        entries = rounds[r]
        assert sorted(entries) == list(range(n))
        start = entries[0]["incoming"]["arrays"]
        after = rounds[r + 1][0]["incoming"]["arrays"] if r + 1 in rounds else final
        updates = [_clip(_update(e), clip) if clip_on_server else _update(e) for e in entries.values()]
        step = summary["history"][r - 1]["client_dp"]["step"]  # the share of the noised mean's step the server kept
        noise = np.concatenate([((after[k] - start[k]) / step - sum(u[k] for u in updates) / n).ravel() for k in start])
        assert abs(noise.std() / (z * clip / n) - 1) < 0.03, f"round {r}: noise std {noise.std()} vs {z * clip / n}"
    releases = [h["client_dp"] for h in summary["history"]]
    assert [rel["epsilon"] for rel in releases] == [client_epsilon([z] * k, cfg.federation.client_dp_delta) for k in (1, 2)]
    assert summary["client_level"]["epsilon"] == releases[-1]["epsilon"] and summary["client_level"]["noised_rounds"] == 2


@pytest.mark.slow
def test_server_side_dp_federation_completes_with_calibrated_noise(tmp_path: Path) -> None:
    cfg, summary, taps = _simulate(tmp_path, 2, {"client_dp": "server_fixed", "client_dp_clip": 0.5}, lambda _cfg: [client_privacy_mod])
    assert summary["rounds"] == 2 and all(h["accepted"] == 2 and not h["rejected"] for h in summary["history"])
    initial = {k: v.numpy() for k, v in adapter_state(ForecastPipeline.from_config(cfg).model).items()}
    assert any(not np.array_equal(initial[k], v) for k, v in _final(cfg).items())
    rounds = _by_round(_taps(taps["inner"]))
    assert max(_norm(_update(e)) for e in rounds[1].values()) > 0.5  # so the server's clipping acts
    _check_server_noise(cfg, summary, rounds, clip_on_server=True)


@pytest.mark.slow
def test_client_side_clipping_federation_sends_only_clipped_updates(tmp_path: Path) -> None:
    # through the config-driven mod a deployed ClientApp would use: make_app([client_privacy_mod])
    cfg, summary, taps = _simulate(tmp_path, 2, {"client_dp": "client_fixed", "client_dp_clip": 0.5}, lambda _cfg: [client_privacy_mod])
    assert summary["rounds"] == 2 and all(h["accepted"] == 2 and not h["rejected"] for h in summary["history"])
    raw, sent = _by_round(_taps(taps["inner"])), _by_round(_taps(taps["outer"]))
    assert max(_norm(_update(e)) for e in raw[1].values()) > 0.5  # the mod had something to clip
    for r in (1, 2):
        for p, entry in sent[r].items():
            assert _norm(_update(entry)) <= 0.5 * (1 + 1e-5)
            expected = _clip(_update(raw[r][p]), 0.5)
            for k, v in _update(entry).items():
                np.testing.assert_allclose(v, expected[k], atol=1e-6)
    assert all("eval-wql" in m for m in summary["history"][-1]["merchants"].values())  # evaluate untouched by the mod
    _check_server_noise(cfg, summary, sent, clip_on_server=False)


class DropOut:
    """Mod (inside the legacy bridge): merchant `partition` fails its round-`server_round` training."""

    def __init__(self, partition: int, server_round: int) -> None:
        self.partition, self.server_round = partition, server_round

    def __call__(self, msg: Message, context: Context, call_next) -> Message:
        config = msg.content["config"] if "config" in msg.content else {}
        if int(context.node_config.get("partition-id", -1)) == self.partition and config.get("server-round") == self.server_round:
            raise RuntimeError("injected dropout")
        return call_next(msg, context)


@pytest.mark.slow
def test_secagg_federation_server_sees_only_masked_vectors_and_the_mean(tmp_path: Path) -> None:
    clip = 0.5
    federation = {"secagg": True, "client_dp": "client_fixed", "client_dp_clip": clip, "client_dp_noise": 1e-7}
    cfg, summary, taps = _simulate(tmp_path, 3, federation, lambda c: [*client_mods(c), DropOut(partition=2, server_round=2)])
    history = summary["history"]
    assert summary["rounds"] == 2 and [h["accepted"] for h in history] == [3, 2]
    assert all(h.get("secagg") and not h["halted"] for h in history) and "injected dropout" in history[1]["failures"][0]["reason"]

    # what left each merchant in a train reply: never an adapter value, only SecAgg+ stage records
    sent = [e for e in _taps(taps["outer"]) if e["reply"] is not None]
    assert sent and all(e["reply"][name] == {} for e in sent for name in e["reply_array_records"])
    masked = [e for e in sent if "masked_params" in e["reply"].get("secaggplus_configs", {})]
    assert len(masked) == 3 + 2  # one masked vector per merchant per round; the dropped one sent none

    # the global adapter after each round = mean of the surviving merchants' clipped adapters (+ ~0 noise)
    rounds, final = _by_round(_taps(taps["inner"])), _final(cfg)
    for r, survivors in ((1, [0, 1, 2]), (2, [0, 1])):
        start = rounds[r][0]["incoming"]["arrays"]
        after = rounds[r + 1][0]["incoming"]["arrays"] if r + 1 in rounds else final
        updates = [_clip(_update(rounds[r][p]), clip) for p in survivors]
        for k in start:
            expected = start[k] + sum(u[k] for u in updates) / len(survivors)
            np.testing.assert_allclose(after[k], expected, atol=2e-5)  # SecAgg+ quantises to 16 / 2^22
    assert 2 not in rounds[2]  # merchant 2's round-2 training failed before producing an adapter
