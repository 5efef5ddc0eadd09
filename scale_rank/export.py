"""Export trained adapters: a plain PEFT LoRA adapter, a merged transformers model, or a saved run.

PEFT export (`export_peft`) writes adapter_config.json + adapter_model.safetensors in the format that
`peft.PeftModel.from_pretrained` loads (checked against peft 0.21's own `save_pretrained`):

    base_model.model.<module>.lora_A.weight    (r_k x d_in)   for every adapted module with rank r_k > 0
    base_model.model.<module>.lora_B.weight    (d_out x r_k)  (also for Conv1D bases: fan_in_fan_out only
                                                               transposes the base weight, not A / B)
    base_model.model.<head>.<param>            every tensor of `<head>.state_dict()` for modules_to_save
                                                (PEFT strips the "modules_to_save.default" part on save)

Every adapter component with a non-zero gate (lam * active) is kept; the gate and the layer's `scale` are
folded into A (A' = (gate * scale)[keep, None] * A[keep], B' = B[:, keep]), so B' A' is exactly the trained
delta. rank_pattern holds every module's rank and alpha_pattern equals it, and the global r and lora_alpha
are equal too (the largest rank), so every module's PEFT scaling alpha / r is exactly 1, also for loaders
that apply one global lora_alpha / r (vLLM). Modules whose rank is 0 are left out entirely.

Run export (`export_run`) rebuilds the model of a run directory written by the training loop:

    run_dir/run_config.yaml              the RunConfig (scale_rank.config.load_config)
    run_dir/final/trainable.safetensors  `save_trainable(model, run_dir / "final")`
    run_dir/final/meta.json              {"num_labels": int, "base_model": str}
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from .config import ConfigError
from .layer import AdaptiveLoRALayer
from .run_dir import CONFIG_FILE

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TRAINABLE_FILE = "trainable.safetensors"
META_FILE = "meta.json"
PEFT_PREFIX = "base_model.model."  # PEFT's key prefix for a PeftModel around a transformers model

log = logging.getLogger(__name__)

_ADAPTER_TENSORS = ("lora_A", "lora_B", "lora_lam", "active", "scale")

# Model class name suffix -> PEFT task type, used when export_peft is not told the task type.
_TASK_TYPES = {"ForSequenceClassification": "SEQ_CLS", "ForCausalLM": "CAUSAL_LM", "LMHeadModel": "CAUSAL_LM",
               "ForTokenClassification": "TOKEN_CLS", "ForQuestionAnswering": "QUESTION_ANS",
               "ForConditionalGeneration": "SEQ_2_SEQ_LM"}


# ---------------------------------------------------------------------------------------------------
# Reading the adapted model
# ---------------------------------------------------------------------------------------------------


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP / DataParallel / torch.compile wrappers (their state_dict keys carry prefixes)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def named_adapters(model: nn.Module) -> list[tuple[str, AdaptiveLoRALayer]]:
    """(module name in `model`, adapter layer) for every adapter, in model order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, AdaptiveLoRALayer)]


def folded_lora(layer: AdaptiveLoRALayer) -> tuple[torch.Tensor, torch.Tensor]:
    """(A', B') of plain LoRA with scaling 1: B' A' == layer.delta_weight(), zero-gate components dropped.

    A' is (rank x d_in), B' is (d_out x rank), both on the CPU in the adapter's dtype; the fold is done in
    float32.
    """
    multiplier = layer.multiplier()
    keep = multiplier.ne(0).nonzero().squeeze(1)
    A = layer.lora_A.detach().float()[keep] * multiplier[keep, None]
    B = layer.lora_B.detach().float()[:, keep]
    dtype = layer.lora_A.dtype
    return A.to(dtype).cpu().contiguous(), B.to(dtype).cpu().contiguous()


