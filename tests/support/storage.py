"""What one rank actually stores of a wrapped model: bytes of its frozen base, dtypes of what trains."""
from __future__ import annotations

import torch
from torch import nn

ADAPTER_TAGS = (".lora_A", ".lora_B", ".lora_lam")


def is_adapter(name: str) -> bool:
    return any(tag in name for tag in ADAPTER_TAGS)


def fsdp1_numels(model: nn.Module) -> dict[int, tuple[int, int]]:
    """id(original parameter) -> (elements of it in this rank's FlatParameter shard, elements in all) under
    FSDP1 (its use_orig_params views show only this rank's piece); {} for other engines."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    numels = {}
    for module in FSDP.fsdp_modules(model):
        if module._handle is None:
            continue
        flat = module._handle.flat_param
        for param, info, total in zip(flat._params, flat._shard_param_infos, flat._numels):
            numels[id(param)] = (info.numel_in_shard if info.in_shard else 0, total)
    return numels


def fsdp1_flat_dtypes(model: nn.Module) -> list[tuple[torch.dtype, tuple[torch.dtype, ...]]]:
    """(local shard dtype, dtypes of its original parameters) of every FSDP1 FlatParameter of `model`."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    out = []
    for module in FSDP.fsdp_modules(model):
        if module._handle is not None:
            flat = module._handle.flat_param
            out.append((flat._local_shard.dtype, tuple(sorted({p.dtype for p in flat._params}, key=str))))
    return out


def held_bytes(param: torch.Tensor, fsdp1: dict[int, tuple[int, int]]) -> int:
    """Bytes of `param` this rank stores: its FSDP1 shard, its FSDP2 local rows (DTensor), or all of it."""
    if id(param) in fsdp1:
        return fsdp1[id(param)][0] * param.element_size()
    local = param.to_local() if hasattr(param, "to_local") else param
    return local.numel() * local.element_size()


def total_numel(param: torch.Tensor, fsdp1: dict[int, tuple[int, int]]) -> int:
    """Elements of the whole parameter (a DTensor's numel is already global)."""
    return fsdp1[id(param)][1] if id(param) in fsdp1 else param.numel()


def storage_report(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """This rank's frozen-base bytes and parameter count (whole model), and the dtypes of the frozen base,
    the adapters, the other trainable parameters (heads) and the AdamW moments."""
    fsdp1 = fsdp1_numels(model)
    named = [(n, p) for n, p in model.named_parameters() if not n.endswith("_flat_param")]
    base = [p for n, p in named if not p.requires_grad and not is_adapter(n)]
    return {
        "base_bytes": sum(held_bytes(p, fsdp1) for p in base),
        "base_numel": sum(total_numel(p, fsdp1) for p in base),
        "base_dtypes": sorted({str(p.dtype) for p in base}),
        "adapter_dtypes": sorted({str(p.dtype) for n, p in named if is_adapter(n)}),
        "head_dtypes": sorted({str(p.dtype) for n, p in named if p.requires_grad and not is_adapter(n)}),
        "moment_dtypes": sorted({str(s[k].dtype) for s in optimizer.state.values() for k in ("exp_avg", "exp_avg_sq")
                                 if k in s}),
        "flat_dtypes": [(str(local), [str(d) for d in orig]) for local, orig in fsdp1_flat_dtypes(model)],
    }

