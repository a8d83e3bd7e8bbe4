"""One object from a merchant's table to a scored forecast: build or load, fit, calibrate, predict, score.

As Chronos' pipeline does for its users, `ForecastPipeline` holds the config and the forecaster
together, so the model's input shape is derived in one place (`input_shape`), every caller cuts
windows the same way, and a saved adapter brings back the settings it was trained with. The
ClientApp, the CLI, the server, the simulations and the benchmarks all go through it: none of them
reaches into the forecaster to load, save, snapshot or exchange its adapter (or the adapter's shared
part), so how the adapter is kept can change here alone.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import logging
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from shared.adapter import (
    AdapterMismatch,
    adapter_state,
    load_adapter,
    load_adapter_state,
    load_shared_state,
    save_adapter,
    shared_bytes,
    shared_state,
)
from shared.analogues import description_vectors, stand_in_history
from shared.calibration import Calibration
from shared.config import PROJECT_ROOT, Config, ConfigError, with_overrides
from shared.metrics import score, season_for
from shared.model import Forecaster, SeriesShape
from shared.personal import PersonalFit, Progress, no_progress, personal_fits, personalise, use_personal
from shared.privacy import MerchantPins, PrivateTraining
from shared.schema import DS, ID, MERCHANT, SeriesTable, Y, known_channel_names, quantile_column
from shared.train import TrainResult, evaluate_loss, fit, predict, resolve_device, window_losses
from shared.windows import Splits, Windows, build_splits, calendar_features

log = logging.getLogger(__name__)


def input_shape(cfg: Config, table: SeriesTable | None = None) -> SeriesShape:
    """Calendar features of the data's frequency plus its covariates, for `table` or, without one,
    for any table `prepare` makes under cfg (the server sizes the model without data)."""
    data = cfg.data
    if table is not None:
        freq, n_known, n_observed = table.freq, len(table.known), len(table.observed)
    elif data.freq == "auto":
        raise ConfigError('[data] freq = "auto" is decided by the data; set it (e.g. "D", "W-FRI") to size the model without data')
    else:  # prepare emits exactly the configured covariates, plus the negative-sales flag under negative = "flag"
        freq, n_known, n_observed = (data.freq, len(known_channel_names(data.columns)),
                                     len(data.columns.observed) + (data.negative == "flag"))
    n_known, n_observed = _slots(n_known, cfg.model.known_slots, "known"), _slots(n_observed, cfg.model.observed_slots, "observed")
    n_calendar = calendar_features(pd.date_range("2020-01-06", periods=2, freq=freq), freq).shape[1]
    return SeriesShape(data.context, data.horizon, n_known=n_calendar + 1 + n_known, n_observed=n_observed,  # + the open flag
                       season=season_for(freq))


def _slots(count: int, slots: int, kind: str) -> int:
    """The model's width for `count` covariates of a kind: `slots` when set, which they must fit."""
    if slots and count > slots:
        raise ConfigError(f"[model] {kind}_slots = {slots}, but the data has {count} {kind} covariates; raise it "
                          "(an adapter trained with fewer slots will not load)")
    return slots or count


# Model settings a base adapter must share with the config that starts from it (the domain text, the
# seed and the base itself may differ).
BASE_MUST_MATCH = ("backbone", "llm_layers", "variant", "patch_len", "patch_stride", "d_patch", "n_prototypes", "reprogram_heads",
                   "reprogram_dim", "d_ff", "prompt", "prompt_max_tokens", "quantiles", "known_slots", "observed_slots", "lora")


SHIPPED_BASES = PROJECT_ROOT / "shared" / "base"
BASE_FILES = ("meta.json", "adapter.safetensors")  # what loading a base needs (lora/ is the peft export, for others)


def installed_root() -> Path | None:
    """The folder the installed shopcast distribution's files are under (the source tree of an editable
    install), or None. Flower runs the app from its bundle (FAB), which carries text files only (*.py,
    *.json, ...; at most 10 MB), so a deployed ServerApp or ClientApp finds the shipped bases' weights in
    the shopcast that its machine has pip-installed (package data), not beside its own code."""
    try:
        dist = importlib.metadata.distribution("shopcast")
    except importlib.metadata.PackageNotFoundError:
        return None
    direct = json.loads(dist.read_text("direct_url.json") or "{}")
    if direct.get("dir_info", {}).get("editable"):
        return Path(urllib.request.url2pathname(urllib.parse.urlparse(direct["url"]).path))
    return Path(dist.locate_file(""))


