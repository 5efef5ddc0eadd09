"""Worker: train every requested method through scale_rank.train under one engine, recording each step's
global mask and loss on this rank, and what the rank stores at the end.  Usage (under torchrun):
    equivalence_worker.py OUT_DIR ENGINE MODEL_DIR QUANTIZATION METHOD [METHOD ...] [-- SECTION.KEY=VALUE ...]
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from scale_rank.config import load_config
from scale_rank.engine import exit_processes
from scale_rank.train import train
from tests.support.storage import storage_report
from tests.support.tiny import overrides

STEPS = 10


def engine_overrides(engine: str) -> list[str]:
    if engine in ("zero2", "zero3", "zero3_offload"):
        return [f"train.deepspeed_config=ds_configs/{engine}.json"]
    if engine.endswith("_hybrid"):  # 2 replicas x 2 shards (4 processes)
        return [f"train.engine={engine.removesuffix('_hybrid')}", "train.fsdp_shard_size=2"]
    return [f"train.engine={engine}"]


def recorder(record: dict):
    """An observer that appends each step's global mask, loss and (on rank 0) decision scores to `record`."""
    def observe(step, controller, loss):
        record["masks"].append(controller.method.mask.clone())
        record["losses"].append(loss)
        scores = controller.method.last_scores
        record["scores"].append(torch.zeros(0) if scores is None else scores.double().cpu().clone())
        regularizer = controller.method.regularizer
        record["regularizer_hooks"] = len(regularizer.handles) if regularizer is not None else 0
    return observe


def sharding(engine) -> str:
    """How the first trainable parameter is laid out: FSDP2's mesh shape, FSDP1's strategy, else the kind."""
    if engine.kind == "fsdp2":
        param = next(p for p in engine.model.parameters() if p.requires_grad)
        return f"mesh {tuple(param.device_mesh.shape)}"
    if engine.kind == "fsdp1":
        return str(engine.model.sharding_strategy.name)
    return engine.kind


def main() -> int:
    args = sys.argv[1:]
    extra = args[args.index("--") + 1:] if "--" in args else []
    out_dir, engine, model_dir, quantization, *methods = args[:args.index("--")] if extra else args
    out_dir = Path(out_dir)
    for method in methods:
        items = overrides(Path(model_dir), out_dir / f"{engine}_{method}", method, steps=STEPS)
        items += engine_overrides(engine) + [f"model.quantization={quantization}"] + extra
        record = {"masks": [], "losses": [], "scores": []}
        result = train(load_config(None, items), progress=False, observer=recorder(record))
        record["sharding"] = sharding(result.engine)
        record["storage"] = storage_report(result.engine.model, result.engine.optimizer)
        rank = dist.get_rank() if dist.is_initialized() else 0
        torch.save(record, out_dir / f"{engine}_{method}_rank{rank}.pt")
    return 0


if __name__ == "__main__":
    exit_processes(main())
