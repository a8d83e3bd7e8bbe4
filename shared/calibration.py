"""Conformalised quantiles: the model's bands widened (or narrowed) until they cover what they claim.

A frozen LLM fine-tuned for a few DP steps has no reason to be calibrated on a given shop: its 80%
band may hold 60% of that shop's days. Conformalized quantile regression (Romano, Patterson and
Candès, 2019) fixes the coverage from a holdout the adapter never trained on. For each symmetric pair
of levels (lo, hi) = (α/2, 1 - α/2), each holdout point's nonconformity is how far it falls outside
the band, E = max(q_lo - y, y - q_hi) (negative inside it); the ⌈(n + 1)(1 - α)⌉-th smallest of the
n scores, Q̂, then moves q_lo down and q_hi up by Q̂ (up and down when Q̂ < 0, a band too wide).

Scores are in units of each window's scale, the mean |y| of its context's open days that the
model itself normalises by, so a shop selling 3 units a day and one selling 300 pool into one Q̂, and the
offset a window gets follows its own size. Every point of a holdout window counts, so the coverage
guarantee is marginal over horizon steps, not per step; and it assumes the recent holdout is like the
days forecast, which a change of regime breaks, as for any calibration.

After the shift the median is kept as it was, the quantiles are made monotone outwards from it, and
a window whose context holds no negative value (sales) never gets a negative quantile. A closed day
scores nothing (it is 0 by rule, not by skill) and stays exactly 0 after calibration.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from shared.adapter import AdapterMismatch
from shared.model import mean_abs_scale

FILE = "calibration.json"


def window_scale(context: np.ndarray, is_open: np.ndarray) -> np.ndarray:
    """[N] the scale the model divides each window by (its context's mean |y| over open days, 1 when all zero)."""
    context = np.asarray(context, dtype=np.float64)
    mask = torch.as_tensor(np.asarray(is_open, dtype=np.float64)[:, : context.shape[1]])
    return mean_abs_scale(torch.as_tensor(context), mask).numpy()[:, 0]


def symmetric_pairs(levels: tuple[float, ...]) -> list[tuple[int, int]]:
    """Indices (lo, hi) of the level pairs with lo + hi = 1, lo < 0.5: the model's central intervals.
    A level without its mirror image has no interval to calibrate and is only kept monotone."""
    return [(i, j) for i, lo in enumerate(levels) if lo < 0.5 for j, hi in enumerate(levels) if math.isclose(lo + hi, 1.0)]


def conformal_quantile(scores: np.ndarray, coverage: float) -> float:
    """The ⌈(n + 1) coverage⌉-th smallest score, CQR's finite-sample quantile. With too few points
    for that rank (n < coverage / (1 - coverage)) the largest score, so the band stays finite."""
    ordered = np.sort(np.ravel(scores))
    rank = math.ceil((len(ordered) + 1) * coverage)
    return float(ordered[min(rank, len(ordered)) - 1])


def _monotone_from_median(quantiles: np.ndarray, mid: int) -> np.ndarray:
    """Each lower quantile at most the one above it, each upper at least the one below, starting at
    the median, so the median never moves (a plain sort could move it when a narrowed band crosses it)."""
    lower = np.minimum.accumulate(quantiles[..., mid::-1], axis=-1)[..., ::-1]
    upper = np.maximum.accumulate(quantiles[..., mid:], axis=-1)
    return np.concatenate([lower[..., :-1], upper], axis=-1)


@dataclass(frozen=True)
class Calibration:
    """Per-interval offsets Q̂ in units of a window's scale, fitted once on a holdout."""

    levels: tuple[float, ...]
    offsets: tuple[tuple[float, float, float], ...]  # (lo, hi, Q̂) per symmetric pair
    points: int  # holdout points per pair (windows x horizon steps)

    @classmethod
    def fit(cls, quantiles: np.ndarray, target: np.ndarray, context: np.ndarray, is_open: np.ndarray,
            levels: tuple[float, ...]) -> Calibration:
        """From holdout forecasts [N, H, Q], their actuals [N, H], the contexts [N, L] they came from and
        the windows' open flags [N, L + H]."""
        scale = window_scale(context, is_open)[:, None]
        scored = np.asarray(is_open)[:, -target.shape[1] :] > 0
        if not scored.any():
            raise ValueError("the holdout has no open day to calibrate on")
        offsets = []
        for i, j in symmetric_pairs(levels):
            scores = np.maximum(quantiles[..., i] - target, target - quantiles[..., j]) / scale
            offsets.append((levels[i], levels[j], conformal_quantile(scores[scored], levels[j] - levels[i])))
        return cls(tuple(levels), tuple(offsets), int(scored.sum()))

    def apply(self, quantiles: np.ndarray, context: np.ndarray, is_open: np.ndarray) -> np.ndarray:
        """Calibrated copy of forecasts [N, H, Q] made from contexts [N, L], with open flags [N, L + H]."""
        levels = self.levels
        out = np.array(quantiles, dtype=np.float64)
        shift = window_scale(context, is_open)[:, None]
        for lo, hi, offset in self.offsets:
            out[..., levels.index(lo)] -= offset * shift
            out[..., levels.index(hi)] += offset * shift
        out = _monotone_from_median(out, levels.index(0.5))
        nonnegative = (np.asarray(context) >= 0).all(axis=1)
        out[nonnegative] = np.maximum(out[nonnegative], 0.0)
        out *= np.asarray(is_open)[:, -out.shape[1] :, None]
        return out.astype(np.asarray(quantiles).dtype)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        intervals = [{"low": lo, "high": hi, "offset": offset} for lo, hi, offset in self.offsets]
        path.write_text(json.dumps({"levels": list(self.levels), "intervals": intervals, "points": self.points}, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> Calibration | None:
        """The calibration saved beside an adapter, None when there is none."""
        path = Path(directory) / FILE
        if not path.exists():
            return None
        try:  # like meta.json: a file cut short is the merchant's to fix, not a crash
            data = json.loads(path.read_text())
            offsets = tuple((float(d["low"]), float(d["high"]), float(d["offset"])) for d in data["intervals"])
            return cls(tuple(float(q) for q in data["levels"]), offsets, int(data["points"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise AdapterMismatch(f"{path} is not a readable calibration ({exc!r}); delete it to calibrate again") from exc