def base_roots() -> list[Path]:
    """Where a relative base folder is looked for: this code's own tree first (a checkout, or the app
    bundle), then the installed package's."""
    return list(dict.fromkeys(root for root in (PROJECT_ROOT, installed_root()) if root is not None))


def _complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in BASE_FILES)


def _with_weights(relative: Path) -> Path | None:
    """The first root's copy of the base folder `relative` that holds its weights."""
    return next((root / relative for root in base_roots() if _complete(root / relative)), None)


NO_BASE_VARIANTS = ("attention", "random_llm")  # their blocks are not the pretrained LLM's


def _base_mismatch(folder: Path, cfg: Config, shape: SeriesShape) -> list[str]:
    """The settings in which the adapter in `folder` differs from what `cfg` builds ([] when it fits)."""
    meta = json.loads((folder / "meta.json").read_text())
    mine = json.loads(json.dumps(dataclasses.asdict(cfg.model)))
    differ = [f"model.{key} = {mine[key]!r} (base: {meta['model'].get(key)!r})" for key in BASE_MUST_MATCH
              if meta["model"].get(key) != mine[key]]
    return differ + [f"shape {key} = {value} (base: {meta['shape'].get(key)})" for key, value in dataclasses.asdict(shape).items()
                     if meta["shape"].get(key) != value]


def _fitting(folder: Path, base: str, cfg: Config, shape: SeriesShape) -> Path:
    if differ := _base_mismatch(folder, cfg, shape):
        raise ConfigError(f"[model] base = {base!r} does not fit this config: {'; '.join(differ)}; match it or set base = \"auto\" or \"\"")
    return folder


def _listed_bases(variant: str) -> list[Path]:
    """The shipped bases of `variant` that the meta.json files beside this code list, in name order."""
    return [meta.parent for meta in sorted(SHIPPED_BASES.glob(f"*/{variant}/meta.json"))]


def _shipped_base(cfg: Config, shape: SeriesShape) -> Path | None:
    """The first shipped base that fits, decided by the meta.json files beside this code (the app bundle
    carries them too, fab-include), its weights from the first root that has them. A base that fits but
    whose weights are nowhere is an error: the SuperLink and the SuperNodes would otherwise start from
    different models, or all from the seeded init, without a word."""
    listed = _listed_bases(cfg.model.variant)
    if not listed:
        log.warning('[model] base = "auto": %s lists no shipped base; the model starts from the seeded init', SHIPPED_BASES)
        return None
    fits = next((folder for folder in listed if not _base_mismatch(folder, cfg, shape)), None)
    if fits is None:
        return None
    relative = fits.relative_to(PROJECT_ROOT)
    if (folder := _with_weights(relative)) is None:
        raise ConfigError(f'[model] base = "auto" picks {relative}, but its weights are in none of {", ".join(map(str, base_roots()))}: '
                          'install shopcast with its package data on this machine (pip install .), '
                          'or set base = "" to start from the seeded init')
    return _fitting(folder, "auto", cfg, shape)


def base_folder(cfg: Config, shape: SeriesShape) -> Path | None:
    """The base adapter a model of `cfg` and `shape` starts from, or None. `base = "auto"`: the first
    shipped base (shared/base/*/<variant>) that fits, else none, so a config unlike every shipped base
    (another backbone, another context or horizon) starts from the seeded init. A named folder must hold an adapter of
    the variant that fits, or it is an error naming the setting, never a silent fresh start; a relative one
    is looked for beside this code, then in the installed package. The attention and random-LLM ablations
    have none (their blocks are not the pretrained LLM's)."""
    base, variant = cfg.model.base, cfg.model.variant
    if not base or variant in NO_BASE_VARIANTS:
        return None
    if base == "auto":
        return _shipped_base(cfg, shape)
    path = Path(base) / variant
    folder = path if path.is_absolute() else _with_weights(path) or PROJECT_ROOT / path
    if not _complete(folder):
        raise ConfigError(f"[model] base = {base!r}: no {variant} adapter in {folder}; pretrain one (python -m server.pretrain), "
                          'or set base = "auto" or ""')
    return _fitting(folder, base, cfg, shape)


