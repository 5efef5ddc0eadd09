"""DeepSpeed config files: "auto" values filled from the training config (as the HF Trainer does)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .config import ConfigError, TrainConfig


def micro_batch_size(cfg: TrainConfig, world_size: int) -> int:
    per_step = world_size * cfg.grad_accum
    if cfg.batch_size % per_step:
        raise ConfigError(f"train.batch_size ({cfg.batch_size}) must be divisible by world size ({world_size}) x "
                          f"train.grad_accum ({cfg.grad_accum}); choose a multiple of {per_step}")
    return cfg.batch_size // per_step


def load_ds_config(path: str | Path, cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"DeepSpeed config {path} does not exist (see ds_configs/)")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"DeepSpeed config {path} is not valid JSON: {error}") from error
    wanted = {
        "train_batch_size": cfg.batch_size,
        "train_micro_batch_size_per_gpu": micro_batch_size(cfg, world_size),
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.max_grad_norm,  # DeepSpeed clips inside engine.step(), 0 = off
    }
    for key, value in wanted.items():
        _fill(ds, [key], value, path)
    optimizer = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    params = optimizer.setdefault("params", {})
    _fill(params, ["lr"], cfg.lr, path, "optimizer.params.")
    _fill(params, ["weight_decay"], cfg.weight_decay, path, "optimizer.params.")
    for precision, key in (("bf16", "bf16"), ("fp16", "fp16")):
        section = ds.setdefault(key, {})
        _fill(section, ["enabled"], cfg.precision == precision, path, key + ".")
    ds.pop("scheduler", None)  # the run's own schedule drives every engine alike
    return ds


def _fill(section: dict, keys: list[str], value: Any, path: Path, prefix: str = "") -> None:
    key = keys[0]
    current = section.get(key, "auto")
    if current == "auto":
        section[key] = value
    elif current != value:
        raise ConfigError(f"{path} sets {prefix}{key} = {current!r} but the run asks for {value!r}: set it to "
                          f"\"auto\" in the DeepSpeed config, or change the command line to match")
