"""ShardAccess for every engine: the local slice of an adapter parameter as a flat range, per engine.
Each engine class (`scale_rank.engines`) builds its own access once it has wrapped the model.

`storage(param)` is what this rank holds and what an engine's optimizer updates: decisions are applied
there. `scoring(param)` narrows it so that, across the data-parallel ranks, every element is scored
exactly once. `write(param, local)` stores edited values (and, while the engine still holds them, edited
gradients) back so the optimizer and the next forward see them.

    engine          storage                                             scoring           write
    single / DDP    the whole tensor                                    1/world of it     in place
    FSDP2           the DTensor's local rows (Shard(0))                 = storage (a)     in place
    FSDP1           the use_orig_params view of the flat shard          = storage (b)     in place
    ZeRO-1/2        the rank's fragment of the fp32 master partition    = storage         master, model copy
    ZeRO-3          the rank's fp32 partition (rank * partition size)   = storage         master, partition (c)

(a) replicated mesh dimensions (HSDP) split the local rows among the replicas; a parameter that is not a
    DTensor is whole on every rank and split like DDP.
(b) NO_SHARD keeps whole tensors, split like DDP; HYBRID_SHARD splits each shard among its replicas.
(c) and the whole gathered tensor where ZeRO-3 keeps it (parameters under the persistence threshold).

Slices hold their tensors on the parameter's compute device; where an engine keeps the master copy
elsewhere (optimizer offload to CPU on a GPU run), `storage` copies and `write` copies back.

Collective writes. Under ZeRO-1/2 every rank holds the whole model copy of a trainable parameter while
the fp32 master is partitioned; ZeRO-3 keeps parameters under its persistence threshold whole on every
rank. `DeepSpeedAccess.write` therefore rebuilds that copy from every rank's part, with a collective:
call `write` on every rank, for the same parameters in the same order (edit_local in every method does:
decisions are broadcast and applied to every module on every rank). Inside `deferred_writes()` (the
controller wraps each method call in one) the rebuilds of all written parameters run together at the
block's end: one collective per kind, not one per module. To keep that true for gradient-only
writes (SoRA adds to gradients), `storage` gives an empty, not a missing, gradient on a rank that holds
no fragment while the engine holds gradients.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist
from torch import nn

from .shards import (LocalSlice, WholeTensorAccess, already_present, narrow, one_group, one_group_per_layer,
                     split_range)


# -- helpers ------------------------------------------------------------------------------------------
def _flat(tensor: torch.Tensor) -> torch.Tensor:
    """A 1-D view of `tensor` (a copy only if it is not contiguous; `_store` copies back then)."""
    tensor = tensor.detach()
    return tensor.view(-1) if tensor.is_contiguous() else tensor.reshape(-1)


def _store(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Copy `src` into `dst` unless `src` already is `dst`'s memory."""
    if src.numel() == 0:
        return
    if src.device == dst.device and src.dtype == dst.dtype and src.data_ptr() == dst.data_ptr():
        return
    with torch.no_grad():
        dst.copy_(src.reshape(dst.shape))


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's local tensor (the tensor itself otherwise), without `to_local`'s autograd function."""
    return getattr(tensor, "_local_tensor", tensor)


def _empty_like(param: torch.Tensor, dtype=None) -> torch.Tensor:
    return torch.empty(0, dtype=dtype or param.dtype, device=param.device)


def _replica_split(local: LocalSlice, replica: int, n_replicas: int) -> LocalSlice:
    """Split a slice held identically by `n_replicas` ranks into their disjoint shares."""
    if n_replicas == 1:
        return local
    lo, hi = split_range(local.end - local.start, replica, n_replicas)
    return narrow(local, local.start + lo, local.start + hi)


# -- FSDP2 (torch.distributed.fsdp.fully_shard) ----------------------------------------------------------
class FSDP2Access:
    """Parameters are DTensors sharded on dim 0: the local rows are one contiguous flat range.

    The local tensor is the sharded parameter FSDP2 all-gathers from, and the gradient is a DTensor sharded the
    same way, so edits are in place. Local tensors are read directly (not through `to_local()`, an autograd
    function of about 10 us a call) and their flat views kept, so that a step's reads cost lookups.
    """

    whole_tensors = stores_whole = False  # local shards (ShardAccess)

    def __init__(self, model: nn.Module, rank: int = 0, world_size: int = 1):
        self.model, self.rank, self.world_size = model, rank, world_size
        self._whole = WholeTensorAccess(rank, world_size)
        self._layouts: dict[int, tuple[torch.Size, tuple[int, int, int, int]]] = {}
        self._values: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(param) -> (local tensor, flat view)

    ensure_present = staticmethod(already_present)  # FSDP2 gathers a unit before its forward and its backward

    def resident_groups(self, layers: list[nn.Module]) -> list[list[int]]:
        """One group per sharding unit (the nearest enclosing module `fully_shard` was applied to): FSDP2
        all-gathers a unit's parameters together before its forward and again before its backward."""
        from torch.distributed.fsdp import FSDPModule
        unit_by_name: dict[str, nn.Module | None] = {}
        unit_of: dict[int, nn.Module | None] = {}  # id(module) -> its unit (parents come first)
        for name, module in self.model.named_modules():
            unit = module if isinstance(module, FSDPModule) else unit_by_name.get(name.rpartition(".")[0])
            unit_by_name[name], unit_of[id(module)] = unit, unit
        members: dict[int, list[int]] = {}
        for index, layer in enumerate(layers):
            members.setdefault(id(unit_of[id(layer)]), []).append(index)
        return list(members.values())

    def _layout(self, param) -> tuple[int, int, int, int]:
        """(start, end, replica index, number of replicas) of this rank's local tensor of a DTensor, computed
        once per parameter (a sharded parameter keeps its mesh and placements for the whole run)."""
        cached = self._layouts.get(id(param))
        if cached is None or cached[0] != param.shape:
            cached = (param.shape, self._compute_layout(param))
            self._layouts[id(param)] = cached
        return cached[1]

    @staticmethod
    def _compute_layout(param) -> tuple[int, int, int, int]:
        from torch.distributed.tensor import Replicate, Shard
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        mesh, placements = param.device_mesh, param.placements
        replica, n_replicas = 0, 1
        for dim, placement in enumerate(placements):
            if isinstance(placement, Shard) and placement.dim != 0:
                raise NotImplementedError(
                    f"a parameter of shape {tuple(param.shape)} is sharded on dim {placement.dim}: scale_rank "
                    "needs dim-0 sharding (fully_shard's default; drop shard_placement_fn for adapters)")
            if isinstance(placement, Replicate):
                size = mesh.size(dim)
                replica = replica * size + mesh.get_local_rank(dim)
                n_replicas *= size
            elif not isinstance(placement, Shard):
                raise NotImplementedError(f"unsupported placement {placement} of a parameter")
        shape, offset = compute_local_shape_and_global_offset(param.shape, mesh, placements)
        row = math.prod(param.shape[1:])
        start = offset[0] * row if len(offset) else 0
        return start, start + math.prod(shape), replica, n_replicas

    def deferred_writes(self):
        return contextlib.nullcontext()  # writes are in place, no collective

    def storage(self, param: nn.Parameter) -> LocalSlice:
        from torch.distributed.tensor import DTensor

        if not isinstance(param, DTensor):
            return self._whole.storage(param)
        start, end, _, _ = self._layout(param)
        values = self._flat_values(param)
        grad = None if param.grad is None else _flat(_local(param.grad))
        assert values.numel() == end - start, (values.numel(), start, end)
        return LocalSlice(start, end, values, grad)

    def _flat_values(self, param) -> torch.Tensor:
        """The flat view of a parameter's local tensor, kept while FSDP2 keeps that tensor (it makes a new one
        when it resets its shards, e.g. on loading a state dict): a storage read is then a lookup."""
        local = param._local_tensor
        cached = self._values.get(id(param))
        if cached is not None and cached[0] is local:
            return cached[1]
        flat = _flat(local)
        if local.is_contiguous():  # a view: edits reach the parameter (a copy is made afresh, stored back)
            self._values[id(param)] = (local, flat)
        return flat

    def scoring(self, param: nn.Parameter) -> LocalSlice:
        from torch.distributed.tensor import DTensor

        if not isinstance(param, DTensor):
            return self._whole.scoring(param)
        _, _, replica, n_replicas = self._layout(param)
        return _replica_split(self.storage(param), replica, n_replicas)

    def write(self, param: nn.Parameter, local: LocalSlice) -> None:
        from torch.distributed.tensor import DTensor

        if not isinstance(param, DTensor):
            return self._whole.write(param, local)
        _store(param._local_tensor, local.values)
        if local.grad is not None and param.grad is not None:
            _store(_local(param.grad), local.grad)


