"""The adapter and its shared part: the only model state a file holds, and the only state that travels.

Two notions, kept apart:
  the adapter      every tensor of a forecaster outside the frozen backbone (`Forecaster.adapter_names`),
                   trained in this run or not: what a file stores, what a base provides, what
                   `ForecastPipeline.from_adapter` restores on its own (it loads no base first);
  the shared part  the adapter tensors this run trains ([model] shared, lora.freeze_a): what a merchant
                   sends and the server sends, aggregates and checks; under DP-SGD its size is the d of
                   the signal-to-noise estimate (shared.privacy.signal_to_noise).

On disk an adapter is a directory:
  adapter.safetensors   every adapter tensor, by its parameter name in `Forecaster`
  lora/                 the LoRA part as peft writes it; `PeftModel.from_pretrained(blocks, "lora")`
                        loads it onto the same truncated backbone (`shared.backbone.truncated_backbone`)
  meta.json             the model config and anything the caller adds (round number, metrics)

Every part is written beside its final name, fsynced and renamed over it (meta.json last; lora/ file
by file), so a crash while saving leaves each file whole, old or new, never truncated; files in the
directory that the adapter does not write (a merchant's own, in a folder it named) are never touched.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from shared.backbone import load_pretrained
from shared.model import Forecaster

FEDERATION_ROUND = "federation-round"  # the round number over the whole run, resumes included (train config)
ADAPTER_KEYS = "adapter-keys"  # SecAgg+'s legacy messages carry an unnamed list; the names travel in their config


class AdapterMismatch(ValueError):
    """An update that cannot be loaded: wrong keys, wrong shapes or non-finite values."""


def adapter_parameters(model: Forecaster) -> dict[str, nn.Parameter]:
    """The adapter's tensors by name, in a stable order, whether this run trains them or not."""
    params = dict(model.named_parameters())
    return {name: params[name] for name in model.adapter_names}


def shared_parameters(model: Forecaster) -> dict[str, nn.Parameter]:
    """The shared part's tensors by name: the adapter tensors that train, hence the ones that travel."""
    return {name: param for name, param in adapter_parameters(model).items() if param.requires_grad}


