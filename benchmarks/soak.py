"""A soak of the federation: many rounds, merchants dropping out at random, the server restarted twice.

    .venv/bin/python -m benchmarks.soak [--rounds 20] [--restarts-after 7,14] [--dropout 0.2] [--set key=value ...]

The real ServerApp and ClientApp run through Flower's simulation engine on configs/tiny.toml
(tiny random Llama, synthetic merchants) three times:
  - without DP, uninterrupted;
  - without DP, stopped after each round in --restarts-after and resumed from its checkpoint by a
    new simulation, as a restarted server would be;
  - with DP-SGD, restarted the same way.
A client mod drops merchant p from round r, before it trains, when a draw seeded by (seed, r, p)
says so, so both non-DP runs lose the same merchants in the same rounds (rounds are counted over the
whole run, resumes included). Checked: the two non-DP final adapters agree within float tolerance
(a restart changes nothing), and in the DP run every merchant's ledger holds exactly the steps its
replies reported and the ε of its last reply. Writes benchmarks/results/soak.md and .json.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from flwr.app import Context, Message, MessageType
from safetensors.numpy import load_file

from benchmarks.scaffold import Run, arguments, command, quiet
from client.app import make_app
from client.mods import client_privacy_mod
from server.guard import FEDERATION_ROUND
from shared.config import PROJECT_ROOT, load_config, parse_overrides
from shared.metrics import to_markdown
from shared.privacy import open_ledger
from shared.sources import load_table
from simulations.federated import federate as federate_once
from simulations.report import dp_spent

TINY = PROJECT_ROOT / "configs" / "tiny.toml"


class DropOut:
    """Client mod: merchant p does not answer the train message of round r when the seeded draw says so."""

    def __init__(self, rate: float, seed: int) -> None:
        self.rate, self.seed = rate, seed

    def drops(self, server_round: int, partition: int) -> bool:
        return bool(np.random.default_rng([self.seed, server_round, partition]).random() < self.rate)

    def __call__(self, msg: Message, context: Context, call_next) -> Message:
        if msg.metadata.message_type == MessageType.TRAIN:
            server_round, partition = int(msg.content["config"][FEDERATION_ROUND]), int(context.node_config["partition-id"])
            if self.drops(server_round, partition):
                raise RuntimeError(f"soak: merchant {partition} drops out of round {server_round}")
        return call_next(msg, context)


def federate(overrides: dict[str, Any], stops: list[int], merchants: int, dropout: DropOut) -> tuple[dict[str, Any], Path, float]:
    """One federation of overrides' rounds, the server stopped after each round in `stops` and resumed."""
    out = Path(tempfile.mkdtemp(prefix="shopcast_soak_"))
    overrides = overrides | {"federation.out_dir": str(out / "federated"), "privacy.ledger_dir": str(out / "ledgers")}
    client = make_app((dropout, client_privacy_mod))
    started = time.time()
    for rounds in [*stops, overrides["federation.num_rounds"]]:
        segment = overrides | {"federation.num_rounds": rounds}
        summary = federate_once(load_config(TINY, segment), merchants, client).summary
    return summary, out, time.time() - started


def ledger_check(summary: dict[str, Any], out: Path, overrides: dict[str, Any]) -> list[dict[str, Any]]:
    """Per merchant: the DP steps and ε its replies reported against what its own ledger holds."""
    cfg = load_config(TINY, overrides | {"privacy.ledger_dir": str(out / "ledgers")})
    rows = []
    for r in dp_spent(summary, load_table(cfg).merchants()).itertuples():
        ledger = open_ledger(cfg.privacy, r.merchant)
        steps = sum(entry[2] for entry in ledger.history)
        rows.append({"merchant": r.merchant, "steps reported": int(r.steps), "steps in ledger": steps, "ε last reply": r.epsilon,
                     "ε ledger": ledger.epsilon(), "consistent": steps == r.steps and abs(ledger.epsilon() - r.epsilon) < 1e-9})
    return rows


def final_adapter(out: Path) -> dict[str, np.ndarray]:
    return load_file(str(out / "federated" / "final_adapter" / "adapter.safetensors"))


def main(argv: list[str] | None = None) -> Path:
    parser = arguments(__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--merchants", type=int, default=4)
    parser.add_argument("--restarts-after", default="7,14", help="rounds after which the server is stopped and resumed")
    parser.add_argument("--dropout", type=float, default=0.2, help="chance that a merchant misses a round")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    quiet(progress=False)
    stops = [int(r) for r in args.restarts_after.split(",") if r]
    dropout = DropOut(args.dropout, args.seed)
    base = {"federation.num_rounds": args.rounds, "federation.num_merchants": args.merchants, "federation.min_replies": 1,
            "data.synthetic.n_merchants": args.merchants, "privacy.enabled": False} | parse_overrides(args.set)
    with Run("benchmarks.soak", argv, threads=1) as run:
        plain, plain_out, plain_s = federate(base, [], args.merchants, dropout)
        restarted, restarted_out, restarted_s = federate(base, stops, args.merchants, dropout)
        # a fixed σ: under "auto" each segment would plan σ for its own rounds only and spend the budget in the first
        fixed_sigma = base | {"privacy.enabled": True, "privacy.noise_multiplier": 1.5}
        private, private_out, private_s = federate(fixed_sigma, stops, args.merchants, dropout)
    a, b = final_adapter(plain_out), final_adapter(restarted_out)
    max_diff = max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
    ledgers = ledger_check(private, private_out, base | {"privacy.enabled": True})
    dropped = [[p for p in range(args.merchants) if dropout.drops(r, p)] for r in range(1, args.rounds + 1)]
    failures = [len(entry["failures"]) for entry in restarted["history"]]
    verdict = [
        f"non-DP, uninterrupted vs restarted after rounds {stops}: {restarted['rounds']} rounds each, largest difference of "
        f"any adapter value {max_diff:.2e} ({'equal within float tolerance' if max_diff < 1e-5 else 'NOT equal'}).",
        f"merchants dropped per round (same in both runs, {sum(map(len, dropped))} drop-outs in all): "
        + ", ".join(f"r{r + 1}: {d}" for r, d in enumerate(dropped) if d) + f"; failures the server recorded per round: {failures}.",
        f"DP run, restarted the same way: ledgers consistent for {sum(r['consistent'] for r in ledgers)} of {len(ledgers)} merchants.",
    ]
    body = "\n".join(["## Result", "", *(f"- {line}" for line in verdict), "", "## DP run: every merchant's ledger", "",
                      to_markdown(pd.DataFrame(ledgers)), ""])
    extra = [f"config: `configs/tiny.toml` + {base}; restarts after rounds {stops}; drop-out chance {args.dropout}, seed {args.seed}",
             f"wall time: non-DP uninterrupted {plain_s:.0f} s, non-DP restarted {restarted_s:.0f} s, DP restarted {private_s:.0f} s "
             "(each restart starts a new simulation: Ray start-up and backbone load again)"]
    payload = {"benchmark": "soak", "args": vars(args) | {"results": str(args.results)}, "overrides": base, "max_adapter_diff": max_diff,
               "dropped": dropped, "failures_per_round": failures, "ledgers": ledgers,
               "history_restarted": restarted["history"], "history_plain": plain["history"]}
    title = f"Soak: {args.rounds} rounds, random drop-outs, the server restarted after rounds {stops}"
    return run.save("soak", title, extra, body, payload, args.results)


if __name__ == "__main__":
    command(main)
