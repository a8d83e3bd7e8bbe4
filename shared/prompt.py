"""Prompt-as-prefix (Time-LLM): a short text about the shop, the task and the window's statistics.

The statistics are computed for all windows at once and each window is tokenised once, when the
windows are built, never inside the training loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class WindowStats:
    minimum: np.ndarray  # [N]
    maximum: np.ndarray
    median: np.ndarray
    trend: np.ndarray  # [N] least-squares slope per step
    top_lags: np.ndarray  # [N, k] lags (>= 1) with the largest autocorrelation, strongest first


def window_statistics(context: np.ndarray, top_k: int = 3) -> WindowStats:
    """Min, max, median, linear trend and the top autocorrelation lags (lag 0 excluded) of each row."""
    n, length = context.shape
    centred = context - context.mean(axis=1, keepdims=True)
    steps = np.arange(length) - (length - 1) / 2
    slope = centred @ steps / (steps @ steps)
    spectrum = np.fft.rfft(centred, n=2 * length, axis=1)
    acf = np.fft.irfft(np.abs(spectrum) ** 2, axis=1)[:, :length]
    with np.errstate(divide="ignore", invalid="ignore"):
        acf = np.where(acf[:, :1] > 0, acf / acf[:, :1], 0.0)
    candidates = acf[:, 1 : length // 2 + 1] if length >= 4 else acf[:, 1:]
    order = np.argsort(-candidates, axis=1, kind="stable")[:, :top_k] + 1
    return WindowStats(context.min(axis=1), context.max(axis=1), np.median(context, axis=1), slope, order)


def _number(x: float) -> str:
    return f"{x:.3g}"


def prompt_texts(context: np.ndarray, domain: str, horizon: int, top_k: int = 3) -> list[str]:
    stats = window_statistics(context, top_k)
    texts = []
    for i in range(len(context)):
        tolerance = 1e-3 * (abs(stats.median[i]) + stats.maximum[i] - stats.minimum[i]) or 1e-12
        direction = "upward" if stats.trend[i] > tolerance else "downward" if stats.trend[i] < -tolerance else "flat"
        lags = ", ".join(str(int(lag)) for lag in stats.top_lags[i]) if stats.maximum[i] > stats.minimum[i] else "none"
        texts.append(
            f"{domain} Forecast {horizon} steps from {context.shape[1]}. "
            f"Min {_number(stats.minimum[i])}, max {_number(stats.maximum[i])}, "
            f"median {_number(stats.median[i])}, trend {direction}, top lags {lags}."
        )
    return texts


def tokenize_left_padded(tokenizer, texts: list[str], max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids [N, max_tokens] and mask, padded on the left so the series tokens follow directly.

    Texts longer than `max_tokens` keep their end, where the window's statistics are.
    """
    ids = np.full((len(texts), max_tokens), getattr(tokenizer, "pad_token_id", None) or 0, dtype=np.int64)
    mask = np.zeros((len(texts), max_tokens), dtype=np.int64)
    if not texts:
        return ids, mask
    for i, tokens in enumerate(tokenizer(texts, add_special_tokens=False)["input_ids"]):
        tokens = tokens[-max_tokens:]
        ids[i, max_tokens - len(tokens) :] = tokens
        mask[i, max_tokens - len(tokens) :] = 1
    return ids, mask
