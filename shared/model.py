"""The forecaster: a frozen LLM reprogrammed for time series (Time-LLM), with a quantile head.

Read top to bottom, one window's path is:
  scale by the mean |y| of the context's open days  ->  patches of (y, observed, known covariates)
  ->  patch embedding  ->  cross-attention onto frozen text prototypes (reprogramming)
  ->  [prompt | patches | horizon tokens carrying next steps' known covariates]  ->  frozen LLM blocks with LoRA
  ->  flatten head  +  a linear path from context and covariates  +  a per-step path from each step's
      own seasonal lags and covariates
  ->  non-crossing quantiles, their gaps in units of how much the context moves day to day
  ->  rescale, and 0 on the horizon's closed days.
LoRA and the small layers defined here are the adapter; the part of it that [model] shared names
trains and travels in federation, the rest stays at the base's values. Every trainable layer is an
nn.Linear, nn.Embedding or nn.LayerNorm so Opacus can compute per-sample gradients for it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from torch import nn

from shared.backbone import text_prototypes, truncated_backbone
from shared.config import ConfigError, ModelConfig
from shared.prompt import prompt_texts, tokenize_left_padded

MAX_SCALED = 100.0  # guards the patch embedding against a window with one huge spike after scaling
MIN_SPREAD = 0.02  # a flat context still gets bands (2% of its level per unit gap) and a loss weight at most 50x a typical one
# The text prototypes are a property of the backbone, not of a run: an adapter trained under one run
# seed (the pretrained base) must meet the same prototypes under any other.
PROTOTYPE_SEED = 0


@dataclass(frozen=True)
class SeriesShape:
    """What the data decides about the model's input and output sizes."""

    context: int
    horizon: int
    n_known: int  # calendar + the open flag + known-ahead covariates
    n_observed: int
    season: int  # the frequency's seasonal period (7 for daily, 52 for weekly): which past steps are a step's seasonal lags


STEP_LAGS = 4  # per horizon step: its two latest seasonal lags, their mean over the context, the recent level


class Encoded(NamedTuple):
    """What the output layers read, per window (Forecaster.encode): computed once per window when only
    those layers are refitted (shared.personal)."""

    tokens: torch.Tensor  # [B, T * d_ff] the LLM path's token features
    linear_input: torch.Tensor  # [B, L + H * n_known] the scaled context and the horizon's known covariates
    step_input: torch.Tensor  # [B, H, n_step_features] each horizon step's own seasonal lags and covariates
    scale: torch.Tensor  # [B, 1] the context's mean |y| over open days
    spread: torch.Tensor  # [B, 1] the scaled context's step spread


def mean_abs_scale(x: torch.Tensor, is_open: torch.Tensor | None = None) -> torch.Tensor:
    """Per-window mean |x| over time (over open days only, given `is_open` [B, T]: a closed day's 0 is
    not a slow day); 1 for an all-zero window so intermittent series stay finite."""
    if is_open is None:
        scale = x.abs().mean(dim=1, keepdim=True)
    else:
        weight = is_open.reshape(*is_open.shape, *([1] * (x.dim() - 2)))
        scale = (x.abs() * weight).sum(dim=1, keepdim=True) / weight.sum(dim=1, keepdim=True).clamp_min(1.0)
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def step_spread(series: torch.Tensor, is_open: torch.Tensor) -> torch.Tensor:
    """[B, 1] the mean |change| from one open day to the next in a scaled context [B, L], at least
    MIN_SPREAD: how much this series moves. A smooth department and a noisy corner shop share a window
    scale of 1 but need bands many times apart; in these units the head learns one gap for both."""
    both_open = is_open[:, 1:] * is_open[:, :-1]
    moves = (series[:, 1:] - series[:, :-1]).abs() * both_open
    spread = moves.sum(dim=1, keepdim=True) / both_open.sum(dim=1, keepdim=True).clamp_min(1.0)
    return spread.clamp_min(MIN_SPREAD)


def lag_period(context: int, season: int) -> int:
    """The season the per-step path reads its lags at: 1 (the last steps) when the context holds no
    whole season, as MASE falls back to."""
    return season if season <= context else 1