# -- FSDP1 (FullyShardedDataParallel, use_orig_params=True) ----------------------------------------------
class FSDP1Access:
    """Each original parameter is a (possibly empty) 1-D view of its part of the local flat shard.

    Its flat range inside the original parameter comes from FSDP's shard metadata
    (FlatParameter._shard_param_infos: intra_param_start_idx .. intra_param_end_idx, inclusive); the
    gradient is the matching view of the flat gradient. Call after backward (parameters resharded).
    """

    whole_tensors = stores_whole = False  # local shards (ShardAccess)
    resident_groups = staticmethod(one_group_per_layer)
    ensure_present = staticmethod(already_present)

    def __init__(self, model: nn.Module, rank: int = 0, world_size: int = 1):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp._flat_param import HandleShardingStrategy

        self.rank, self.world_size = rank, world_size
        self._whole = WholeTensorAccess(rank, world_size)
        self._info: dict[int, tuple] = {}  # id(param) -> (shard info, replica, n_replicas)
        for module in FSDP.fsdp_modules(model):
            handle = module._handle
            if handle is None:
                continue
            flat = handle.flat_param
            if not getattr(flat, "_params", None):
                raise ValueError("FSDP1 needs use_orig_params=True for scale_rank: wrap with "
                                 "FullyShardedDataParallel(..., use_orig_params=True)")
            strategy = handle._sharding_strategy
            replica, n_replicas = 0, 1
            if strategy in (HandleShardingStrategy.HYBRID_SHARD, HandleShardingStrategy._HYBRID_SHARD_ZERO2):
                inter = module._inter_node_pg
                replica, n_replicas = dist.get_rank(inter), dist.get_world_size(inter)
            no_shard = not handle.uses_sharded_strategy
            for param, info in zip(flat._params, flat._shard_param_infos):
                self._info[id(param)] = (None if no_shard else info, replica, n_replicas)
        if not self._info:
            raise ValueError("no FullyShardedDataParallel module found: pass the FSDP-wrapped model")

    def deferred_writes(self):
        return contextlib.nullcontext()  # writes are in place, no collective

    def _lookup(self, param):
        try:
            return self._info[id(param)]
        except KeyError:
            raise KeyError("parameter is not managed by FSDP (or the access was built before wrapping)") \
                from None

    def storage(self, param: nn.Parameter) -> LocalSlice:
        info, _, _ = self._lookup(param)
        if info is None:  # NO_SHARD: whole tensors
            return self._whole.storage(param)
        values = _flat(param)
        grad = None if param.grad is None else _flat(param.grad)
        if not info.in_shard:
            if values.numel():
                raise RuntimeError("FSDP1 parameter is unsharded right now: read shards after backward")
            return LocalSlice(0, 0, values, grad)
        start, end = info.intra_param_start_idx, info.intra_param_end_idx + 1
        if values.numel() != end - start:
            raise RuntimeError(f"FSDP1 parameter holds {values.numel()} elements but its shard has "
                               f"{end - start}: read shards after backward, outside summon_full_params")
        if grad is not None and grad.numel() != values.numel():
            raise RuntimeError("FSDP1 gradient is not sharded like its parameter (read after backward)")
        return LocalSlice(start, end, values, grad)

    def scoring(self, param: nn.Parameter) -> LocalSlice:
        info, replica, n_replicas = self._lookup(param)
        if info is None:
            return self._whole.scoring(param)
        return _replica_split(self.storage(param), replica, n_replicas)

    def write(self, param: nn.Parameter, local: LocalSlice) -> None:
        if local.end == local.start:
            return
        with torch.no_grad():
            _store(param.detach().view(-1), local.values)
            if local.grad is not None and param.grad is not None:
                _store(param.grad.view(-1), local.grad)


