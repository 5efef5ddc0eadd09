"""Multi-process worker: wrap the tiny adapted model in the library's engine classes, read/write adapters through
its access.

    torchrun --nproc_per_node 2 tests/distributed/worker.py OUT_DIR ENGINE [ENGINE ...]   (4 for *_hsdp / *_hybrid)

Engines run one after the other in the same process group. Per engine, rank 0 writes OUT_DIR/<engine>.pt
(each failing rank writes OUT_DIR/<engine>.error.rank<r>.txt and the next engine runs):
  slices   {name: [(start, end, values, grad) per rank]}    scoring slices after one backward
  storage  {name: [(start, end) per rank]}                   storage ranges (for the report)
  sums     tracker partial sums all-reduced over the ranks (one update)
  written  {name: full tensor} after the optimizer step and a write (zero lam[0] and A[1, :])
  master   {name: full fp32 master} at the same point (DeepSpeed only)
  logits   full-batch logits of the forward right after the write (rank halves concatenated)
  stepped  {name: full tensor} after one more backward and optimizer step
  persistent {name: bool}  ZeRO-3 kept the parameter whole on every rank (under the persistence threshold)
  attached {name: bool} per rank  a storage or scoring slice (values or grad) requires grad (it must not)
  grad_storage  DDP only, after the first backward: gradients, how many are views, their bytes, their
                storages' bytes
"""
from __future__ import annotations

import datetime
import json
import os
import sys
import time
import traceback

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from dist_case import (BETAS, EPS, GLOBAL_BATCH, LR, adapter_layers, adapter_params, build_model,  # noqa: E402
                       forward, rank_batch, tracker_sums, trainable_names, write_grad_zeros, write_zeros)

from scale_rank.config import TrainConfig  # noqa: E402
from scale_rank.engine import ProcessInfo  # noqa: E402
from scale_rank.engines import FSDP1Engine, make_engine  # noqa: E402

DEEPSPEED = {  # engine -> zero_optimization
    "zero1": {"stage": 1},
    "zero2": {"stage": 2},
    "zero2_offload": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
    # 100: lam (12 elements) and the classifier stay whole on every rank, A and B are partitioned
    "zero3": {"stage": 3, "stage3_param_persistence_threshold": 100},
    "zero3_offload": {"stage": 3, "stage3_param_persistence_threshold": 100,
                      "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"}},
    "zero2_bf16": {"stage": 2},
    "zero3_bf16": {"stage": 3, "stage3_param_persistence_threshold": 100},
}


# slices are copies here, as on a GPU when DeepSpeed keeps the master copy on the CPU: write() must copy back
COPYING = ("zero1", "zero3_offload")


class _Copying:
    """Wraps an access so that storage() hands out copies instead of views."""

    whole_tensors = stores_whole = False  # copies, never the parameters themselves

    def resident_groups(self, layers):
        return self.inner.resident_groups(layers)

    def ensure_present(self, params):
        self.inner.ensure_present(params)

    def __init__(self, inner):
        self.inner, self.rank, self.world_size = inner, inner.rank, inner.world_size

    def storage(self, param):
        from scale_rank.shards import LocalSlice
        local = self.inner.storage(param)
        return LocalSlice(local.start, local.end, local.values.clone(),
                          None if local.grad is None else local.grad.clone())

    def scoring(self, param):
        return self.inner.scoring(param)

    def write(self, param, local):
        self.inner.write(param, local)

    def deferred_writes(self):
        return self.inner.deferred_writes()


def clean(name: str) -> str:
    return name.replace("_fsdp_wrapped_module.", "")


class SplitUnitsFSDP1(FSDP1Engine):
    """FSDP1 with the base linears wrapped apart: each adapter's flat parameter is [A, B, lam], and the shard
    boundary falls inside A or B (a slice that starts mid-parameter on rank 1)."""

    def units(self, model):
        from scale_rank.layer import AdaptiveLoRALayer
        return {m for m in model.modules() if isinstance(m, (AdaptiveLoRALayer, torch.nn.Linear))}


