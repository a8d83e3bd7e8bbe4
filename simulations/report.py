"""The run report a merchant consortium reads: accuracy against today's tools, privacy, traffic."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from shared.metrics import per_merchant, summarise, to_markdown
from shared.plots import bar_chart, fan_chart
from shared.schema import MERCHANT
from shared.sources import merchant_of_partition
from simulations.compare import Contest

ACCURACY_COLUMNS = ["model", "mase", "wql", "mase_gmean_rel", "wql_gmean_rel", "smape", "coverage_80", "coverage_90", "seconds"]


def accuracy_summary(contest: Contest) -> pd.DataFrame:
    """One row per contender, best mean WQL first, with its wall time: the table every accuracy report
    (the demo's and the benchmarks') leads with, so that they read alike."""
    summary = summarise(contest.scores)
    summary["seconds"] = summary["model"].map(contest.seconds)
    return summary[ACCURACY_COLUMNS].sort_values("wql").reset_index(drop=True)


def merchant_wql(contest: Contest, models: pd.Series) -> pd.DataFrame:
    """Mean WQL of each of `models` (rows, in that order) on each merchant (a `WQL <merchant>` column each):
    a model can win overall and still lose where a merchant's series are unlike the rest."""
    wide = per_merchant(contest.scores).pivot(index="model", columns=MERCHANT, values="wql")
    return wide.loc[models].rename(columns=lambda m: f"WQL {m}").reset_index()


def federation_table(summary: dict[str, Any]) -> pd.DataFrame:
    """One row per merchant and round: ε spent, bytes sent, loss, holdout metrics."""
    rows = []
    for entry in summary["history"]:
        for pid, m in entry["merchants"].items():
            rows.append({"round": entry["round"], "merchant": pid, "wall_s": entry["wall_s"], **m})
    return pd.DataFrame(rows)


def merchant_name(merchants: Sequence[str], key: str) -> str:
    """The merchant a round record's key stands for: a partition id's merchant, or a node filed under its
    own id ("node-81723": no partition id, or one another node holds) as itself."""
    return key if str(key).startswith("node-") else merchant_of_partition(merchants, key)


def dp_spent(summary: dict[str, Any], merchants: Sequence[str]) -> pd.DataFrame:
    """Per merchant of a DP federation: the ε it reported last (its ledger's, cumulative, so the
    largest), its DP steps summed over the rounds it trained in, and how many rounds that was."""
    rounds = federation_table(summary)
    if "epsilon" not in rounds:
        return pd.DataFrame(columns=["merchant", "epsilon", "steps", "rounds"])
    trained = rounds.dropna(subset=["epsilon"]).assign(merchant=lambda f: f["merchant"].map(lambda key: merchant_name(merchants, key)))
    return trained.groupby("merchant").agg(epsilon=("epsilon", "max"), steps=("steps", "sum"), rounds=("round", "nunique")).reset_index()


def discarded_line(history: list[dict[str, Any]]) -> str:
    """What the rounds could not use, and the DP steps merchants spent on rejected replies for nothing
    (a late merchant's spending is on its own ledger only: the server never saw its reply)."""
    rejected = [r for e in history for r in e["rejected"]]
    wasted = sum(int(r.get("steps", 0)) for r in rejected)
    return (f"Rejected replies: {len(rejected)} (carrying {wasted} DP steps spent for nothing); late replies (past the round "
            f"timeout, merchant may have spent budget): {sum(len(e.get('late', [])) for e in history)}; failed or declining "
            f"merchants: {sum(len(e['failures']) for e in history)}.")


def write_report(out: Path, contest: Contest, summary: dict[str, Any], context: dict[str, Any], history: pd.DataFrame) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    overall = accuracy_summary(contest)
    merchants = per_merchant(contest.scores)
    rounds = federation_table(summary)
    rounds["merchant"] = rounds["merchant"].map(lambda key: merchant_name(context["merchants"], key))
    privacy = summary["privacy"]
    lines = [
        f"# shopcast run report: {context['title']}",
        "",
        f"{context['description']}",
        "",
        "## Accuracy on each series' last horizon (lower is better)",
        "`*_gmean_rel`: geometric mean over series of the score divided by seasonal naive's (1.0 = seasonal naive).",
        "",
        to_markdown(overall.round(4)),
        "",
        "## Per merchant (mean over its series)",
        "",
        to_markdown(merchants.round(4)),
        "",
        "## Privacy",
    ]
    if privacy["enabled"]:
        lines += [
            f"DP-SGD per merchant; protected unit: **{privacy['unit']}**; δ = {privacy['delta']:g}; "
            f"budget ε ≤ {privacy['target_epsilon']:g} per merchant (training stops when it is spent).",
            "",
            "ε spent by each merchant over the rounds it trained in (cumulative, from its own ledger):",
            "",
            to_markdown(dp_spent(summary, context["merchants"])),
        ]
    else:
        lines.append("DP is **off** in this run: no ε guarantee (only raw data stays local).")
    per_round = rounds.groupby("round").agg(wall_s=("wall_s", "first"), bytes_per_client=("bytes-sent", "mean"),
                                            replies=("merchant", "count"))
    lines += [
        "",
        "## Traffic and time",
        f"Adapter: {summary['adapter_bytes']:,} bytes per message vs {summary['backbone_bytes']:,} bytes of backbone "
        f"(1/{summary['backbone_bytes'] / summary['adapter_bytes']:.0f}); each client receives the same size it sends.",
        "",
        to_markdown(per_round.reset_index()),
        "",
        discarded_line(summary["history"]),
        "",
        "![accuracy](accuracy.png)",
        "",
        "![forecasts](forecasts.png)",
    ]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    (out / "report.json").write_text(
        json.dumps({"context": context, "overall": overall.to_dict("records"), "per_merchant": merchants.to_dict("records"),
                    "federation": summary}, indent=2, default=float)
    )
    bar_chart(overall, "mase_gmean_rel", out / "accuracy.png",
              "MASE relative to seasonal naive (geometric mean, lower is better)", reference=1.0)
    name = context["highlight"]
    fan_chart(history, contest.forecasts[name], out / "forecasts.png", f"{name}: median and 80% band on the test horizon")
    return out / "report.md"
