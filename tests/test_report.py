"""The run report names every merchant a round record holds, including a node filed under its own id."""

from __future__ import annotations

from simulations.report import dp_spent


def test_a_node_filed_under_its_own_id_is_reported_as_itself() -> None:
    # the guard files a node whose partition id another node holds (or that sends none) as "node-<id>"
    history = [{"round": 1, "wall_s": 1.0, "merchants": {"0": {"epsilon": 1.5, "steps": 10},
                                                         "node-81723": {"epsilon": 0.5, "steps": 10}}}]
    spent = dp_spent({"history": history}, ["shop_00", "shop_01"]).set_index("merchant")
    assert spent.loc["shop_00", "epsilon"] == 1.5 and spent.loc["node-81723", "epsilon"] == 0.5
