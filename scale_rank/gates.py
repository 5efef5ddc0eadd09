"""Every gated layer's B x gate in one operation per model forward (one process and DDP).

A gated layer (AdaLoRA, SoRA, IncreLoRA) multiplies B's columns by its gate (lam) before the LoRA product. Done
in each layer's forward, that product costs a kernel per layer in the forward and three in the backward (the
gradients of B and of lam): a sixth more than the 24 a LoRA layer launches per step under bf16 autocast, which a
step bound by the host issuing kernels (a large frozen base on a GPU) pays in full. `BatchedGates` computes every layer's gated B in one foreach product when
the model's forward starts, and their gradients in one foreach product for B and a stacked sum per shape for the
gates once the backward has passed every layer: a handful of kernels per step whatever the number of layers.

Where it applies: engines that hold every adapter parameter whole in the parameter itself through the step (one
process, DDP; `ShardAccess.stores_whole`). FSDP and ZeRO-3 gather a layer's parameters only around its own
forward and backward, so there each layer gates its B itself. A layer uses the batch only in a forward that
records gradients outside any saved-tensor hooks: an activation-checkpointed region (non-reentrant: saved-tensor
hooks in forward and recompute; reentrant: no gradients in forward, recomputed inside the backward) gates per
layer both times, so the recomputation saves what the forward saved.
"""
from __future__ import annotations

import torch
from torch import nn

from .layer import AdaptiveLoRALayer, records_plain_graph


class _GatedFactors(torch.autograd.Function):
    """(B_1 x gate_1, ..., B_n x gate_n) in one foreach product; the backward gives B_i the gradient x gate_i
    (one foreach product) and gate_i the column sums of gradient x B_i (one foreach product, then one stacked sum
    per shape of B)."""

    @staticmethod
    def forward(ctx, count: int, *tensors: torch.Tensor):
        factors, gates = list(tensors[:count]), list(tensors[count:])
        ctx.save_for_backward(*tensors)
        ctx.count = count
        ctx.set_materialize_grads(False)  # a layer the forward did not run gets None, not a tensor of zeros
        return tuple(torch._foreach_mul(factors, gates))

    @staticmethod
    def backward(ctx, *grads: torch.Tensor | None):
        saved, count = ctx.saved_tensors, ctx.count
        factors, gates = saved[:count], saved[count:]
        used = [i for i, grad in enumerate(grads) if grad is not None]  # layers this forward ran
        flowing = [grads[i] for i in used]
        factor_grads, gate_grads = [None] * count, [None] * count
        if used and any(ctx.needs_input_grad[1:1 + count]):
            for i, grad in zip(used, torch._foreach_mul(flowing, [gates[i] for i in used])):
                factor_grads[i] = grad
        if used and any(ctx.needs_input_grad[1 + count:]):
            products = torch._foreach_mul(flowing, [factors[i] for i in used])
            by_shape: dict[tuple, list[int]] = {}
            for j, product in enumerate(products):
                by_shape.setdefault(tuple(product.shape), []).append(j)
            for members in by_shape.values():
                sums = torch.stack([products[j] for j in members]).sum(1)  # (layers, r): views, no copy each
                for j, column_sums in zip(members, sums.unbind(0)):
                    gate_grads[used[j]] = column_sums
        return (None, *factor_grads, *gate_grads)


class BatchedGates:
    """Hooks on the model: at the start of each forward that records gradients, every gated layer's B x gate
    in one operation, handed to the layers (`AdaptiveLoRALayer.batched_B`) until the forward ends."""

    def __init__(self, model: nn.Module, layers: list[AdaptiveLoRALayer]):
        self.layers = [layer for layer in layers if layer.gated]
        self.handles = []
        if self.layers:
            self.handles = [model.register_forward_pre_hook(self._start),
                            model.register_forward_hook(self._end, always_call=True)]

    def _start(self, model: nn.Module, args) -> None:
        if not records_plain_graph():
            return
        layers = [layer for layer in self.layers if not layer.merged]
        if not layers:
            return
        gated = _GatedFactors.apply(len(layers), *[layer.lora_B for layer in layers],
                                    *[layer.gate_factor() for layer in layers])
        for layer, factor in zip(layers, gated):
            layer.batched_B = factor

    def _end(self, model: nn.Module, args, out) -> None:
        for layer in self.layers:
            layer.batched_B = None

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self._end(None, None, None)
