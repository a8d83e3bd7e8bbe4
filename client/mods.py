"""The merchants' side of client_dp = "client_fixed" and secagg = true, as Flower client mods."""

from __future__ import annotations

from collections.abc import Callable

import flwr.compat.common.recorddict_compat as compat
import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.client.mod import fixedclipping_mod as legacy_fixedclipping_mod
from flwr.client.mod import secaggplus_mod
from flwr.client.mod.utils import make_ffn
from flwr.clientapp.mod import fixedclipping_mod
from flwr.common import Code, EvaluateRes, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

from shared.adapter import ADAPTER_KEYS
from shared.config import Config
from shared.handoff import run_config

# --------------------------------------------------------------------------------------------------
# The merchants' side of client_dp = "client_fixed" and secagg = true
# --------------------------------------------------------------------------------------------------
#
# `client.app` runs `client_privacy_mod` on every message; it reads the run's config each time, so one
# ClientApp serves every combination of the options.


def _train_only(mod: Callable) -> Callable:
    """Flower's Message-API fixedclipping_mod does not look at the message type and fails evaluate
    messages (no clipping norm in their config, no adapter in their reply); this applies it to train only."""

    def wrapped(msg: Message, ctxt: Context, call_next: Callable) -> Message:
        return mod(msg, ctxt, call_next) if msg.metadata.message_type == MessageType.TRAIN else call_next(msg, ctxt)

    return wrapped


def legacy_bridge_mod(msg: Message, ctxt: Context, call_next: Callable) -> Message:
    """Serves the legacy workflow's messages with the unchanged ClientApp functions.

    fitins/evaluateins records become {"arrays" (named again from ADAPTER_KEYS), "config"}; the
    {"arrays", "metrics"} reply becomes fitres (weight 1) or evaluateres (loss = wql). Other messages
    pass through.
    """
    original = msg.content
    is_fit = "fitins.parameters" in original.array_records
    if is_fit:
        ins = compat.recorddict_to_fitins(original, keep_input=True)
    elif "evaluateins.parameters" in original.array_records:
        ins = compat.recorddict_to_evaluateins(original, keep_input=True)
    else:
        return call_next(msg, ctxt)
    config = dict(ins.config)
    keys = str(config.pop(ADAPTER_KEYS)).split("\n")
    arrays = ArrayRecord({k: Array(np.ascontiguousarray(a)) for k, a in zip(keys, parameters_to_ndarrays(ins.parameters), strict=True)})
    msg.content = RecordDict({"arrays": arrays, "config": ConfigRecord(config)})
    try:
        reply = call_next(msg, ctxt)
    finally:
        msg.content = original
    if reply.has_error():  # SecAgg+'s mod cannot pass an Error reply on; raising sends its reason to the server
        raise RuntimeError(f"[code {reply.error.code}] {reply.error.reason}")
    metrics = dict(reply.content["metrics"])
    ok = Status(code=Code.OK, message="ok")
    if is_fit:
        state = reply.content["arrays"]
        parameters = ndarrays_to_parameters([np.asarray(state[k].numpy()) for k in keys])
        reply.content = compat.fitres_to_recorddict(FitRes(status=ok, parameters=parameters, num_examples=1, metrics=metrics),
                                                    keep_input=True)
    else:
        res = EvaluateRes(status=ok, loss=float(metrics.get("wql", float("nan"))), num_examples=int(metrics.get("num-examples", 1)),
                          metrics=metrics)
        reply.content = compat.evaluateres_to_recorddict(res)
    return reply


def client_mods(cfg: Config) -> list[Callable]:
    """The mods a merchant must run for `cfg`'s federation options, outermost first."""
    fed = cfg.federation
    if fed.secagg:  # mask what is sent (outermost), after clipping it, after translating the legacy records
        return [secaggplus_mod, *([legacy_fixedclipping_mod] if fed.client_dp == "client_fixed" else []), legacy_bridge_mod]
    if fed.client_dp == "client_fixed":
        return [_train_only(fixedclipping_mod)]
    return []


def client_privacy_mod(msg: Message, ctxt: Context, call_next: Callable) -> Message:
    """One client mod for every option: applies `client_mods` of the run's config."""
    mods = client_mods(run_config(ctxt.run_config))
    return make_ffn(call_next, mods)(msg, ctxt) if mods else call_next(msg, ctxt)