# -- DeepSpeed ZeRO-1/2/3 --------------------------------------------------------------------------------
class DeepSpeedAccess:
    """The fp32 master partition of each parameter, read after backward and before `engine.step()`.

    ZeRO-1/2 (and the bf16 optimizer): the optimizer owns a contiguous fragment of every trainable
    parameter (`param._hp_mapping`: lp_fragment_address = its flat range, hp_fragment = the fp32 master
    view, the gradient fragment from the engine's partitioned gradients). Fragments of different ranks
    are disjoint and cover the parameter, so scoring = storage although the model copy is replicated.

    ZeRO-3: partition p of a parameter is [p * partition_size, (p+1) * partition_size) clipped to its
    numel (`param.ds_tensor` holds it, padded); values and gradient come from
    deepspeed.utils.safe_get_local_fp32_param / safe_get_local_grad. Parameters under the persistence
    threshold are gathered whole on every rank, yet their fp32 master and gradient are still partitioned:
    scoring = storage there too.

    Frozen parameters have no master copy: their model copy is used (ZeRO-3: the partition; ZeRO-1/2: the
    whole replicated tensor, scored 1/world by each rank).
    """

    whole_tensors = stores_whole = False  # local shards (ShardAccess)

    def __init__(self, engine, rank: int = 0, world_size: int = 1):
        self.engine = engine
        self.optimizer = getattr(engine, "optimizer", None)
        self.rank, self.world_size = rank, world_size
        self.stage = engine.zero_optimization_stage() if hasattr(engine, "zero_optimization_stage") else 0
        self._whole = WholeTensorAccess(rank, world_size)
        self._deferred: dict[int, nn.Parameter] | None = None
        self.collective_calls = 0  # model-copy refreshes (all_gather / all_reduce) so far
        if self.stage == 3:
            hpz = engine.zero_hpz_partition_size() if hasattr(engine, "zero_hpz_partition_size") else 1
            if hpz > 1:
                raise NotImplementedError("ZeRO++ hierarchical partitioning (zero_hpz_partition_size > 1) keeps "
                                          "a secondary copy scale_rank does not update; set it to 1")
        self._ranges: dict[int, tuple[int, int, int]] = {}  # id(ZeRO-3 parameter) -> its _z3_range
        self._group_of: dict[int, int] = {}
        for attr in ("bit16_groups", "bf16_groups"):
            for index, group in enumerate(getattr(self.optimizer, attr, None) or []):
                for param in group:
                    self._group_of[id(param)] = index

    def resident_groups(self, layers: list[nn.Module]) -> list[list[int]]:
        """ZeRO-1/2 keep every parameter whole: one group. ZeRO-3 keeps a parameter under its persistence
        threshold (`ds_persist`; LoRA factors usually are) gathered once its module has run, so the layers whose
        factors all are form one group, read after `ensure_present` (which gathers any such factor not held
        right now: before its module's first forward, and after a checkpoint load); a layer with a partitioned
        factor exists whole only around its own forward and backward: a group of its own."""
        if self.stage != 3:
            return one_group(layers)
        persistent = [all(getattr(p, "ds_persist", False) for p in (layer.lora_A, layer.lora_B)) for layer in layers]
        together = [index for index, kept in enumerate(persistent) if kept]
        alone = [[index] for index, kept in enumerate(persistent) if not kept]
        return ([together] if together else []) + alone

    def ensure_present(self, params: list[nn.Parameter]) -> None:
        """ZeRO-3: gathers those of `params` it has released (one collective; every rank releases and gathers
        the same ones, in the same order) and leaves them gathered, as it keeps persistent parameters itself:
        their gradients, which the regularizer hands over in the backward, then meet a whole parameter."""
        if self.stage != 3:
            return
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
        absent = [p for p in params if self._is_zero3(p) and p.ds_status != ZeroParamStatus.AVAILABLE]
        if any(not p.ds_persist or p.ds_status != ZeroParamStatus.NOT_AVAILABLE for p in absent):
            raise RuntimeError("the orthogonality regularizer reads a ZeRO-3 adapter factor that is partitioned or "
                               "being gathered now: only persistent factors are read outside their own module")
        if absent:
            absent[0].all_gather(param_list=absent)

    # -- which kind of parameter --------------------------------------------------------------------
    @staticmethod
    def _is_zero3(param) -> bool:
        return hasattr(param, "ds_id")

    @staticmethod
    def _has_master(param) -> bool:
        """A ZeRO-1/2 (or bf16 optimizer) trainable parameter: fp32 master fragment on some rank."""
        return hasattr(param, "_hp_mapping") and not hasattr(param, "ds_id")

    def _device(self, param) -> torch.device:
        if self._is_zero3(param):
            from deepspeed.accelerator import get_accelerator
            return torch.device(get_accelerator().current_device_name())
        return param.device

    # -- ZeRO-3 ---------------------------------------------------------------------------------------
    def _z3_range(self, param) -> tuple[int, int, int]:
        """(start, end, partition size) of this rank's partition of a ZeRO-3 parameter, worked out once per
        parameter (ZeRO-3 never repartitions; the controller reads every adapter parameter at every step)."""
        found = self._ranges.get(id(param))
        if found is None:
            found = self._ranges[id(param)] = self._z3_partition(param)
        return found

    def _z3_partition(self, param) -> tuple[int, int, int]:
        group = getattr(param, "ds_process_group", None)
        partition = dist.get_rank(group)
        if dist.get_world_size(group) != self.world_size:
            raise NotImplementedError(
                "ZeRO-3 partitions over a group smaller than the data-parallel group (MiCS / hpZ): each "
                "partition is replicated, which scale_rank does not split yet; partition over all ranks")
        size = param.ds_tensor.ds_numel
        start = min(partition * size, param.ds_numel)
        return start, min(start + size, param.ds_numel), size

    def _z3_storage(self, param) -> LocalSlice:
        from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_grad

        start, end, _ = self._z3_range(param)
        n = end - start
        if not param.requires_grad:  # no master copy: the model copy's partition
            return LocalSlice(start, end, param.ds_tensor.detach().view(-1)[:n].to(self._device(param)), None)
        # detached like every other engine's slice: the fp32 flat group it views requires grad, and a
        # method's arithmetic on it (the sensitivity EMAs) would otherwise record an autograd graph that
        # chains across steps (memory grows every step)
        values = safe_get_local_fp32_param(param).detach().view(-1)[:n]
        try:
            grad = safe_get_local_grad(param)
        except (AttributeError, KeyError, ValueError):
            grad = None  # the engine holds no gradient right now
        grad = None if grad is None else grad.detach().view(-1)[:n]
        return LocalSlice(start, end, values, grad)

    def _z3_write(self, param, local: LocalSlice) -> None:
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
        from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_grad
        from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_grad

        start, end, _ = self._z3_range(param)
        n = end - start
        with torch.no_grad():
            if param.requires_grad:
                master = safe_get_local_fp32_param(param)
                if n and master.view(-1)[:n].data_ptr() != local.values.data_ptr():
                    padded = master.detach().clone().view(-1)
                    padded[:n] = local.values.to(padded.device, padded.dtype)
                    safe_set_local_fp32_param(param, padded)
                if local.grad is not None and n:
                    try:
                        held = safe_get_local_grad(param)
                    except (AttributeError, KeyError, ValueError):
                        held = None
                    held_part = None if held is None else held.view(-1)[:n]
                    if held_part is not None and held_part.data_ptr() != local.grad.data_ptr() \
                            and not torch.equal(held_part, local.grad.to(held_part.device, held_part.dtype)):
                        padded = held.detach().clone().view(-1)
                        padded[:n] = local.grad.to(padded.device, padded.dtype)
                        safe_set_local_grad(param, padded)
            # the model copy: this rank's partition, and the whole tensor where ZeRO-3 keeps it gathered
            _store(param.ds_tensor.view(-1)[:n], local.values.to(param.ds_tensor.dtype))
            if param.ds_status == ZeroParamStatus.AVAILABLE and param.numel() == param.ds_numel:
                self._refresh_copy(param)

    # -- ZeRO-1/2 -------------------------------------------------------------------------------------
    def _grads_held(self, param) -> bool:
        """Whether the engine holds gradients of `param`'s group now (same answer on every rank)."""
        opt = self.optimizer
        index = self._group_of.get(id(param))
        if index is None:
            return False
        if getattr(opt, "cpu_offload", False):
            holder = getattr(opt, "offload_gradient_dict", {})
        elif hasattr(opt, "averaged_gradients"):
            holder = opt.averaged_gradients
        else:
            holder = getattr(opt, "fp32_groups_gradient_dict", {})
        return holder.get(index) is not None

    def _z12_grad(self, param, mapping) -> torch.Tensor | None:
        try:
            grad = mapping.get_lp_grad_fragment(param._index_in_param_group)
        except (ValueError, KeyError, IndexError):
            return None
        if grad is None:
            return None
        grad = _flat(grad)
        address = mapping.lp_fragment_address
        if grad.numel() == param.numel() and address.numel != param.numel():
            grad = grad.narrow(0, address.start, address.numel)  # a full accumulation buffer (bf16 optimizer)
        return grad

    def _z12_storage(self, param) -> LocalSlice:
        mapping = param._hp_mapping
        device = self._device(param)
        if mapping is None:  # no fragment of this parameter on this rank
            grad = _empty_like(param, torch.float32) if self._grads_held(param) else None
            return LocalSlice(0, 0, _empty_like(param, torch.float32), grad)
        address = mapping.lp_fragment_address
        values = mapping.hp_fragment.detach().view(-1).to(device)
        grad = self._z12_grad(param, mapping)
        grad = None if grad is None else grad.to(device)
        if grad is None and self._grads_held(param):
            grad = torch.zeros_like(values)
        return LocalSlice(address.start, address.start + address.numel, values, grad)

    def _z12_write(self, param, local: LocalSlice) -> None:
        mapping = param._hp_mapping
        with torch.no_grad():
            if mapping is not None and local.end > local.start:
                _store(mapping.hp_fragment.view(-1), local.values)
                if local.grad is not None:
                    held = self._z12_grad(param, mapping)
                    if held is not None and not torch.equal(held, local.grad.to(held.device, held.dtype)):
                        _store(held, local.grad)
        self._refresh_copy(param)  # the model copy is whole on every rank: rebuilt from every rank's fragment

    # -- the replicated model copies: one collective for all the writes of a deferred block ----------------
    @contextlib.contextmanager
    def deferred_writes(self):
        if self._deferred is not None:  # nested: the outermost block refreshes
            yield
            return
        self._deferred = {}
        try:
            yield
            pending = list(self._deferred.values())
        finally:
            self._deferred = None
        self._refresh(pending)

    def _refresh_copy(self, param) -> None:
        if self._deferred is None:
            self._refresh([param])
        else:
            self._deferred[id(param)] = param

    def _refresh(self, params: list) -> None:
        """Rebuild the whole model copy of `params` (every rank, same order): ZeRO-3 persistent parameters by
        one all_gather of every rank's partitions, ZeRO-1/2 parameters by one all_reduce of the fragments."""
        groups: dict[tuple[str, int], list] = {}
        for param in params:
            if self._is_zero3(param):
                key = ("gather", id(getattr(param, "ds_process_group", None)))
            else:
                key = ("reduce", id(getattr(param, "_dp_group", None)))
            groups.setdefault(key, []).append(param)
        with torch.no_grad():
            for (kind, _), members in groups.items():
                if kind == "gather":
                    self._gather_partitions(members)
                else:
                    self._reduce_fragments(members)

    def _gather_partitions(self, params: list) -> None:
        group = getattr(params[0], "ds_process_group", None)
        sizes = [param.ds_tensor.ds_numel for param in params]
        device = params[0].device
        flat = torch.cat([param.ds_tensor.detach().view(-1)[:size].to(device, torch.float32)
                          for param, size in zip(params, sizes)])
        gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, flat, group=group)
        self.collective_calls += 1
        offset = 0
        for param, size in zip(params, sizes):
            whole = torch.cat([part[offset:offset + size] for part in gathered])[:param.ds_numel]
            param.data.view(-1).copy_(whole.to(param.dtype))
            offset += size

    def _reduce_fragments(self, params: list) -> None:
        group = getattr(params[0], "_dp_group", None)
        fulls = []
        for param in params:
            full = torch.zeros(param.numel(), dtype=torch.float32, device=param.device)
            mapping = param._hp_mapping
            if mapping is not None and mapping.lp_fragment_address.numel:
                address = mapping.lp_fragment_address
                full[address.start:address.start + address.numel] = \
                    mapping.hp_fragment.detach().view(-1).to(full.device, full.dtype)
            fulls.append(full)
        flat = torch.cat(fulls)
        dist.all_reduce(flat, group=group)
        self.collective_calls += 1
        for param, full in zip(params, flat.split([f.numel() for f in fulls])):
            param.data.view(-1).copy_(full)

    # -- the protocol ---------------------------------------------------------------------------------
    def storage(self, param: nn.Parameter) -> LocalSlice:
        if self._is_zero3(param):
            return self._z3_storage(param)
        if self._has_master(param):
            return self._z12_storage(param)
        return self._whole.storage(param)  # frozen under ZeRO-1/2: replicated

    def scoring(self, param: nn.Parameter) -> LocalSlice:
        if self._is_zero3(param) or self._has_master(param):
            return self.storage(param)
        return self._whole.scoring(param)

    def write(self, param: nn.Parameter, local: LocalSlice) -> None:
        if self._is_zero3(param):
            return self._z3_write(param, local)
        if self._has_master(param):
            return self._z12_write(param, local)
        return self._whole.write(param, local)