def _copies(params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    return {name: param.detach().cpu().clone() for name, param in params.items()}


def _shapes(params: dict[str, nn.Parameter]) -> dict[str, tuple[int, ...]]:
    return {name: tuple(param.shape) for name, param in params.items()}


def _load(params: dict[str, nn.Parameter], state: dict[str, torch.Tensor]) -> None:
    """Copies `state` into `params` after checking all of it first: a bad update changes nothing."""
    check_update(state, _shapes(params))
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(state[name].to(param.device, param.dtype))


def adapter_state(model: Forecaster) -> dict[str, torch.Tensor]:
    """Name -> detached CPU copy of every adapter tensor: a snapshot that restores the whole model."""
    return _copies(adapter_parameters(model))


def adapter_shapes(model: Forecaster) -> dict[str, tuple[int, ...]]:
    return _shapes(adapter_parameters(model))


def load_adapter_state(model: Forecaster, state: dict[str, torch.Tensor]) -> None:
    """Copies a whole adapter (a file's, a base's, a snapshot) into the model."""
    _load(adapter_parameters(model), state)


def shared_state(model: Forecaster) -> dict[str, torch.Tensor]:
    """Name -> detached CPU copy of every shared tensor: what a merchant or the server sends."""
    return _copies(shared_parameters(model))


def shared_shapes(model: Forecaster) -> dict[str, tuple[int, ...]]:
    """What every reply, aggregate and strategy moment must match, key for key."""
    return _shapes(shared_parameters(model))


def load_shared_state(model: Forecaster, state: dict[str, torch.Tensor]) -> None:
    """Copies a received shared part into the model; the rest of the adapter keeps its values."""
    _load(shared_parameters(model), state)


def shared_size(model: Forecaster) -> int:
    """How many numbers train and travel: the d that DP-SGD noises, to read beside ε."""
    return sum(param.numel() for param in shared_parameters(model).values())


def shared_bytes(model: Forecaster) -> int:
    """The size of one message's tensors, each way."""
    return sum(param.numel() * param.element_size() for param in shared_parameters(model).values())


def check_update(state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]]) -> None:
    """Raises AdapterMismatch unless `state` has exactly the expected keys and shapes, all finite."""
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        raise AdapterMismatch(f"adapter keys differ: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, tensor in state.items():
        if tuple(tensor.shape) != expected[name]:
            raise AdapterMismatch(f"{name}: shape {tuple(tensor.shape)}, expected {expected[name]}")
        if not torch.isfinite(tensor).all():
            raise AdapterMismatch(f"{name}: non-finite values")


def backbone_bytes(model: Forecaster) -> int:
    """Size of the full pretrained file's tensors (all blocks), which never travel."""
    full, _ = load_pretrained(model.cfg.backbone)
    return sum(p.numel() * p.element_size() for p in full.parameters())


def fsync_path(path: Path) -> None:
    """Flushes a file, or a directory's entries, to disk: a rename survives a power cut only once its directory is synced."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def write_atomically(path: Path, write: Callable[[Path], None], previous: Path | None = None) -> None:
    """`write(staged)` fills a sibling of `path` (a file or a directory), which is fsynced and then renamed
    over `path`: readers see the old version or the complete new one. A directory, or any `path` whose
    old version is kept as `previous`, takes two renames; a crash between them leaves `path` absent,
    the old version complete at `previous` (or `.<name>.old`) and the new one under `.<name>.partial`."""
    staged, old = path.with_name(f".{path.name}.partial"), previous or path.with_name(f".{path.name}.old")
    _remove(staged)
    write(staged)
    for item in [*staged.rglob("*"), staged] if staged.is_dir() else [staged]:
        fsync_path(item)
    if path.exists() and (previous is not None or staged.is_dir()):
        _remove(old)
        os.replace(path, old)
    os.replace(staged, path)
    fsync_path(path.parent)
    if previous is None:
        _remove(old)


def replace_files(directory: Path, write: Callable[[Path], None]) -> None:
    """`write(staged)` fills a sibling folder, whose files are each fsynced and renamed over their namesakes
    in `directory`: unlike replacing the folder whole, files there that `write` does not make stay."""
    staged = directory.with_name(f".{directory.name}.partial")
    _remove(staged)
    write(staged)
    for item in sorted(staged.rglob("*")):
        if item.is_file():
            target = directory / item.relative_to(staged)
            target.parent.mkdir(parents=True, exist_ok=True)
            fsync_path(item)
            os.replace(item, target)
    fsync_path(directory)
    fsync_path(directory.parent)
    shutil.rmtree(staged)  # only the emptied folders this function made are left in it


def save_adapter(model: Forecaster, directory: str | Path, meta: dict[str, Any] | None = None) -> Path:
    """Writes or replaces the adapter's parts; other files in `directory` (the CLI keeps its metrics and plots there) stay."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in adapter_state(model).items()}
    write_atomically(directory / "adapter.safetensors", lambda path: save_file(state, str(path)))
    if (lora := model.lora_model()) is not None:
        replace_files(directory / "lora", lambda path: lora.save_pretrained(str(path)))
    info = {"model": dataclasses.asdict(model.cfg), "shape": dataclasses.asdict(model.shape), **(meta or {})}
    write_atomically(directory / "meta.json", lambda path: path.write_text(json.dumps(info, indent=2, default=str)))
    return directory


def load_adapter(model: Forecaster, directory: str | Path) -> dict[str, Any]:
    """Loads an adapter directory into `model`; returns its meta.json."""
    directory = Path(directory)
    load_adapter_state(model, load_file(str(directory / "adapter.safetensors")))
    return json.loads((directory / "meta.json").read_text())
