"""Work a method adds to the adapter layers' forward and backward, installed as module hooks by that method.

The adapter layer computes only the LoRA update. A method that needs more installs one of these on its layers
in `bind` and removes it when it is done (`remove()`):

- OrthogonalityRegularizer (AdaLoRA, IncreLoRA; gamma > 0): adds gamma x the mean orthogonality norm to the
  loss through each layer's output;
- InputSquareSums (PRILoRA): per-input-feature sums of squares of each layer's input;
- DenseGradient (IncreLoRA, score="dense"): dL/d(Delta W) of each layer, accumulated over micro-batches.

Forward hooks are prepended so that they run before any hook an engine registers on the same module: FSDP2
and ZeRO-3 release gathered parameters in their own post-forward hooks, and the regularizer reads A and B.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..layer import AdaptiveLoRALayer, in_backward


class LayerHooks:
    """Handles of the hooks one helper installed; `remove()` takes all of them off."""

    def __init__(self) -> None:
        self.handles: list[RemovableHandle] = []

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    @property
    def installed(self) -> bool:
        return bool(self.handles)


class _AuxLoss(torch.autograd.Function):
    """Identity on `out` whose backward also gives `aux` the gradient `coef` (as if loss += coef * aux).

    The regularizer rides on the layer output so that engines that gather parameters only around a
    module's forward and backward (FSDP, ZeRO-3) have them present when its gradient is computed.
    """

    @staticmethod
    def forward(ctx, out: torch.Tensor, aux: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(coef)
        ctx.aux_dtype = aux.dtype
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (coef,) = ctx.saved_tensors
        return grad_out, coef.to(ctx.aux_dtype).reshape(()), None


def orthogonality(layer: AdaptiveLoRALayer) -> torch.Tensor:
    """||A A^T - I||_F + ||B^T B - I||_F over the layer's active components (non-squared norms, as AdaLoRA's code)."""
    kept = layer.kept_components()
    if kept is None:  # every component active (AdaLoRA, SoRA): no gather, no scatter in backward
        A = layer.lora_A.view_as(layer.lora_A).float()
        B = layer.lora_B.view_as(layer.lora_B).float()
    else:
        A = layer.lora_A.index_select(0, kept).float()
        B = layer.lora_B.index_select(1, kept).float()
    eye = torch.eye(A.shape[0], device=A.device)
    return torch.linalg.matrix_norm(A @ A.t() - eye) + torch.linalg.matrix_norm(B.t() @ B - eye)


class OrthogonalityRegularizer(LayerHooks):
    """loss += gamma x the mean of ||A A^T - I||_F and ||B^T B - I||_F over every A and B (2 per module, counted
    separately: AdaLoRA's, IncreLoRA's and PEFT's normalisation), applied in every training forward.

    `coef` (gamma / (2 x modules), times `scale(factor)`: 1 / grad_accum and an fp16 loss scale) lives on the
    layers' device so that the backward needs no host value.
    """

    def __init__(self, layers: list[AdaptiveLoRALayer], gamma: float):
        super().__init__()
        self.weight = gamma / (2 * len(layers))
        self.coef = torch.tensor(self.weight, device=layers[0].lora_A.device)
        self.last: list[torch.Tensor | None] = [None] * len(layers)
        for index, layer in enumerate(layers):
            self.handles.append(layer.register_forward_hook(self._hook(index), prepend=True))

    def _hook(self, index: int):
        def hook(layer: AdaptiveLoRALayer, args, out: torch.Tensor):
            if layer.merged or not torch.is_grad_enabled():
                return None
            reg = orthogonality(layer)
            self.last[index] = reg.detach()
            return _AuxLoss.apply(out, reg, self.coef)
        return hook

    def scale(self, factor: float) -> None:
        """Scale the regularizer's gradient like the loss (1 / grad_accum, times an fp16 loss scale)."""
        self.coef.fill_(self.weight * factor)

    def value(self) -> float:
        """The last forward's mean norm over all A and B (what gamma multiplies in the loss)."""
        values = [v for v in self.last if v is not None]
        return float(torch.stack(values).sum()) / (2 * len(self.last)) if values else 0.0


class InputSquareSums(LayerHooks):
    """Per-input-feature sums of x^2 over the tokens of each layer's training forwards (d_in, float32 each),
    until `take()` hands them over and starts again at 0. Recomputed forwards (activation checkpointing) are
    not counted twice."""

    def __init__(self, layers: list[AdaptiveLoRALayer]):
        super().__init__()
        self.sums = [torch.zeros(layer.d_in, dtype=torch.float32, device=layer.lora_A.device) for layer in layers]
        for index, layer in enumerate(layers):
            self.handles.append(layer.register_forward_pre_hook(self._hook(index)))

    def _hook(self, index: int):
        def hook(layer: AdaptiveLoRALayer, args) -> None:
            if layer.merged or not torch.is_grad_enabled() or in_backward():
                return
            with torch.no_grad():
                self.sums[index] += args[0].detach().reshape(-1, layer.d_in).float().pow(2).sum(0)
        return hook

    def take(self) -> torch.Tensor:
        """This step's sums of every layer, concatenated in float64; the accumulators restart at 0."""
        taken = torch.cat([s.double() for s in self.sums])
        for s in self.sums:
            s.zero_()
        return taken


class DenseGradient(LayerHooks):
    """dL/d(Delta W) = sum over tokens of grad(output) x dropout(x)^T per layer (d_out x d_in, float32),
    accumulated over micro-batches into `grads` (IncreLoRA's exact module score; one process: whole weights)."""

    def __init__(self, layers: list[AdaptiveLoRALayer]):
        super().__init__()
        self.grads = [torch.zeros(layer.d_out, layer.d_in, device=layer.lora_A.device) for layer in layers]
        self._inputs: list[torch.Tensor | None] = [None] * len(layers)
        for index, layer in enumerate(layers):
            self.handles.append(layer.dropout.register_forward_hook(self._keep_input(index)))
            self.handles.append(layer.register_forward_hook(self._on_output(index), prepend=True))

    def _keep_input(self, index: int):
        def hook(dropout: nn.Module, args, x_in: torch.Tensor) -> None:
            self._inputs[index] = x_in.detach()
        return hook

    def _on_output(self, index: int):
        def hook(layer: AdaptiveLoRALayer, args, out: torch.Tensor) -> None:
            x_in, self._inputs[index] = self._inputs[index], None
            if layer.merged or x_in is None or not out.requires_grad:
                return
            grads = self.grads[index]

            def accumulate(grad: torch.Tensor) -> None:  # out = base(x) + delta: the same gradient as delta
                grads.add_(grad.reshape(-1, layer.d_out).float().t() @ x_in.reshape(-1, layer.d_in).float())
            out.register_hook(accumulate)
        return hook

    def zero(self) -> None:
        for g in self.grads:
            g.zero_()

    def remove(self) -> None:
        """Take the hooks off and free the accumulators."""
        super().remove()
        self.grads = []