def shown_path(path: Path) -> str:
    """`path` relative to the project when inside it, as the README names the shipped bases."""
    return str(path.relative_to(PROJECT_ROOT)) if path.is_relative_to(PROJECT_ROOT) else str(path)


def forecast_frame(splits: Splits, windows: Windows, quantiles: np.ndarray, levels: tuple[float, ...]) -> pd.DataFrame:
    """Long frame merchant_id, unique_id, ds, q0.05 … q0.95: one row per window and horizon step."""
    n, horizon, _ = quantiles.shape
    rows = []
    for i in range(n):
        sid = int(windows.series[i])
        block = pd.DataFrame(quantiles[i], columns=[quantile_column(q) for q in levels])
        block.insert(0, DS, pd.date_range(windows.target_start[i], periods=horizon, freq=splits.freq))
        block.insert(0, ID, splits.series_ids[sid])
        block.insert(0, MERCHANT, splits.merchant_of[sid])
        rows.append(block)
    return pd.concat(rows, ignore_index=True)


def recent_windows(splits: Splits, count: int, include_test: bool = True) -> Windows:
    """Each series' `count` latest windows whose targets do not overlap, the last being its test window
    (or, without it, its validation window): a back-test in which every window is forecast from its own
    context. Fewer when the series' history (or the training stride) offers fewer."""
    parts = [splits.train, splits.val, *([splits.test] if include_test else [])]
    pool = Windows(*(np.concatenate([getattr(w, f) for w in parts]) for f in Windows.__dataclass_fields__))
    horizon = pool.target.shape[1]
    keep: list[int] = []
    for sid in np.unique(pool.series):
        mine = np.flatnonzero(pool.series == sid)
        picked: list[int] = []
        for i in mine[np.argsort(-pool.offset[mine], kind="stable")]:
            if len(picked) == count:
                break
            if not picked or pool.offset[i] <= pool.offset[picked[-1]] - horizon:
                picked.append(int(i))
        keep.extend(reversed(picked))
    return pool.subset(np.array(keep, dtype=int))