def fully_trained_modules(model: nn.Module) -> list[str]:
    """Names of the modules trained in full next to the adapters (PEFT's modules_to_save), e.g. "classifier".

    A module qualifies when it owns a parameter that requires grad and is not part of an adapter; it is
    widened to its largest ancestor whose parameters all train and that holds no adapter (a RoBERTa-style
    "classifier" with "dense" and "out_proj" children is saved as one module).
    """
    adapters = [name for name, _ in named_adapters(model)]
    modules = dict(model.named_modules())

    def inside_adapter(name: str) -> bool:
        return any(name == a or name.startswith(a + ".") for a in adapters)

    def holds_adapter(name: str) -> bool:
        return any(a.startswith(name + ".") for a in adapters)

    def all_train(name: str) -> bool:
        return all(p.requires_grad for p in modules[name].parameters())

    owners: list[str] = []
    for pname, param in model.named_parameters():
        if not param.requires_grad or inside_adapter(pname):
            continue
        owner = pname.rpartition(".")[0]
        if owner == "" or holds_adapter(owner):
            raise ValueError(f"trainable parameter {pname!r} belongs to a module that cannot be saved whole "
                             "next to adapters; train only task heads (model.trainable) in full")
        while "." in owner:
            parent = owner.rpartition(".")[0]
            if holds_adapter(parent) or not all_train(parent):
                break
            owner = parent
        if owner not in owners:
            owners.append(owner)
    return [n for n in owners if not any(n.startswith(o + ".") for o in owners if o != n)]


def _original_module_names(model: nn.Module) -> list[str]:
    """Module names as the unadapted model has them (an adapter stands for the module it wraps)."""
    adapters = [name for name, _ in named_adapters(model)]
    return [name for name, _ in model.named_modules()
            if name and not any(name.startswith(a + ".") for a in adapters)]


def _check_unambiguous(model: nn.Module, targets: list[str], heads: list[str]) -> None:
    """PEFT matches target_modules by "." suffix and modules_to_save by plain suffix: each must hit one module."""
    names = _original_module_names(model)
    for target in targets:
        hits = [n for n in names if n == target or n.endswith("." + target)]
        if hits != [target]:
            raise ValueError(f"target module {target!r} also matches {[h for h in hits if h != target]} under "
                             "PEFT's suffix matching; the export would load wrongly")
    for head in heads:
        hits = [n for n in names if n.endswith(head) or (PEFT_PREFIX + n).endswith(head)]
        if hits != [head]:
            raise ValueError(f"module to save {head!r} also matches {[h for h in hits if h != head]} under "
                             "PEFT's suffix matching; the export would load wrongly")


def _infer_task_type(model: nn.Module) -> str | None:
    name = type(model).__name__
    return next((task for suffix, task in _TASK_TYPES.items() if name.endswith(suffix)), None)


def _base_name(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", None) or getattr(model, "name_or_path", None)
    return str(name) if name else None


def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    # clone: safetensors refuses tensors that share storage (tied weights), and wants contiguous CPU data
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, str(path),
              metadata={"format": "pt"})


# ---------------------------------------------------------------------------------------------------
# PEFT adapter export
# ---------------------------------------------------------------------------------------------------


