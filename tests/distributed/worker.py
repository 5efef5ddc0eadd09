"""Multi-process worker: wrap the tiny adapted model with an engine, read/write adapters through its access.

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
"""
from __future__ import annotations

import datetime
import os
import sys
import time
import traceback

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from dist_case import (BETAS, EPS, LR, adapter_layers, adapter_params, build_model, forward,  # noqa: E402
                       rank_batch, tracker_sums, trainable_names, write_grad_zeros, write_zeros)

from scale_rank.engine_shards import shard_access  # noqa: E402

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


class Engine:
    """One wrapped model: forward module, access, step, and full-tensor gathering."""

    def __init__(self, kind: str, model, rank: int, world_size: int):
        self.kind, self.model, self.rank, self.world_size = kind, model, rank, world_size
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = None
        if kind == "ddp":
            from torch.nn.parallel import DistributedDataParallel
            self.module = DistributedDataParallel(model)
            self.access = shard_access("ddp", self.module, rank, world_size)
        elif kind in ("fsdp2", "fsdp2_hsdp"):
            from torch.distributed.fsdp import fully_shard
            mesh = None
            if kind == "fsdp2_hsdp":  # 2 replicas x (world/2) shards: placements (Replicate(), Shard(0))
                mesh = _hybrid_mesh(world_size)
            for layer in model.bert.encoder.layer:
                fully_shard(layer, mesh=mesh)
            self.module = fully_shard(model, mesh=mesh)
            self.access = shard_access("fsdp2", self.module, rank, world_size)
        elif kind == "fsdp1_hybrid":  # HYBRID_SHARD: 2 replicas x (world/2) shards
            from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
            from torch.distributed.fsdp.wrap import ModuleWrapPolicy
            from transformers.models.bert.modeling_bert import BertLayer
            mesh = _hybrid_mesh(world_size)
            self.module = FullyShardedDataParallel(model, use_orig_params=True, device_id=torch.device("cpu"),
                                                   auto_wrap_policy=ModuleWrapPolicy({BertLayer}),
                                                   sharding_strategy=ShardingStrategy.HYBRID_SHARD,
                                                   device_mesh=mesh)
            self.access = shard_access("fsdp1", self.module, rank, world_size)
        elif kind == "fsdp1":
            from torch.distributed.fsdp import FullyShardedDataParallel
            from torch.distributed.fsdp.wrap import ModuleWrapPolicy

            from scale_rank.layer import AdaptiveLoRALayer
            # base linears wrapped apart: each adapter's flat parameter is [A, B, lam], and the shard
            # boundary falls inside A or B (a slice that starts mid-parameter on rank 1)
            policy = ModuleWrapPolicy({AdaptiveLoRALayer, torch.nn.Linear})
            self.module = FullyShardedDataParallel(model, use_orig_params=True, device_id=torch.device("cpu"),
                                                   auto_wrap_policy=policy)
            self.access = shard_access("fsdp1", self.module, rank, world_size)
        elif kind in DEEPSPEED:
            import deepspeed
            zero = DEEPSPEED[kind]
            params = {"lr": LR, "betas": list(BETAS), "eps": EPS, "weight_decay": 0.0}
            if "offload_optimizer" not in zero:
                params["torch_adam"] = True  # no JIT-built fused Adam on CPU
            config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
                      "zero_optimization": zero, "optimizer": {"type": "AdamW", "params": params},
                      "fp16": {"enabled": False}, "bf16": {"enabled": kind.endswith("bf16")},
                      "steps_per_print": 10 ** 9}
            if kind.endswith("bf16"):  # the adapter's `active` buffer must match the bf16 parameters
                config["data_types"] = {"buffer_dtype": "bf16"}
            self.module, self.optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=trainable,
                                                                     config=config)
            self.access = shard_access("deepspeed", self.module, rank, world_size)
            if kind in COPYING:
                self.access = _Copying(self.access)
        else:
            raise ValueError(kind)
        if self.optimizer is None:  # built after wrapping: fully_shard replaces the parameters
            trainable = [p for p in self.module.parameters() if p.requires_grad]
            self.optimizer = torch.optim.AdamW(trainable, lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0)

    @property
    def deepspeed(self) -> bool:
        return self.kind in DEEPSPEED

    def backward(self, loss) -> None:
        if self.deepspeed:
            self.module.backward(loss)
        else:
            loss.backward()

    def step(self) -> None:
        if self.deepspeed:
            self.module.step()
        else:
            self.optimizer.step()
            self.optimizer.zero_grad()

    def full_params(self) -> dict[str, torch.Tensor]:
        """Every trainable parameter, whole (the model copy the forward uses)."""
        names = trainable_names()
        out = {}
        if self.kind.startswith("fsdp1"):
            from torch.distributed.fsdp import FullyShardedDataParallel
            with FullyShardedDataParallel.summon_full_params(self.module):
                for name, p in self.module.named_parameters():
                    if clean(name) in names:
                        out[clean(name)] = p.detach().clone()
        elif self.deepspeed and DEEPSPEED[self.kind]["stage"] == 3:
            import deepspeed
            named = [(clean(n), p) for n, p in self.model.named_parameters() if clean(n) in names]
            with deepspeed.zero.GatheredParameters([p for _, p in named]):
                for name, p in named:
                    out[name] = p.detach().clone().reshape(p.ds_shape)
        else:
            for name, p in self.model.named_parameters():
                if clean(name) in names:
                    p = p.full_tensor() if hasattr(p, "full_tensor") else p
                    out[clean(name)] = p.detach().clone()
        return out

    def master_params(self) -> dict[str, torch.Tensor]:
        """DeepSpeed's fp32 master copy of every trainable parameter, whole."""
        from deepspeed.utils import safe_get_full_fp32_param
        names = trainable_names()
        return {clean(n): safe_get_full_fp32_param(p).detach().clone()
                for n, p in self.model.named_parameters() if clean(n) in names}


