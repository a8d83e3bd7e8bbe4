"""How far one in-bound merchant can move the global adapter: the guard without and with the median clip.

    .venv/bin/python -m benchmarks.attack [--merchants 3,10,100] [--rounds 10] [--honest-norm 0.003] [--seed 0]

Synthetic, and cheap (seconds): the real guarded strategy (`server.strategy.make_strategy`, the
default FedAvg) is driven directly, round after round, with replies made here, not by training. Each
honest merchant i sends, in round r, the global adapter plus an update of norm
honest_norm · s_i along 0.6 · c + 0.8 · e_ir (c one direction all honest merchants share, e_ir its own
random one, s_i a per-merchant scale drawn log-normally with σ 0.5: merchants differ in data, so in
update size). The adapter has the tiny config's shared size. One merchant is replaced by an attacker:

  sign-flip   its update alternates between +u and -u (u a fixed unit vector), every round;
  steady      its update is +u every round;

each with norm just under the old absolute ceiling (0.999 · max_update_norm) and, separately, just
under the new clip (0.999 · median_norm_clip · the round's lower median of the honest norms, an
attacker told the honest norms). Reported: the distance of the global adapter from the honest run's
(the same merchants, all honest) after the last of --rounds rounds and the largest after any round
(a sign-flip undoes itself every other round, so its harm shows in the largest), with the guard as it
was (median_norm_clip = 0) and as it is now (the default), beside how far the honest run itself
moved and how often honest updates were clipped. Writes benchmarks/results/attack.md and .json.

With --end-to-end R, also one row from real federations: 3 merchants on configs/tiny.toml through
Flower's simulation for R rounds without DP-SGD (so that runs repeat exactly), merchant 2 replaced by a
client mod sending the global adapter it received plus a steady push just under the old ceiling;
the final adapters of the attacked runs against the honest ones, old guard and new (minutes).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from safetensors.numpy import load_file

from benchmarks.scaffold import Run, arguments, command
from client.app import make_app
from client.mods import client_privacy_mod
from server.strategy import make_strategy
from shared.adapter import shared_size
from shared.config import PROJECT_ROOT, Config, load_config, parse_overrides
from shared.pipeline import ForecastPipeline
from simulations.federated import federate

TINY = PROJECT_ROOT / "configs" / "tiny.toml"
KEY = "adapter"  # the adapter as one flat tensor: the guard and FedAvg see only its norm and its mean
ATTACKS = ("sign-flip", "steady")


class NodeList:
    """The node list a strategy samples from: all of 1..n (FedAvg's sampling asks only for this)."""

    def __init__(self, n: int) -> None:
        self.nodes = list(range(1, n + 1))

    def get_node_ids(self) -> list[int]:
        return self.nodes


@dataclass(frozen=True)
class Cohort:
    """The honest merchants' updates, drawn once per (cohort size, seed) and shared by every run."""

    updates: np.ndarray  # rounds x merchants x d
    attack_direction: np.ndarray  # d, unit

    @classmethod
    def draw(cls, merchants: int, rounds: int, dims: int, honest_norm: float, seed: int) -> Cohort:
        rng = np.random.default_rng([seed, merchants])
        shared = _unit(rng.normal(size=dims))
        own = rng.normal(size=(rounds, merchants, dims))
        own /= np.linalg.norm(own, axis=-1, keepdims=True)
        directions = 0.6 * shared + 0.8 * own
        directions /= np.linalg.norm(directions, axis=-1, keepdims=True)
        scales = honest_norm * rng.lognormal(0.0, 0.5, size=merchants)
        return cls(directions * scales[None, :, None], _unit(rng.normal(size=dims)))


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def attack_update(attack: str, norm: float, server_round: int, direction: np.ndarray) -> np.ndarray:
    sign = -1.0 if attack == "sign-flip" and server_round % 2 else 1.0
    return sign * norm * direction


def attack_norm(target: str, cfg: Config, honest_norms: np.ndarray) -> float:
    """Just under the old ceiling, or just under the clip the round's honest norms set (the attacker's
    own, larger norm does not move the lower median below the honest one it lands on)."""
    fed = cfg.federation
    if target == "old ceiling":
        return 0.999 * fed.max_update_norm
    merchants = len(honest_norms) + 1
    return 0.999 * fed.median_norm_clip * float(np.sort(honest_norms)[(merchants - 1) // 2])


def guarded_rounds(cfg: Config, cohort: Cohort, attacker: Callable[[int, np.ndarray], np.ndarray] | None) -> tuple[list[np.ndarray], int]:
    """The global adapter after each round of `cohort` (the last merchant replaced by `attacker(round,
    honest norms)` where given), and how many honest updates the guard clipped."""
    rounds, merchants, dims = cohort.updates.shape
    strategy = make_strategy(cfg, {KEY: (dims,)})
    current, clipped, trajectory = np.zeros(dims, dtype=np.float32), 0, []
    for r in range(rounds):
        updates = list(cohort.updates[r])
        if attacker is not None:
            updates[-1] = attacker(r, np.linalg.norm(cohort.updates[r][:-1], axis=-1))
        sent = sorted(strategy.configure_train(r + 1, _record(current), ConfigRecord({}), NodeList(merchants)),
                      key=lambda m: m.metadata.dst_node_id)
        replies = [Message(_reply(current + u), reply_to=m) for u, m in zip(updates, sent, strict=True)]
        arrays, _ = strategy.aggregate_train(r + 1, replies)
        if arrays is not None:
            current = np.asarray(arrays[KEY].numpy())
        trajectory.append(current)
        over = strategy.history[-1].get("norm_clip", {}).get("clipped", [])
        clipped += len([key for key in over if attacker is None or key != f"node-{merchants}"])
    return trajectory, clipped


def _record(values: np.ndarray) -> ArrayRecord:
    return ArrayRecord({KEY: Array(np.ascontiguousarray(values, dtype=np.float32))})


def _reply(values: np.ndarray) -> RecordDict:
    return RecordDict({"arrays": _record(values), "metrics": MetricRecord({"num-examples": 1})})


def measure(merchants: int, rounds: int, dims: int, honest_norm: float, seed: int, overrides: dict[str, Any]) -> list[dict[str, Any]]:
    """Every attack x norm target, against the guard as it was and as it is, for one cohort size."""
    cohort = Cohort.draw(merchants, rounds, dims, honest_norm, seed)
    guards = {"old guard": {"federation.median_norm_clip": 0.0}, "new guard": {}}
    configs = {name: load_config(TINY, {"federation.min_replies": 1, **overrides, **extra}) for name, extra in guards.items()}
    honest = {name: guarded_rounds(cfg, cohort, None) for name, cfg in configs.items()}
    rows = []
    for attack in ATTACKS:
        for target in ("old ceiling", "new clip"):
            row = {"merchants": merchants, "attack": attack, "norm": target,
                   "honest_moved": float(np.linalg.norm(honest["old guard"][0][-1]))}
            for name, cfg in configs.items():
                def attacker(r: int, norms: np.ndarray, attack: str = attack, target: str = target) -> np.ndarray:
                    return attack_update(attack, attack_norm(target, configs["new guard"], norms), r, cohort.attack_direction)

                attacked, _ = guarded_rounds(cfg, cohort, attacker)
                gaps = [float(np.linalg.norm(a - h)) for a, h in zip(attacked, honest[name][0], strict=True)]
                row[name], row[f"{name} largest"] = gaps[-1], max(gaps)
            rows.append(row)
    clipped = honest["new guard"][1]
    return [row | {"honest_clipped": clipped, "honest_updates": rounds * merchants} for row in rows]


class SteadyPush:
    """Client mod: merchant `partition` replies, in every round, the global adapter it received plus an
    update of norm `norm` along one fixed direction. A class, not a closure, so that it pickles into the Ray workers."""

    def __init__(self, partition: int, norm: float, seed: int) -> None:
        self.partition, self.norm, self.seed = partition, norm, seed

    def __call__(self, msg: Message, context: Context, call_next) -> Message:
        hit = msg.metadata.message_type == MessageType.TRAIN and int(context.node_config["partition-id"]) == self.partition
        received = {k: np.array(v.numpy()) for k, v in msg.content["arrays"].items()} if hit else {}
        reply = call_next(msg, context)
        if not hit or reply.has_error():
            return reply
        push = {k: np.random.default_rng([self.seed, i]).normal(size=v.shape) for i, (k, v) in enumerate(sorted(received.items()))}
        scale = self.norm / np.sqrt(sum(float(np.sum(d**2)) for d in push.values()))
        reply.content["arrays"] = ArrayRecord({k: Array((received[k] + scale * push[k]).astype(np.float32)) for k in received})
        return reply


def adapter_distance(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(np.sum((a[k].astype(np.float64) - b[k]) ** 2) for k in a)))


def end_to_end(rounds: int, seed: int, overrides: dict[str, Any]) -> dict[str, Any]:
    """Final adapters of tiny 3-merchant federations, honest and with merchant 2 pushing, old guard and new."""
    base = {"federation.num_rounds": rounds, "data.synthetic.n_merchants": 3, "privacy.enabled": False, **overrides}
    guards = {"old guard": {"federation.median_norm_clip": 0.0}, "new guard": {}}
    attacker = SteadyPush(2, 0.999 * load_config(TINY, base).federation.max_update_norm, seed)
    finals, clipped = {}, 0
    for name, extra in guards.items():
        for label, mods in (("honest", ()), ("attacked", (attacker,))):
            out = Path(tempfile.mkdtemp(prefix="shopcast_attack_"))
            run = base | extra | {"federation.out_dir": str(out / "federated"), "privacy.ledger_dir": str(out / "ledgers")}
            federated = federate(load_config(TINY, run), 3, make_app((*mods, client_privacy_mod)))
            summary = federated.summary
            finals[name, label] = load_file(str(federated.adapter_dir / "adapter.safetensors"))
            if label == "honest" and name == "new guard":
                clipped = sum(len(h.get("norm_clip", {}).get("clipped", [])) for h in summary["history"])
    return {"merchants": 3, "rounds": rounds, "old guard": adapter_distance(finals["old guard", "attacked"], finals["old guard", "honest"]),
            "new guard": adapter_distance(finals["new guard", "attacked"], finals["new guard", "honest"]),
            "honest runs differ": adapter_distance(finals["old guard", "honest"], finals["new guard", "honest"]), "honest_clipped": clipped,
            "honest_updates": 3 * rounds}


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| merchants | attack | attacker's norm just under | old guard: last | largest | new guard: last | largest | "
             "honest run moved | honest updates clipped (new) |", "|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['merchants']} | {r['attack']} | {r['norm']} | {r['old guard']:.4g} | {r['old guard largest']:.4g} | "
              f"{r['new guard']:.4g} | {r['new guard largest']:.4g} | {r['honest_moved']:.4g} | "
              f"{r['honest_clipped']} of {r['honest_updates']} |" for r in rows]
    return "\n".join(lines) + "\n"


def end_to_end_lines(real: dict[str, Any]) -> list[str]:
    return [
        "## End to end: 3 merchants, tiny backbone, trained updates (no DP-SGD), merchant 2 pushing just under the old ceiling", "",
        "| rounds | old guard | new guard | honest runs, old vs new guard | honest updates clipped (new) |", "|---:|---:|---:|---:|---:|",
        f"| {real['rounds']} | {real['old guard']:.4g} | {real['new guard']:.4g} | {real['honest runs differ']:.4g} | "
        f"{real['honest_clipped']} of {real['honest_updates']} |", "",
        "Distances between final adapters (L2 over every adapter tensor) of the attacked and the honest run under the same guard.",
    ]


def main(argv: list[str] | None = None) -> Path:
    parser = arguments(__doc__.split("\n\n")[0])
    parser.add_argument("--merchants", default="3,10,100")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--honest-norm", type=float, default=0.003, help="typical honest update norm (tiny model under DP-SGD: ~0.003)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="attack")
    parser.add_argument("--end-to-end", type=int, default=0, metavar="R", help="also R rounds of real tiny federations (0: none)")
    args = parser.parse_args(argv)
    logging.getLogger("flwr").setLevel(logging.ERROR)
    logging.getLogger("server.guard").setLevel(logging.ERROR)
    for key, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):  # Flower builds Messages only inside a task
        setattr(TaskIdentity, key, value)
    overrides = parse_overrides(args.set)
    dims = shared_size(ForecastPipeline.from_config(load_config(TINY, overrides)).model)
    with Run("benchmarks.attack", argv, threads=1) as run:
        rows = [row for n in (int(m) for m in args.merchants.split(","))
                for row in measure(n, args.rounds, dims, args.honest_norm, args.seed, overrides)]
        real = end_to_end(args.end_to_end, args.seed, overrides) if args.end_to_end else None
    cfg = load_config(TINY, overrides)
    extra = [
        f"synthetic honest updates (norm {args.honest_norm:g} x log-normal(0, 0.5) per merchant, 0.6 shared direction), not trained ones; "
        f"the real guarded default FedAvg aggregates them; adapter of the tiny config's shared size d = {dims}",
        f"{args.rounds} rounds, seed {args.seed}; old guard: max_update_norm {cfg.federation.max_update_norm} alone; "
        f"new guard: also median_norm_clip {cfg.federation.median_norm_clip}",
    ]
    body = "\n".join([
        "## Distance of the final global adapter from the honest run's, with one attacker", "",
        "`last`: L2 distance from the honest run's global adapter after the last round; `largest`: after any round; "
        "`honest run moved`: how far the all-honest run moved from the start in all its rounds.",
        "", table(rows), *(end_to_end_lines(real) if real else [])])
    payload = {"rows": rows, "end_to_end": real, "dims": dims, "rounds": args.rounds, "honest_norm": args.honest_norm, "seed": args.seed,
               "max_update_norm": cfg.federation.max_update_norm, "median_norm_clip": cfg.federation.median_norm_clip}
    return run.save(args.name, "One in-bound attacker against the guard (synthetic updates)", extra, body, payload, args.results)


if __name__ == "__main__":
    command(main)