def train_config(kind: str) -> TrainConfig:
    """AdamW at LR with the reference's betas and eps (torch's defaults), no weight decay, a constant lr."""
    assert (BETAS, EPS) == ((0.9, 0.999), 1e-8), "the engines build AdamW with torch's default betas and eps"
    return TrainConfig(lr=LR, weight_decay=0.0, warmup_steps=0, lr_schedule="constant", batch_size=GLOBAL_BATCH,
                       precision="bf16" if kind.endswith("bf16") else "fp32")


def ds_config_file(kind: str, out_dir: str, rank: int) -> str:
    """This engine's DeepSpeed JSON, written for this rank; the run's values fill the rest (load_ds_config)."""
    zero = DEEPSPEED[kind]
    params = {"betas": list(BETAS), "eps": EPS}
    if "offload_optimizer" not in zero:
        params["torch_adam"] = True  # no JIT-built fused Adam on CPU
    config = {"zero_optimization": zero, "optimizer": {"type": "AdamW", "params": params},
              "steps_per_print": 10 ** 9}
    if kind.endswith("bf16"):  # the adapter's `active` buffer must match the bf16 parameters
        config["data_types"] = {"buffer_dtype": "bf16"}
    path = os.path.join(out_dir, f"{kind}.ds_config.rank{rank}.json")
    with open(path, "w") as f:
        json.dump(config, f)
    return path


def build_engine(kind: str, model, out_dir: str, rank: int, world_size: int):
    """The library's engine class for `kind` around `model` (a DeepSpeed stage, a hybrid FSDP, or FSDP1 with
    split units), its optimizer over every trainable parameter."""
    proc = ProcessInfo(rank, world_size, int(os.environ.get("LOCAL_RANK", rank)), torch.device("cpu"))
    groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    args = (model, groups, train_config(kind), 100, proc)
    if kind in DEEPSPEED:
        return make_engine("deepspeed", *args, ds_config_path=ds_config_file(kind, out_dir, rank))
    if kind == "fsdp1":
        return SplitUnitsFSDP1(*args)
    if kind in ("fsdp2_hsdp", "fsdp1_hybrid"):  # 2 replicas x (world/2) shards
        return make_engine(kind.split("_")[0], *args, shard_size=_hybrid_shard_size(world_size))
    return make_engine(kind, *args)


def _hybrid_shard_size(world_size: int) -> int:
    """2 replica groups of world/2 ranks. With 1 rank per shard group FSDP1 silently switches to NO_SHARD
    within it and never reduces across replicas, so hybrid runs need 4 processes."""
    if world_size < 4 or world_size % 2:
        raise ValueError(f"hybrid sharding runs need 4 processes (2 replicas x 2 shards), not {world_size}")
    return world_size // 2


def step(engine) -> None:
    engine.step()
    engine.zero_grad()


def full_params(kind: str, engine) -> dict[str, torch.Tensor]:
    """Every trainable parameter, whole (the model copy the forward uses)."""
    names = trainable_names()
    out = {}
    if kind.startswith("fsdp1"):
        from torch.distributed.fsdp import FullyShardedDataParallel
        with FullyShardedDataParallel.summon_full_params(engine.model):
            for name, p in engine.model.named_parameters():
                if clean(name) in names:
                    out[clean(name)] = p.detach().clone()
    elif kind in DEEPSPEED and DEEPSPEED[kind]["stage"] == 3:
        import deepspeed
        named = [(clean(n), p) for n, p in engine.module.named_parameters() if clean(n) in names]
        with deepspeed.zero.GatheredParameters([p for _, p in named]):
            for name, p in named:
                out[name] = p.detach().clone().reshape(p.ds_shape)
    else:
        for name, p in engine.module.named_parameters():
            if clean(name) in names:
                p = p.full_tensor() if hasattr(p, "full_tensor") else p
                out[clean(name)] = p.detach().clone()
    return out


def master_params(engine) -> dict[str, torch.Tensor]:
    """DeepSpeed's fp32 master copy of every trainable parameter, whole."""
    from deepspeed.utils import safe_get_full_fp32_param
    names = trainable_names()
    return {clean(n): safe_get_full_fp32_param(p).detach().clone()
            for n, p in engine.module.named_parameters() if clean(n) in names}