def seasonal_lag_index(context: int, horizon: int, season: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Context positions [H, M] of each horizon step's same-phase steps, latest first (M = every cycle
    the context holds), and which exist [H, M]. Step i (1-based) after a context ending at t is at
    t + i; its latest seasonal lag is t + i - period * ceil(i / period), period = lag_period."""
    period = lag_period(context, season)
    steps = torch.arange(1, horizon + 1)
    latest = context - 1 + steps - period * torch.ceil(steps / period).long()
    cycles = latest[:, None] - period * torch.arange(math.ceil(context / period))[None, :]
    return cycles.clamp_min(0), cycles >= 0


def step_features(series: torch.Tensor, is_open: torch.Tensor, known_ahead: torch.Tensor, lags: torch.Tensor, exists: torch.Tensor,
                  recent: int) -> torch.Tensor:
    """[B, H, F] per horizon step, in the window's scale: its latest and second-latest seasonal lag, the
    mean of its same-phase open steps in the context (the weekday profile of a daily shop), the mean of
    the last `recent` open steps, then its known covariates (promotion, holiday, open, calendar) alone
    and times that profile (a promotion lifts a busy weekday more than a quiet one). One set of weights
    over these serves every step: what LightGBM reads from lags and flags, learnt from few windows.
    A closed lag stands for nothing, so the profile takes its place."""
    weight = is_open[:, lags] * exists  # [B, H, M]
    values = series[:, lags]
    profile = (values * weight).sum(-1) / weight.sum(-1).clamp_min(1.0)
    latest = torch.where(weight[..., 0] > 0, values[..., 0], profile)
    second = torch.where(weight[..., 1] > 0, values[..., 1], latest) if lags.shape[1] > 1 else latest
    tail = is_open[:, -recent:]
    level = (series[:, -recent:] * tail).sum(1, keepdim=True) / tail.sum(1, keepdim=True).clamp_min(1.0)
    lagged = torch.stack([latest, second, profile, level.expand_as(profile)], dim=-1)
    return torch.cat([lagged, known_ahead, known_ahead * profile.unsqueeze(-1)], dim=-1)


def monotone_quantiles(raw: torch.Tensor, mid: int, unit: torch.Tensor) -> torch.Tensor:
    """Median plus cumulative positive gaps either side, so quantiles never cross by construction; each
    gap is softplus(raw) times the window's `unit` [B, 1] (its step spread)."""
    median = raw[..., mid : mid + 1]
    gaps = F.softplus(torch.cat([raw[..., :mid], raw[..., mid + 1 :]], dim=-1)) * unit.unsqueeze(-1)
    upper = median + torch.cumsum(gaps[..., mid:], dim=-1)
    lower = median - torch.cumsum(gaps[..., :mid].flip(-1), dim=-1).flip(-1)
    return torch.cat([lower, median, upper], dim=-1)


def pinball_loss(pred: torch.Tensor, target: torch.Tensor, levels: torch.Tensor, is_open: torch.Tensor | None = None) -> torch.Tensor:
    """Mean pinball loss per window ([B]) over its open horizon steps (`is_open` [B, H]; all when None):
    a closed day is forecast 0 by rule, so it teaches nothing. Per window so DP can clip each window's gradient."""
    diff = target.unsqueeze(-1) - pred
    loss = torch.maximum(levels * diff, (levels - 1) * diff).mean(dim=2)
    if is_open is None:
        return loss.mean(dim=1)
    return (loss * is_open).sum(dim=1) / is_open.sum(dim=1).clamp_min(1.0)


def _under(name: str, prefix: str) -> bool:
    """Whether a parameter lies under a dotted prefix: "reprogram" holds "reprogram.query.weight",
    "head" does not hold "header.weight"."""
    return name == prefix or name.startswith(f"{prefix}.")