def _hybrid_mesh(world_size: int):
    """2 replica groups of world/2 ranks. With 1 rank per shard group FSDP1 silently switches to NO_SHARD
    within it and never reduces across replicas, so hybrid runs need 4 processes."""
    from torch.distributed.device_mesh import init_device_mesh
    if world_size < 4 or world_size % 2:
        raise ValueError(f"hybrid sharding runs need 4 processes (2 replicas x 2 shards), not {world_size}")
    return init_device_mesh("cpu", (2, world_size // 2), mesh_dim_names=("replicate", "shard"))


def gather(obj):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def run_engine(kind: str, out_dir: str, rank: int, world_size: int) -> None:
    start = time.time()
    model, method = build_model()
    engine = Engine(kind, model, rank, world_size)
    access = engine.access
    layers = adapter_layers(model)
    input_ids, labels = rank_batch(rank, world_size)

    # one backward on this rank's half of the global batch
    engine.backward(forward(engine.module, input_ids, labels)[0])

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

    # (b) tracker partial sums, all-reduced
    sums = tracker_sums(method, layers, access)
    dist.all_reduce(sums)

    # (c) a gradient write before the step (grad lam[1] = 0), the optimizer step, then a value write
    # through storage/write: lam[0] = 0 and A[1, :] = 0 in every module
    write_grad_zeros(access, layers)
    engine.step()
    counted = getattr(access, "inner", access)
    calls = getattr(counted, "collective_calls", 0)
    with access.deferred_writes():  # as the controller applies a decision: one refresh for all modules
        write_zeros(access, layers)
    refreshes = getattr(counted, "collective_calls", 0) - calls
    written = engine.full_params()
    master = engine.master_params() if engine.deepspeed else None
    loss, logits = forward(engine.module, input_ids, labels)
    engine.backward(loss)
    logits = logits.detach().float().cpu().clone()
    engine.step()
    stepped = engine.full_params()
    logits = torch.cat(gather(logits))
    if rank == 0:
        torch.save({"slices": {n: [s[n] for s in slices] for n in mine},
                    "storage": {n: [s[n] for s in storage] for n in ranges},
                    "sums": sums.cpu(), "written": written, "master": master, "logits": logits,
                    "stepped": stepped, "persistent": persistent, "attached": attached, "refreshes": refreshes,
                    "seconds": time.time() - start},
                   os.path.join(out_dir, f"{kind}.pt"))
    if engine.deepspeed:
        engine.module.destroy()


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