def export_peft(model: nn.Module, out_dir: str | Path, base_model_name_or_path: str | None = None,
                task_type: str | None = None) -> dict:
    """Write `model`'s adapters as a plain PEFT LoRA adapter (adapter_config.json, adapter_model.safetensors).

    `model` is the adapted model itself (not merged; DDP / compile wrappers are unwrapped, a sharded model
    must be gathered first). `base_model_name_or_path` defaults to the model config's `_name_or_path`;
    `task_type` (PEFT's, e.g. "SEQ_CLS") defaults to one inferred from the model class, else none.

    Returns {"out_dir", "r", "ranks": {module: rank > 0}, "omitted": [rank-0 modules],
    "modules_to_save", "fan_in_fan_out"}.
    """
    model = unwrap(model)
    adapters = named_adapters(model)
    if not adapters:
        raise ValueError("the model has no scale_rank adapters to export")
    merged = [name for name, layer in adapters if layer.merged]
    if merged:
        raise ValueError(f"adapters {merged[:3]} are merged into their base weights: unmerge() them before "
                         "export_peft, or use export_merged")

    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    omitted: list[str] = []
    conv1d: list[bool] = []
    for name, layer in adapters:
        A, B = folded_lora(layer)
        if A.shape[0] == 0:
            omitted.append(name)
            continue
        ranks[name] = int(A.shape[0])
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = A
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = B
        conv1d.append(not isinstance(layer.base_layer, nn.Linear))
    if not ranks:
        raise ValueError("every adapter has rank 0: there is nothing to export as LoRA (the trained model "
                         "equals its base apart from fully trained heads); use export_merged")

    heads = fully_trained_modules(model)
    for head in heads:
        for key, value in model.get_submodule(head).state_dict().items():
            tensors[f"{PEFT_PREFIX}{head}.{key}"] = value
    _check_unambiguous(model, list(ranks), heads)

    r = max(ranks.values())  # r == lora_alpha: scaling 1 globally; r bounds every module's rank
    dropout = next((layer.dropout.p for _, layer in adapters if isinstance(layer.dropout, nn.Dropout)), 0.0)
    config = {
        "peft_type": "LORA",
        "task_type": task_type if task_type is not None else _infer_task_type(model),
        "base_model_name_or_path": base_model_name_or_path or _base_name(model),
        "r": r,
        "lora_alpha": r,
        "target_modules": list(ranks),
        "rank_pattern": dict(ranks),
        "alpha_pattern": dict(ranks),
        "modules_to_save": heads or None,
        # PEFT also fixes this per module (with a warning) when Linear and Conv1D bases are mixed
        "fan_in_fan_out": all(conv1d),
        "lora_dropout": dropout,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _save_safetensors(tensors, out / ADAPTER_WEIGHTS)
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return {"out_dir": str(out), "r": r, "ranks": ranks, "omitted": omitted, "modules_to_save": heads,
            "fan_in_fan_out": config["fan_in_fan_out"]}


# ---------------------------------------------------------------------------------------------------
# Merged export
# ---------------------------------------------------------------------------------------------------


def merged_base(layer: AdaptiveLoRALayer) -> nn.Module:
    """A copy of the layer's base module with the adapter folded into its weight."""
    base = copy.deepcopy(layer.base_layer)
    if layer.merged:  # the live base weight already holds the delta
        return base
    weight = base.weight
    if not weight.dtype.is_floating_point:
        raise TypeError(f"{layer.site}: cannot merge into a quantized {type(base).__name__} base layer")
    delta = layer.delta_weight()
    if not isinstance(base, nn.Linear):
        delta = delta.t()  # Conv1D stores (d_in, d_out)
    with torch.no_grad():
        weight.copy_((weight.float() + delta.to(weight.device)).to(weight.dtype))
    return base


@contextlib.contextmanager
def merged_view(model: nn.Module) -> Iterator[nn.Module]:
    """Temporarily replace every adapter of `model` by a merged copy of its base layer.

    Only the adapted layers are copied (not the whole model); the adapters are put back on exit, also on
    error, so the live model is unchanged afterwards.
    """
    model = unwrap(model)
    swapped = []
    try:
        for name, layer in named_adapters(model):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, merged_base(layer))
            swapped.append((parent, child, layer))
        yield model
    finally:
        for parent, child, layer in reversed(swapped):
            setattr(parent, child, layer)


def export_merged(model: nn.Module, out_dir: str | Path, tokenizer=None) -> dict:
    """Save `model` with its adapters folded into the base weights as a plain transformers model.

    The result loads with the model's own class (`from_pretrained(out_dir)`) and holds no adapter code;
    `tokenizer` is saved next to it when given. The live model is left as it was.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = [name for name, _ in named_adapters(unwrap(model))]
    with merged_view(model) as plain:
        plain.save_pretrained(str(out))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return {"out_dir": str(out), "merged": names}


# ---------------------------------------------------------------------------------------------------
# Run directories
# ---------------------------------------------------------------------------------------------------


def trainable_keys(model: nn.Module) -> list[str]:
    """state_dict keys a run saves: every trainable parameter plus every adapter's A, B, lam, active, scale."""
    keys = [name for name, p in model.named_parameters() if p.requires_grad]
    seen = set(keys)
    for name, _ in named_adapters(model):
        keys += [f"{name}.{t}" for t in _ADAPTER_TENSORS if f"{name}.{t}" not in seen]
    return keys


def save_trainable(model: nn.Module, directory: str | Path) -> Path:
    """Write directory/trainable.safetensors: the `trainable_keys` entries of the (unwrapped) model's state_dict.

    Call it with the full model (on one process, after gathering a sharded model). Frozen lam vectors are
    written too, so a file is complete whatever a method freezes.
    """
    model = unwrap(model)
    state = model.state_dict()
    missing = [k for k in trainable_keys(model) if k not in state]
    if missing:
        raise ValueError(f"state_dict lacks {missing[:3]}: pass the unwrapped, gathered model")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / TRAINABLE_FILE
    _save_safetensors({k: state[k] for k in trainable_keys(model)}, path)
    return path