def gather(obj):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def ddp_grad_storage(engine) -> dict[str, int]:
    """How DDP stores the gradients: how many, how many are views, their bytes, the bytes of their storages."""
    grads = [p.grad for p in engine.model.parameters() if p.requires_grad and p.grad is not None]
    storages = {g.untyped_storage().data_ptr(): g.untyped_storage().nbytes() for g in grads}
    return {"grads": len(grads), "views": sum(g._is_view() for g in grads),
            "grad_bytes": sum(g.numel() * g.element_size() for g in grads), "storage_bytes": sum(storages.values())}


def run_engine(kind: str, out_dir: str, rank: int, world_size: int) -> None:
    start = time.time()
    model, method = build_model()
    engine = build_engine(kind, model, out_dir, rank, world_size)
    access = _Copying(engine.access) if kind in COPYING else engine.access
    layers = adapter_layers(model)
    input_ids, labels = rank_batch(rank, world_size)

    # one backward on this rank's half of the global batch
    engine.backward(forward(engine.model, input_ids, labels)[0], 1)

    grad_storage = ddp_grad_storage(engine) if kind == "ddp" else None

    # (a) scoring slices of every A / B / lam value and gradient, and storage ranges
    mine, ranges, attached = {}, {}, {}
    for name, param in adapter_params(model).items():
        local = access.scoring(param)
        grad = None if local.grad is None else local.grad.detach().float().cpu().clone()
        mine[name] = (local.start, local.end, local.values.detach().float().cpu().clone(), grad)
        held = access.storage(param)
        ranges[name] = (held.start, held.end)
        attached[name] = any(t is not None and t.requires_grad
                             for t in (local.values, local.grad, held.values, held.grad))
    slices, storage, attached = gather(mine), gather(ranges), gather(attached)
    persistent = {name: bool(getattr(p, "ds_persist", False)) for name, p in adapter_params(model).items()}
    groups = [[layers[index].site for index in group] for group in access.resident_groups(layers)]

    # (b) tracker partial sums, all-reduced
    sums = tracker_sums(method, layers, access)
    dist.all_reduce(sums)

    # (c) a gradient write before the step (grad lam[1] = 0), the optimizer step, then a value write
    # through storage/write: lam[0] = 0 and A[1, :] = 0 in every module
    write_grad_zeros(access, layers)
    step(engine)
    counted = getattr(access, "inner", access)
    calls = getattr(counted, "collective_calls", 0)
    with access.deferred_writes():  # as the controller applies a decision: one refresh for all modules
        write_zeros(access, layers)
    refreshes = getattr(counted, "collective_calls", 0) - calls
    written = full_params(kind, engine)
    master = master_params(engine) if kind in DEEPSPEED else None
    loss, logits = forward(engine.model, input_ids, labels)
    engine.backward(loss, 1)
    logits = logits.detach().float().cpu().clone()
    step(engine)
    stepped = full_params(kind, engine)
    logits = torch.cat(gather(logits))
    if rank == 0:
        torch.save({"slices": {n: [s[n] for s in slices] for n in mine},
                    "storage": {n: [s[n] for s in storage] for n in ranges},
                    "sums": sums.cpu(), "written": written, "master": master, "logits": logits,
                    "stepped": stepped, "persistent": persistent, "attached": attached, "refreshes": refreshes,
                    "groups": groups, "grad_storage": grad_storage, "seconds": time.time() - start},
                   os.path.join(out_dir, f"{kind}.pt"))
    if kind in DEEPSPEED:
        engine.model.destroy()


def main() -> None:
    out_dir, engines = sys.argv[1], sys.argv[2:]
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank, world_size = dist.get_rank(), dist.get_world_size()
    failed = 0
    for kind in engines:
        try:
            run_engine(kind, out_dir, rank, world_size)
        except Exception:  # noqa: BLE001 - reported to the pytest side, next engine runs
            failed = 1
            with open(os.path.join(out_dir, f"{kind}.error.rank{rank}.txt"), "w") as f:
                f.write(traceback.format_exc())
            traceback.print_exc()
        dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(failed)


if __name__ == "__main__":
    main()
