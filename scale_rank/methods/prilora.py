"""PRILoRA: ranks rising linearly with depth, and ongoing pruning of A by |A_ij| * input-norm EMA.

Pruning zeroes, in every row of A, the entries whose importance is at or below the row's k-th smallest
(k = floor(prune_ratio * d_in)); exact ties at the cut are pruned together. The k-th smallest is found by
bisection on the float bit patterns with one all-reduce of per-row counts per round, so no rank ever
gathers a row and every sharding finds the same threshold.
Equations, defaults and every choice between the paper and its code: docs/methods.md.
"""
from __future__ import annotations

import itertools
import math

import torch

from ..config import PRILoRAConfig
from ..layer import AdaptiveLoRALayer
from .base import Method, edit_local
from .hooks import InputSquareSums

_FLOAT_BITS = 31  # non-negative float32 values order like their int32 bit patterns, below 2**31


def depth_rank(layer: int, n_layers: int, r_first: int, r_last: int) -> int:
    """r_l = round(r_first + (r_last - r_first)(l - 1)/(L - 1)) for 1-based l, rounding halves up."""
    if n_layers <= 1:
        return r_first
    return math.floor(r_first + (r_last - r_first) * (layer - 1) / (n_layers - 1) + 0.5)


class PRILoRA(Method):
    name = "prilora"
    config: PRILoRAConfig

    trains_lam = False

    @classmethod
    def site_capacity(cls, config: PRILoRAConfig, layer_index: int, n_layers: int) -> int:
        return depth_rank(layer_index + 1, n_layers, config.r_first, config.r_last)

    def init_layer(self, layer: AdaptiveLoRALayer) -> None:
        layer.init_plain_lora(self.config.alpha)

    def bind(self, layers, access, comm) -> None:
        super().bind(layers, access, comm)
        self.inputs = self.install(InputSquareSums(layers))
        self.feature_sizes = [layer.d_in for layer in layers]
        self.feature_offsets = [0, *itertools.accumulate(self.feature_sizes)][:-1]  # each layer's in input_norm
        self.input_norm = torch.zeros(sum(self.feature_sizes), dtype=torch.float64)

    # -- input statistics: one all-reduce of the per-feature squared sums each step ----------------
    def before_step(self, step: int) -> None:
        """Take this step's per-feature squared sums (the accumulators start the next step at 0)."""
        self._step_sums = self.inputs.take()

    def partial_sums(self, step: int) -> torch.Tensor:
        return self._step_sums.clone()

    def absorb(self, sums: torch.Tensor, step: int) -> None:
        self.input_norm.lerp_(sums.cpu().sqrt(), 1 - self.config.beta)

    def decides_at(self, step: int) -> bool:
        return step % self.config.prune_interval == 0

    def decide(self, sums, step: int) -> torch.Tensor:
        return self.mask  # ranks are fixed by depth; the pruning itself happens in apply

    # -- pruning -----------------------------------------------------------------------------------
    def apply(self, decision: torch.Tensor | None, step: int) -> None:
        if decision is None or self.config.prune_ratio == 0:
            return
        k = torch.tensor([math.floor(self.config.prune_ratio * layer.d_in) for layer in self.layers])
        k = torch.repeat_interleave(k, self.layout.capacity)
        if self.access.whole_tensors:
            self._prune_whole(k)
            return
        norms = self.input_norm.split(self.feature_sizes)
        scored = [self._importance(index, norm, self.access.scoring(layer.lora_A))
                  for index, (layer, norm) in enumerate(zip(self.layers, norms))]
        threshold = self._thresholds(torch.cat([imp for imp, _ in scored]), torch.cat([r for _, r in scored]), k)
        for index, (layer, norm) in enumerate(zip(self.layers, norms)):
            def zero(local, index=index, norm=norm):
                importance, rows = self._importance(index, norm, local)
                local.values.masked_fill_((importance <= threshold[rows]).to(local.values.device), 0.0)
            edit_local(self.access, layer.lora_A, zero)

    def _thresholds(self, importance: torch.Tensor, rows: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Per component (row of A), the k-th smallest importance over all ranks; -1 where k = 0 (none pruned)."""
        threshold = row_kth_smallest(importance, rows, k, self.layout.n_components, self.comm)
        return self.comm.broadcast(torch.where(k > 0, threshold, torch.tensor(-1.0)))

    @torch.no_grad()
    def _prune_whole(self, k: torch.Tensor) -> None:
        """`apply`'s pruning on whole parameters (one process): the same importances and thresholds, computed
        for all modules' A at once instead of one slice per module."""
        weights = [layer.lora_A for layer in self.layers]
        row_length = torch.repeat_interleave(torch.tensor(self.feature_sizes), self.layout.capacity)
        row_start = torch.cumsum(row_length, 0) - row_length  # of every row of every A in the flat order
        module_features = torch.repeat_interleave(torch.tensor(self.feature_offsets), self.layout.capacity)
        rows = torch.repeat_interleave(torch.arange(self.layout.n_components), row_length)
        features = torch.arange(len(rows)) - row_start[rows] + module_features[rows]  # index into input_norm
        flat = torch.cat([w.view(-1) for w in weights])
        importance = flat.float().abs().cpu() * self.input_norm[features].float()
        prune = (importance <= self._thresholds(importance, rows, k)[rows]).to(flat.device)
        for weight, pruned in zip(weights, prune.split([w.numel() for w in weights])):
            weight.view(-1).masked_fill_(pruned, 0.0)

    def _importance(self, index: int, norm: torch.Tensor, local) -> tuple[torch.Tensor, torch.Tensor]:
        """|A_ij| * n_j of the local entries of module `index`'s A, and the component (row) of each."""
        d_in = self.layers[index].d_in
        flat = torch.arange(local.start, local.end)
        rows = flat // d_in + self.layout.offsets[index]
        return local.values.detach().float().abs().cpu() * norm[flat % d_in].float(), rows

    def state_dict(self) -> dict:
        return {**super().state_dict(), "input_norm": self.input_norm.clone()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.input_norm.copy_(state["input_norm"])


def row_kth_smallest(values: torch.Tensor, rows: torch.Tensor, k: torch.Tensor, n_rows: int, comm) -> torch.Tensor:
    """Per row, the k-th smallest of non-negative `values` spread over ranks (float32, exact).

    Bisection over int32 bit patterns: 31 rounds, each one all-reduce of per-row counts.
    """
    bits = values.float().contiguous().view(torch.int32).long()
    lo = torch.zeros(n_rows, dtype=torch.long)
    hi = torch.full((n_rows,), (1 << _FLOAT_BITS) - 1, dtype=torch.long)
    for _ in range(_FLOAT_BITS):
        mid = (lo + hi) // 2
        counts = torch.zeros(n_rows, dtype=torch.float64).index_add_(0, rows, (bits <= mid[rows]).double())
        comm.all_reduce_sum(counts)
        enough = counts >= k
        hi = torch.where(enough, mid, hi)
        lo = torch.where(enough, lo, mid + 1)
    return hi.int().view(torch.float32)