class ForecastPipeline:
    """A config and the forecaster it builds; the seeded initial adapter is the same for everyone
    with the same config, which federation relies on."""

    def __init__(self, cfg: Config, shape: SeriesShape) -> None:
        self.cfg = cfg
        self.model = Forecaster(cfg.model, shape, device=resolve_device(cfg.train.device))
        self.base: Path | None = None  # the pretrained base it started from (from_config), if any
        self.progress: Progress = no_progress  # reports the loops that can take minutes (the CLI's bars)

    @classmethod
    def from_config(cls, cfg: Config, table: SeriesTable | None = None) -> ForecastPipeline:
        """Sized for `table`, else from the config alone; starting from the pretrained base when
        [model] base names one, whose values the adapter tensors outside [model] shared then keep."""
        pipeline = cls(cfg, input_shape(cfg, table))
        if (base := base_folder(cfg, pipeline.model.shape)) is not None:
            load_adapter(pipeline.model, base)
        pipeline.base = base
        return pipeline

    @classmethod
    def from_adapter(cls, directory: str | Path, cfg: Config) -> ForecastPipeline:
        """A trained adapter with the model settings, context and horizon it was trained with (its
        meta.json), the rest (data, device) from `cfg`."""
        meta_path = Path(directory) / "meta.json"
        if not meta_path.exists():
            raise FileNotFoundError(f"{meta_path} not found; train an adapter first with `shopcast train`")
        try:  # a copy cut short or edited by hand is the merchant's to fix, not a crash
            meta = json.loads(meta_path.read_text())
            model, shape = meta["model"], SeriesShape(**meta["shape"])
        except (ValueError, KeyError, TypeError) as exc:
            raise AdapterMismatch(f"{meta_path} is not a readable adapter meta.json ({exc!r}); copy or train the adapter again") from exc
        cfg = with_overrides(cfg, {"model": model, "data.context": shape.context, "data.horizon": shape.horizon})
        pipeline = cls(cfg, shape)
        load_adapter(pipeline.model, directory)
        return pipeline

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def splits(self, table: SeriesTable, future: pd.DataFrame | None = None) -> Splits:
        """The table's windows, with the prompts this model reads; data shaped unlike the model is refused.
        Under short_series = "analogues" a new product's padding is first stood in for by its analogues."""
        if (now := input_shape(self.cfg, table)) != self.model.shape:
            raise AdapterMismatch(f"the model takes inputs {self.model.shape}, but this data gives {now}; "
                                  "check [data.columns] known/observed and freq")
        if self.cfg.data.short_series == "analogues":
            table = stand_in_history(table, self.describe, self.cfg.data.analogues)
        shape = self.model.shape
        return build_splits(table, self.cfg.data, self.model.encode_prompts, future_known=future,
                            widths=(shape.n_known, shape.n_observed))

    def describe(self, texts: list[str]) -> np.ndarray:
        """Product descriptions as the frozen backbone's vectors (shared.analogues)."""
        return description_vectors(texts, self.model.tokenizer, self.model.embed_tokens)

    def fit(self, train: Windows, val: Windows | None = None, **options: Any) -> TrainResult:
        """Trains the adapter's shared part in place (`shared.train.fit`'s options: steps, privacy, proximal_mu, on_step)."""
        return fit(self.model, train, val, self.cfg.train, **options)

    def personalise(self, splits: Splits) -> tuple[float, float, int]:
        """Refits the output layers on this merchant's own windows (shared.personal), in place; they stay
        here. (validation loss before, after, steps kept)."""
        return personalise(self.model, splits, self.cfg.train, self.progress)

    def personal_fits(self, merchants: list[Splits]) -> list[PersonalFit]:
        """`personalise` for several merchants at once (a simulation's), leaving the model as it was:
        each one's refit is put in with shared.personal.use_personal."""
        return personal_fits(self.model, merchants, self.cfg.train, self.progress)

    def private_training(self, merchant: str, train: Windows, pins: MerchantPins | None = None,
                         planned_steps: int | None = None) -> PrivateTraining | None:
        """The merchant's DP-SGD session when the config (or the merchant's own pins) turn privacy on;
        `planned_steps` (default: the federation's rounds x local steps) is what σ "auto" plans for."""
        pins = pins or MerchantPins()
        if not (self.cfg.privacy.enabled or pins.require_dp):
            return None
        return PrivateTraining.for_merchant(self.cfg, merchant, train, pins, planned_steps)

    def predict_frame(self, splits: Splits, windows: Windows, calibration: Calibration | None = None) -> pd.DataFrame:
        """Quantile forecasts of `windows` (one of `splits`' parts) as the long forecast frame, with
        conformalised bands when a `calibration` (from `calibrate`) is given."""
        quantiles = self._predict(windows, "forecasting")
        if calibration is not None:
            if calibration.levels != tuple(self.cfg.model.quantiles):
                raise AdapterMismatch(f"the calibration is for levels {list(calibration.levels)}, but the model forecasts "
                                      f"{list(self.cfg.model.quantiles)}; delete calibration.json to calibrate again")
            quantiles = calibration.apply(quantiles, windows.context, windows.open)
        return forecast_frame(splits, windows, quantiles, self.cfg.model.quantiles)

    def calibrate(self, splits: Splits, holdout_windows: int = 1) -> Calibration:
        """Conformal offsets (shared.calibration) from each series' `holdout_windows` latest windows before
        its test window. The default 1 is the validation window, on which the adapter never took a
        step; more add the latest training windows: more points, but ones the adapter was fitted to,
        whose smaller errors leave the calibrated band too narrow."""
        holdout = recent_windows(splits, holdout_windows, include_test=False)
        forecast = self._predict(holdout, "calibrating")
        return Calibration.fit(forecast, holdout.target, holdout.context, holdout.open, self.cfg.model.quantiles)

    def _predict(self, windows: Windows, stage: str, batch_size: int = 64) -> np.ndarray:
        """`predict` batch by batch under `self.progress`: thousands of series' windows through the LLM
        on a CPU take minutes."""
        starts = self.progress(range(0, len(windows), batch_size), stage)
        parts = [predict(self.model, windows.subset(np.arange(start, min(start + batch_size, len(windows)))), self.device, batch_size)
                 for start in starts]
        return np.concatenate(parts) if parts else predict(self.model, windows, self.device)

    def describe_base(self) -> str:
        """What `from_config` started from, in one line: which base a forecast rests on decides much of
        its accuracy, and "auto" alone does not say."""
        if self.base is not None:
            shipped = "shipped " if self.base.is_relative_to(SHIPPED_BASES) else ""
            return f"starting from the {shipped}base {shown_path(self.base.parent)} ({self.base.name})"
        model = self.cfg.model
        if not model.base:
            why = '[model] base = ""'
        elif model.variant in NO_BASE_VARIANTS:
            why = f"the {model.variant} variant has no base"
        else:
            why = f"no shipped base fits this config ({self._closest_base()})"
        return f"starting from the seeded init: {why}"

    def _closest_base(self) -> str:
        """The shipped base of this variant that differs in the fewest settings, and how."""
        shipped = _listed_bases(self.cfg.model.variant)
        if not shipped:
            return f"none ships for variant {self.cfg.model.variant!r}"
        differ, folder = min(((_base_mismatch(f, self.cfg, self.model.shape), f) for f in shipped), key=lambda pair: len(pair[0]))
        return f"closest: {shown_path(folder.parent)}, which differs in {'; '.join(differ[:2])}" + ("; ..." if len(differ) > 2 else "")

    def backtest(self, splits: Splits, windows: int, calibration: Calibration | None = None) -> pd.DataFrame:
        """Forecasts of each series' `windows` latest non-overlapping windows (the test window last),
        beside what was sold (column y)."""
        frame = self.predict_frame(splits, recent_windows(splits, windows), calibration)
        return frame.merge(splits.frame[[ID, DS, Y]], on=[ID, DS], how="left", validate="one_to_one")

    def score(self, splits: Splits, forecast: pd.DataFrame | None = None) -> pd.DataFrame:
        """Per-series MASE, sMAPE, WQL and coverage of the test-split forecast (made here unless given)."""
        forecast = self.predict_frame(splits, splits.test) if forecast is None else forecast
        season = season_for(splits.freq)
        return score(forecast, splits.test_actuals(), splits.history_before_test(), season, self.cfg.model.quantiles)

    def save(self, directory: str | Path, meta: dict[str, Any] | None = None) -> Path:
        return save_adapter(self.model, directory, meta)

    def load(self, directory: str | Path) -> dict[str, Any]:
        """The adapter saved in `directory` (a federation's final_adapter) in place of this one; its meta.json."""
        return load_adapter(self.model, directory)

    def state(self) -> dict[str, torch.Tensor]:
        """A copy of the whole adapter, to `restore` after trying something on it."""
        return adapter_state(self.model)

    def restore(self, state: dict[str, torch.Tensor]) -> None:
        load_adapter_state(self.model, state)

    @contextmanager
    def keep_state(self) -> Iterator[dict[str, torch.Tensor]]:
        """The adapter as it was on entry comes back on exit: several regimes trained one after another
        must each start from the same adapter, never from where the previous one ended. Yields that
        adapter, for restoring it in between."""
        kept = self.state()
        try:
            yield kept
        finally:
            self.restore(kept)

    def shared_state(self) -> dict[str, torch.Tensor]:
        """The adapter's shared part ([model] shared; shared.adapter): what a federation round sends and averages."""
        return shared_state(self.model)

    def load_shared_state(self, state: dict[str, torch.Tensor]) -> None:
        """A received shared part in place of this one; the rest of the adapter keeps its values."""
        load_shared_state(self.model, state)

    def shared_bytes(self) -> int:
        """The size of one message's shared part, each way."""
        return shared_bytes(self.model)

    def use_personal(self, refit: PersonalFit) -> None:
        """A merchant's own output layers (from `personal_fits`) in place of the current ones."""
        use_personal(self.model, refit)

    def loss(self, windows: Windows) -> float:
        """The mean pinball loss on `windows`, as training's validation measures it."""
        return evaluate_loss(self.model, windows, self.device)

    def window_losses(self, windows: Windows) -> np.ndarray:
        """Each of `windows`' pinball loss, in order (`loss` is their mean)."""
        return window_losses(self.model, windows, self.device).numpy()

    def quantiles(self, windows: Windows) -> np.ndarray:
        """Quantile forecasts [windows, horizon, levels] of windows cut outside `splits` (a benchmark's own protocol)."""
        return predict(self.model, windows, self.device)

    def encode_prompts(self, context: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The prompt tokens this model reads beside each context, for windows cut outside `splits`."""
        return self.model.encode_prompts(context)

    def forecast_merchants(self, splits: dict[str, Splits]) -> pd.DataFrame:
        """The test-window forecast of several merchants (a simulation's) as one long frame."""
        return pd.concat([self.predict_frame(s, s.test) for s in splits.values()], ignore_index=True)