class Reprogramming(nn.Module):
    """Patch embeddings (queries) attend over frozen text prototypes (keys and values)."""

    def __init__(self, d_patch: int, d_llm: int, heads: int, d_head: int):
        super().__init__()
        self.heads, self.d_head = heads, d_head
        self.query = nn.Linear(d_patch, heads * d_head)
        self.key = nn.Linear(d_llm, heads * d_head, bias=False)  # a key bias shifts every score equally: no gradient
        self.value = nn.Linear(d_llm, heads * d_head)
        self.out = nn.Linear(heads * d_head, d_llm)

    def forward(self, patches: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
        batch = patches.shape[0]

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.expand(batch, -1, -1).view(batch, x.shape[1], self.heads, self.d_head).transpose(1, 2)

        # In training the prototypes are expanded per window before key/value, so Opacus sees a batch
        # dimension on their inputs; without gradients they are keyed once for the whole batch: the same
        # values, and a forecast's features cost a fifth less (keying 256 prototypes per window is about
        # a sixth of its multiplications at 2 blocks).
        source = prototypes.unsqueeze(0)
        if torch.is_grad_enabled():
            source = source.expand(batch, -1, -1)
        q, k, v = split(self.query(patches)), split(self.key(source)), split(self.value(source))
        mixed = F.scaled_dot_product_attention(q, k, v)
        return self.out(mixed.transpose(1, 2).reshape(batch, -1, self.heads * self.d_head))


class AttentionBlock(nn.Module):
    """One trainable self-attention layer: the "LLM replaced by attention" ablation."""

    def __init__(self, d_model: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        keep = mask.bool()[:, None, None, :]
        mixed = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        return x + self.out(mixed.transpose(1, 2).reshape(b, t, d))


class Forecaster(nn.Module):
    def __init__(self, cfg: ModelConfig, shape: SeriesShape, device: torch.device | str = "cpu"):
        super().__init__()
        self.cfg, self.shape = cfg, shape
        pretrained = cfg.variant != "random_llm"
        backbone, self.tokenizer = truncated_backbone(cfg.backbone, cfg.llm_layers, pretrained, cfg.seed)
        backbone.to(device)  # before get_peft_model: moving LoRA afterwards corrupts it under Opacus (opacus #820)
        d_llm = backbone.config.hidden_size
        self.n_patches = (shape.context - cfg.patch_len) // cfg.patch_stride + 1
        self.n_future = shape.horizon // cfg.patch_len
        channels = 1 + shape.n_observed + shape.n_known
        torch.manual_seed(cfg.seed)  # identical initial adapter (and LoRA A) on every merchant
        self.embed_tokens = backbone.embed_tokens
        self.register_buffer("prototypes", text_prototypes(backbone.embed_tokens, cfg.n_prototypes, PROTOTYPE_SEED), persistent=False)
        self.patch_embed = nn.Linear(cfg.patch_len * channels, cfg.d_patch)
        self.patch_position = nn.Embedding(self.n_patches, cfg.d_patch)
        self.reprogram = Reprogramming(cfg.d_patch, d_llm, cfg.reprogram_heads, cfg.reprogram_dim)
        self.future_embed = nn.Linear(cfg.patch_len * shape.n_known, d_llm)
        self.future_position = nn.Embedding(self.n_future, d_llm)
        self.llm: nn.Module | None = None
        if cfg.variant in ("llm", "random_llm"):
            self.llm = get_peft_model(backbone, self._lora_config())
        elif cfg.variant == "attention":
            self.llm = AttentionBlock(d_llm, cfg.reprogram_heads)
        self.to_ff = nn.Linear(d_llm, cfg.d_ff)
        n_quantiles = len(cfg.quantiles)
        self.head = nn.Linear((self.n_patches + self.n_future) * cfg.d_ff, shape.horizon * n_quantiles)
        # a linear path from the scaled context and the horizon's known covariates straight to the
        # output: the forecaster starts where a linear autoregression with promotions starts, and the
        # LLM path has to earn its place on top (the ablations measure by how much)
        self.linear = nn.Linear(shape.context + shape.horizon * shape.n_known, shape.horizon * n_quantiles)
        # a per-step path: the same weights read every horizon step's own seasonal lags and covariates, so
        # "like the same weekday last week, plus the promotion's lift" costs a handful of numbers to learn
        # instead of one per step and input, and a shop with a few hundred windows can refit it
        lags, exists = seasonal_lag_index(shape.context, shape.horizon, shape.season)
        self.register_buffer("step_lags", lags, persistent=False)
        self.register_buffer("step_lag_exists", exists.float(), persistent=False)
        period = lag_period(shape.context, shape.season)
        # the recent level: the last week of a daily shop; a month of weeks where a season is a year
        self.recent = period if 4 * period <= shape.context else min(4, shape.context)
        self.per_step = nn.Linear(STEP_LAGS + 2 * shape.n_known, n_quantiles, bias=False)
        self.register_buffer("levels", torch.tensor(cfg.quantiles, dtype=torch.float32), persistent=False)
        self.mid = list(cfg.quantiles).index(0.5)
        self._start_at_the_window_mean()
        # recorded before anything is frozen: whatever a run trains, the adapter a file stores and a
        # base provides stays complete, so it restores the whole model (shared.adapter)
        self.adapter_names = tuple(name for name, param in self.named_parameters() if param.requires_grad)
        self._train_only_shared()
        self.to(device)

    def _train_only_shared(self) -> None:
        """Freezes every adapter tensor outside [model] shared (none when it is empty), and LoRA's A under
        lora.freeze_a (FFA-LoRA), where it is: the base's values once the pipeline loads the base. What
        still trains is the shared part, the only part that travels; under DP-SGD its size is the d in
        the signal-to-noise N/√d (docs/privacy.md, section 5), so a small one learns from fewer units."""
        prefixes, freeze_a = self.cfg.shared, self.cfg.lora.freeze_a
        trainable = {name for name in self.adapter_names if not (freeze_a and "lora_A" in name)}
        if unmatched := [prefix for prefix in prefixes if not any(_under(name, prefix) for name in trainable)]:
            groups = sorted({name.split(".")[0] for name in trainable})
            raise ConfigError(f"[model] shared = {list(prefixes)}: {unmatched} match no trainable tensor; "
                              f"expected names or dotted prefixes under {groups}")
        params = dict(self.named_parameters())
        for name in self.adapter_names:
            params[name].requires_grad_(name in trainable and (not prefixes or any(_under(name, p) for p in prefixes)))

    @torch.no_grad()
    def _start_at_the_window_mean(self) -> None:
        """Untrained, the forecast is the context's mean with a modest band, not random noise: a few
        local steps (or noisy DP steps) then refine a sensible forecast instead of escaping a bad one.
        The LLM path's head starts near zero (not at zero, so gradients reach LoRA from the first step)
        and learns what it adds on top."""
        horizon, n_levels = self.shape.horizon, len(self.cfg.quantiles)
        nn.init.normal_(self.head.weight, std=1e-3)
        self.head.bias.zero_()
        self.per_step.weight.zero_()
        weight = self.linear.weight.view(horizon, n_levels, -1)
        weight.zero_()
        weight[:, self.mid, : self.shape.context] = 1.0 / self.shape.context
        bias = self.linear.bias.view(horizon, n_levels)
        bias.fill_(-1.0)  # softplus(-1) = 0.31: each quantile starts 0.31 step spreads from the next
        bias[:, self.mid] = 0.0

    def _lora_config(self) -> PeftLoraConfig:
        lora = self.cfg.lora
        return PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.targets))

    @property
    def uses_prompt(self) -> bool:
        return self.cfg.prompt and self.llm is not None

    def encode_prompts(self, context: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Prompt token ids for a stack of raw contexts (tokenised once, when windows are built)."""
        if not self.uses_prompt:
            return np.zeros((len(context), 0), dtype=np.int64), np.zeros((len(context), 0), dtype=np.int64)
        texts = prompt_texts(context, self.cfg.domain, self.shape.horizon)
        return tokenize_left_padded(self.tokenizer, texts, self.cfg.prompt_max_tokens)

    def forward(
        self, context: torch.Tensor, observed: torch.Tensor, known: torch.Tensor, open: torch.Tensor, prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantiles [B, H, Q] in units of the window's typical step change and that unit [B, 1] in sales.
        `open` [B, L + H] (also a channel of `known`) keeps closed context days out of the scale."""
        return self.outputs(self.encode(context, observed, known, open, prompt_ids, prompt_mask))

    def encode(
        self, context: torch.Tensor, observed: torch.Tensor, known: torch.Tensor, open: torch.Tensor, prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
    ) -> Encoded:
        """Everything before the output layers. A merchant refitting only the output layers
        (shared.personal) computes it once per window instead of once per step."""
        batch, L = context.shape
        P, S = self.cfg.patch_len, self.cfg.patch_stride
        scale = mean_abs_scale(context, open[:, :L])
        series = (context / scale).clamp(-MAX_SCALED, MAX_SCALED).unsqueeze(-1)
        observed = (observed / mean_abs_scale(observed)).clamp(-MAX_SCALED, MAX_SCALED)
        channels = torch.cat([series, observed, known[:, :L]], dim=-1)
        patches = channels.unfold(1, P, S).flatten(2)  # [B, n_patches, channels * P]
        positions = self.patch_position(self._positions(batch, self.n_patches))
        patch_tokens = self.reprogram(self.patch_embed(patches) + positions, self.prototypes)
        future = known[:, L:].unfold(1, P, P).flatten(2)  # [B, n_future, n_known * P]
        future_tokens = self.future_embed(future) + self.future_position(self._positions(batch, self.n_future))
        tokens = torch.cat([patch_tokens, future_tokens], dim=1)
        mask = torch.ones(batch, tokens.shape[1], dtype=torch.long, device=context.device)
        if self.uses_prompt:
            tokens = torch.cat([self.embed_tokens(prompt_ids).to(tokens.dtype), tokens], dim=1)
            mask = torch.cat([prompt_mask, mask], dim=1)
        hidden = self._mix(tokens, mask)[:, -(self.n_patches + self.n_future) :]
        scaled = series.squeeze(-1)
        spread = step_spread(scaled, open[:, :L])
        steps = step_features(scaled, open[:, :L], known[:, L:], self.step_lags, self.step_lag_exists, self.recent)
        return Encoded(self.to_ff(hidden).flatten(1), torch.cat([scaled, known[:, L:].flatten(1)], dim=1), steps, scale, spread)

    def decode(self, encoded: Encoded) -> torch.Tensor:
        """The output layers (the flatten head, the linear path and the per-step path): non-crossing
        quantiles [B, H, Q] in scaled units, their gaps in units of the context's step spread."""
        raw = (self.head(encoded.tokens) + self.linear(encoded.linear_input)).view(len(encoded.tokens), self.shape.horizon, -1)
        return monotone_quantiles((raw + self.per_step(encoded.step_input)).float(), self.mid, encoded.spread.float())

    def outputs(self, encoded: Encoded) -> tuple[torch.Tensor, torch.Tensor]:
        """decode's quantiles divided by the step spread, and the unit scale x spread that maps them to
        sales: the mean |change| between open days of the context. A pinball loss in this unit is
        M5's scaled pinball loss: a smooth department's bands weigh as much as a noisy shop's, as they
        do in a metric relative to seasonal naive, instead of counting 50 times less."""
        return self.decode(encoded) / encoded.spread.unsqueeze(-1), encoded.scale * encoded.spread

    def _positions(self, batch: int, count: int) -> torch.Tensor:
        """Position ids with a batch dimension, which Opacus needs to attribute gradients per window."""
        return torch.arange(count, device=self.levels.device).expand(batch, count)

    def _mix(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.llm is None:
            return tokens
        if isinstance(self.llm, AttentionBlock):
            return self.llm(tokens, mask)
        positions = (mask.cumsum(dim=1) - 1).clamp_min(0)
        return self.llm(inputs_embeds=tokens, attention_mask=mask, position_ids=positions).last_hidden_state

    def loss(self, target: torch.Tensor, **inputs: torch.Tensor) -> torch.Tensor:
        """Per-window pinball loss over open days in units of the window's step change (forward), so
        shops of any size and any noise weigh the same."""
        quantiles, scale = self(**inputs)
        return pinball_loss(quantiles, target / scale, self.levels, inputs["open"][:, -target.shape[1] :])

    @torch.no_grad()
    def predict(self, **inputs: torch.Tensor) -> torch.Tensor:
        """Quantiles in the series' own units [B, H, Q]; exactly 0 on a closed day."""
        quantiles, scale = self(**inputs)
        quantiles = quantiles * scale.unsqueeze(-1) * inputs["open"][:, -self.shape.horizon :, None]
        return quantiles.clamp_min(0.0) if self.cfg.nonnegative else quantiles

    def lora_model(self) -> PeftModel | None:
        return self.llm if isinstance(self.llm, PeftModel) else None