def load_trainable(model: nn.Module, path: str | Path) -> None:
    """Load a trainable.safetensors into a freshly built adapted model, refusing incomplete or foreign files.

    Required: every parameter that trains in `model` and every adapter's `active` and `scale`.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise ConfigError(f"{path} is unreadable ({error}): the file is truncated or damaged") from error
    required = [name for name, p in model.named_parameters() if p.requires_grad]
    required += [f"{name}.{t}" for name, _ in named_adapters(model) for t in ("active", "scale")]
    absent = [k for k in required if k not in state]
    if absent:
        raise ValueError(f"{path} lacks {len(absent)} tensor(s) the model trains, e.g. {absent[:3]}: the run "
                         "was saved from a different model / method, or incompletely")
    _, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise ValueError(f"{path} holds {len(unexpected)} tensor(s) the rebuilt model does not have, e.g. "
                         f"{unexpected[:3]}: the run config does not describe the saved model")


def locate_state(path: str | Path) -> tuple[Path, Path]:
    """(run_config.yaml, directory with trainable.safetensors) for a run directory (its final state) or
    one of its checkpoints (run_dir/checkpoints/step_N)."""
    path = Path(path)
    if (path / TRAINABLE_FILE).is_file():
        state_dir = path
        run_dir = path.parent if path.name == "final" else path.parent.parent
    else:
        run_dir, state_dir = path, path / "final"
    for needed in (run_dir / CONFIG_FILE, state_dir / TRAINABLE_FILE, state_dir / META_FILE):
        if not needed.is_file():
            raise ConfigError(f"{needed} is missing: {path} is neither a finished scale_rank run nor one of "
                              "its checkpoints")
    return run_dir / CONFIG_FILE, state_dir


def load_run(run_dir: str | Path) -> tuple[nn.Module, object, dict]:
    """Rebuild the trained model of a run directory or checkpoint: (model, tokenizer, meta).

    Adapters and fully trained heads come from the run; frozen base weights from the base model (a
    random-init base is rebuilt from the run's seed, so it is the one trained on).
    """
    from .config import load_config
    from .model import build_adapted_model

    config_path, final = locate_state(run_dir)
    cfg = load_config(config_path)
    meta = json.loads((final / META_FILE).read_text())
    if cfg.train.total_steps is None:
        # Schedules are not used by an export, but some methods validate that a length exists.
        cfg.train.total_steps = int(meta.get("total_steps") or 10**9)
    # float32 base, whatever the run stored: the rebuilt model runs without autocast, and merges lose nothing
    model, tokenizer, _ = build_adapted_model(cfg, int(meta["num_labels"]), precision="fp32")
    load_trainable(model, final / TRAINABLE_FILE)
    model.eval()
    return model, tokenizer, meta


def export_run(run_dir: str | Path, out_dir: str | Path, merge: bool = False, overwrite: bool = False) -> dict:
    """Export a finished run: a PEFT adapter (default) or, with `merge`, a merged model plus tokenizer.

    `out_dir` must be new or empty unless `overwrite`; the export is written beside it and then renamed
    into place, so it never mixes with files that were there.
    """
    out = Path(out_dir)
    _check_export_target(out, overwrite)
    model, tokenizer, meta = load_run(run_dir)
    staging = out.with_name(f".tmp_{out.name}")
    try:
        shutil.rmtree(staging, ignore_errors=True)
        if merge:
            summary = export_merged(model, staging, tokenizer)
        else:
            summary = export_peft(model, staging, base_model_name_or_path=meta.get("base_model"))
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise ConfigError(f"cannot write the export to {out}: {error.strerror or error}") from error
    summary["out_dir"] = str(out)
    summary["run_dir"] = str(run_dir)
    summary["mode"] = "merged" if merge else "peft"
    return summary


def _check_export_target(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"export target {out} is a file; choose a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"export target {out} is not empty; pass --overwrite to replace it, or choose another "
                          "--out")


__all__ = ["export_peft", "export_merged", "export_run", "save_trainable", "load_trainable", "load_run",
           "folded_lora", "fully_trained_modules", "merged_view", "trainable_keys"]
