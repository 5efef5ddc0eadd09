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


class _OrthogonalityGradient(torch.autograd.Function):
    """Identity on `out` whose backward also gives A and B the regularizer's gradient in closed form.

    For M = A A^T - I (symmetric), d||M||_F / dA = 2 M A / ||M||_F, and for N = B^T B - I, d||N||_F / dB =
    2 B N / ||N||_F. The forward hook hands in `unit_a` = 2 coef M / ||M|| and `unit_b` = 2 coef N / ||N||
    (float32, r x r), so the backward is one matrix product per factor. The gradient rides on the layer output
    so that engines that gather parameters only around a module's forward and backward (FSDP, ZeRO-3) have A
    and B present when it is computed.
    """

    @staticmethod
    def forward(ctx, out: torch.Tensor, A: torch.Tensor, B: torch.Tensor, unit_a: torch.Tensor,
                unit_b: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(A, B, unit_a, unit_b)
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        A, B, unit_a, unit_b = ctx.saved_tensors
        grad_a = (unit_a @ A.float()).to(A.dtype)
        grad_b = (B.float() @ unit_b).to(B.dtype)
        return grad_out, grad_a, grad_b, None, None


def _unit_residual(gram: torch.Tensor, minus_eye: torch.Tensor, pairs: torch.Tensor | None,
                   twice_coef: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(2 coef R / ||R||_F, ||R||_F) for R = gram - I restricted to the active pairs (None: all)."""
    residual = gram.add_(minus_eye)
    if pairs is not None:
        residual.mul_(pairs)
    norm = torch.linalg.vector_norm(residual)
    return residual.mul_(twice_coef / norm), norm


class OrthogonalityRegularizer(LayerHooks):
    """loss += gamma x the mean of ||A A^T - I||_F and ||B^T B - I||_F over every A and B (2 per module, counted
    separately: AdaLoRA's, IncreLoRA's and PEFT's normalisation), each over the layer's active components,
    applied in every training forward (docs/methods.md, "Orthogonality regularizer").

    The term is not added to the loss: each layer's forward hook computes its two residuals (float32, no
    autocast) and `_OrthogonalityGradient` adds their closed-form gradient in the backward. `coef` is gamma /
    (2 x modules) times `scale(factor)` (1 / grad_accum and an fp16 loss scale); `twice_coef` holds 2 x coef (the
    derivative's factor) on the layers' device, so that nothing is read back to the host.
    """

    def __init__(self, layers: list[AdaptiveLoRALayer], gamma: float):
        super().__init__()
        self.weight = gamma / (2 * len(layers))
        self.coef = self.weight
        device = layers[0].lora_A.device
        self.twice_coef = torch.tensor(2 * self.coef, device=device)
        self.minus_eye = {r: -torch.eye(r, device=device) for r in {layer.r_max for layer in layers}}
        self.last: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(layers)
        self._pairs: list[tuple[tuple, torch.Tensor | None]] = [((), None)] * len(layers)
        for index, layer in enumerate(layers):
            self.handles.append(layer.register_forward_hook(self._hook(index), prepend=True))

    def _hook(self, index: int):
        def hook(layer: AdaptiveLoRALayer, args, out: torch.Tensor):
            if layer.merged or not torch.is_grad_enabled():
                return None
            A, B = layer.lora_A, layer.lora_B
            pairs, minus_eye = self.active_pairs(index, layer), self.minus_eye[layer.r_max]
            with torch.no_grad(), torch.autocast(A.device.type, enabled=False):
                a, b = A.float(), B.float()
                unit_a, norm_a = _unit_residual(a @ a.t(), minus_eye, pairs, self.twice_coef)
                unit_b, norm_b = _unit_residual(b.t() @ b, minus_eye, pairs, self.twice_coef)
            self.last[index] = norm_a, norm_b
            return _OrthogonalityGradient.apply(out, A, B, unit_a, unit_b)
        return hook

    def active_pairs(self, index: int, layer: AdaptiveLoRALayer) -> torch.Tensor | None:
        """The 0/1 (r x r) mask of pairs of active components (None: all active), rebuilt only when the layer's
        `active` changes (every in-place edit bumps its version)."""
        key = (layer.active.data_ptr(), layer.active._version)
        if self._pairs[index][0] != key:
            active = layer.active.float()
            pairs = None if layer.kept_components() is None else active[:, None] * active[None, :]
            self._pairs[index] = key, pairs
        return self._pairs[index][1]

    def scale(self, factor: float) -> None:
        """Scale the regularizer's gradient like the loss (1 / grad_accum, times an fp16 loss scale)."""
        self.coef = self.weight * factor
        self.twice_coef.fill_(2 * self.coef)

    def value(self) -> float:
        """The last forward's mean norm over all A and B (what gamma multiplies in the loss)."""
        norms = [norm for pair in self.last if pair is not None for norm in pair]
        return float(torch.stack(norms).sum()) / (2 * len(self.last)) if norms else 0.0


class InputSquareSums(LayerHooks):
    """Per-input-feature sums of x^2 over the tokens of each layer's training forwards (d_in, float32 each, views
    of one flat buffer), until `take()` hands them over and starts again at 0. Recomputed forwards (activation
    checkpointing) are not counted twice."""

    def __init__(self, layers: list[AdaptiveLoRALayer]):
        super().__init__()
        self.flat = torch.zeros(sum(layer.d_in for layer in layers), dtype=torch.float32,
                                device=layers[0].lora_A.device)
        self.sums = list(self.flat.split([layer.d_in for layer in layers]))
        for index, layer in enumerate(layers):
            self.handles.append(layer.register_forward_pre_hook(self._hook(index)))

    def _hook(self, index: int):
        def hook(layer: AdaptiveLoRALayer, args) -> None:
            if layer.merged or not torch.is_grad_enabled() or in_backward():
                return
            x = args[0]
            with torch.no_grad():
                self.sums[index].add_(x.float().pow(2).sum(tuple(range(x.dim() - 1))))
        return hook

    def take(self) -> torch.Tensor:
        """This step's sums of every layer, concatenated in float64; the accumulators restart at 0."""
        taken = self.flat.double()
        self.flat.zero_()
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
