"""The local slice of each adapter parameter (and of its gradient) that this rank holds and scores.

A slice is a flat range [start, end) of the parameter's row-major elements. `storage` is everything this
rank holds (what decisions are applied to); `scoring` is the part this rank scores, so that across ranks
every element is counted exactly once (a replicated tensor is split into 1/world_size ranges).
"""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn


@dataclass
class LocalSlice:
    start: int
    end: int
    values: torch.Tensor  # 1-D, elements [start, end) of the flattened parameter
    grad: torch.Tensor | None  # 1-D gradient of the same elements, if any


class ShardAccess(Protocol):
    rank: int
    world_size: int
    # True when this rank stores and scores every element of every adapter parameter in the parameter tensor
    # itself (one process): methods may then work on the parameters directly, with one `torch._foreach_*`
    # operation for all modules instead of a slice per parameter
    whole_tensors: bool
    # True when this rank stores every element of every adapter parameter (and its gradient) in the parameter
    # tensor itself (one process, DDP): edits, which every rank makes alike, may then work on the parameters
    # directly, one `torch._foreach_*` operation for all modules (scoring still follows `scoring`)
    stores_whole: bool

    def resident_groups(self, layers: list[nn.Module]) -> list[list[int]]:
        """Indices of `layers` (model order) in groups whose parameters are all present, whole, in the
        parameters themselves, through the forward and backward of the group's first layer, once
        `ensure_present` has run: a hook there may read the whole group (one process and DDP: one group; FSDP2:
        one per sharding unit; ZeRO-3: its persistent factors, and one per layer for the rest; else one per
        layer)."""

    def ensure_present(self, params: list[nn.Parameter]) -> None:
        """Make every parameter of a resident group in `params` hold its whole value (ZeRO-3 gathers a
        persistent one it has released, as before its module's first forward or after a checkpoint load;
        elsewhere nothing to do). Every rank calls it at the same point."""

    def storage(self, param: nn.Parameter) -> LocalSlice: ...

    def scoring(self, param: nn.Parameter) -> LocalSlice: ...

    def write(self, param: nn.Parameter, local: LocalSlice) -> None:
        """Store `local.values` (edited by a method) back into the parameter's storage."""

    def deferred_writes(self) -> AbstractContextManager:
        """Within it, collectives that `write` needs are collected and run once, together, at its end."""


def one_group_per_layer(layers: list[nn.Module]) -> list[list[int]]:
    """`ShardAccess.resident_groups` of engines that gather a parameter only around its own module."""
    return [[index] for index in range(len(layers))]


def already_present(params: list[nn.Parameter]) -> None:
    """`ShardAccess.ensure_present` of engines whose resident groups are present without being asked."""


def one_group(layers: list[nn.Module]) -> list[list[int]]:
    """`ShardAccess.resident_groups` of engines that keep every adapter parameter whole at all times."""
    return [list(range(len(layers)))]


def split_range(numel: int, rank: int, world_size: int) -> tuple[int, int]:
    """This rank's contiguous share of `numel` elements (ranks beyond the end get an empty range)."""
    chunk = -(-numel // world_size)
    start = min(rank * chunk, numel)
    return start, min(start + chunk, numel)


def narrow(local: LocalSlice, start: int, end: int) -> LocalSlice:
    """The part of `local` covering flat range [start, end) (clipped to what `local` holds)."""
    start = max(start, local.start)
    end = max(min(end, local.end), start)
    lo, hi = start - local.start, end - local.start
    grad = None if local.grad is None else local.grad[lo:hi]
    return LocalSlice(start, end, local.values[lo:hi], grad)


class WholeTensorAccess:
    """One process, or a parameter replicated on every rank (DDP): each rank holds the whole tensor."""

    def __init__(self, rank: int = 0, world_size: int = 1):
        self.rank, self.world_size = rank, world_size
        self.whole_tensors = world_size == 1
        self.stores_whole = True

    resident_groups = staticmethod(one_group)
    ensure_present = staticmethod(already_present)

    def storage(self, param: nn.Parameter) -> LocalSlice:
        grad = None if param.grad is None else param.grad.detach().reshape(-1)
        return LocalSlice(0, param.numel(), param.detach().view(-1), grad)

    def scoring(self, param: nn.Parameter) -> LocalSlice:
        return narrow(self.storage(param), *split_range(param.numel(), self.rank, self.world_size))

    def deferred_writes(self) -> AbstractContextManager:
        return nullcontext()  # writes need no collective

    def write(self, param: nn.Parameter, local: LocalSlice) -> None:
        """Values are views of the parameter: edits are already in place."""
