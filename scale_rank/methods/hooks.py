"""Work a method adds to the adapter layers' forward and backward, installed as module hooks by that method.

The adapter layer computes only the LoRA update. A method that needs more installs one of these on its layers
in `bind` and removes it when it is done (`remove()`):

- OrthogonalityRegularizer (AdaLoRA, IncreLoRA; gamma > 0): adds gamma x the mean orthogonality norm to the
  loss through each layer's output (one process and DDP: through the first layer's, for all layers at once);
- InputSquareSums (PRILoRA): per-input-feature sums of squares of each layer's input;
- DenseGradient (IncreLoRA, score="dense"): dL/d(Delta W) of each layer, accumulated over micro-batches.

Forward hooks are prepended so that they run before any hook an engine registers on the same module: FSDP2
and ZeRO-3 release gathered parameters in their own post-forward hooks, and the regularizer reads A and B.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..layer import AdaptiveLoRALayer, in_backward
from ..shards import already_present, one_group_per_layer


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


@dataclass
class _FactorGroup:
    """Factors of one kind ("A": r x d_in, or "B": d_out x r) and one shape, computed as one batch."""

    kind: str
    members: list[int]  # indices of the layers
    r: int
    pairs_key: tuple = ()
    pairs: torch.Tensor | None = None  # (g, r, r) 0/1 mask of active pairs; None: every component active


def _batch(factors: list[torch.Tensor]) -> torch.Tensor:
    """The factors as one float32 (g, rows, cols) batch: a view (no copy) of a single factor."""
    if len(factors) == 1:
        return factors[0].float().unsqueeze(0)
    return torch.stack([factor.float() for factor in factors])


def _gram(batch: torch.Tensor, kind: str) -> torch.Tensor:
    """A A^T for A factors, B^T B for B factors: (g, r, r)."""
    return torch.bmm(batch, batch.transpose(1, 2)) if kind == "A" else torch.bmm(batch.transpose(1, 2), batch)


def _times_factor(units: torch.Tensor, batch: torch.Tensor, kind: str) -> torch.Tensor:
    """The closed-form gradient: units A for A factors, B units for B factors."""
    return torch.bmm(units, batch) if kind == "A" else torch.bmm(batch, units)


class _OrthogonalityGradient(torch.autograd.Function):
    """Identity on `out` whose backward also gives the factors the regularizer's gradient in closed form.

    For M = A A^T - I (symmetric), d||M||_F / dA = 2 M A / ||M||_F, and for N = B^T B - I, d||N||_F / dB =
    2 B N / ||N||_F. The forward hook hands in, per group of factors of one shape, the units 2 coef M / ||M||
    (float32, g x r x r), so the backward is one batched matrix product per group. The gradient rides on a layer
    output so that engines that gather parameters only around a module's forward and backward (FSDP, ZeRO-3)
    have the factors present when it is computed (there, every layer whose factors are released after its
    module carries its own; `ensure_present` gathers a persistent ZeRO-3 factor released before its time).

    `tensors` holds the factors of every group in order, then each group's units. `deferred` (one process and
    DDP): the factors (the parameters themselves) come in `deferred` instead, and `tensors` holds only the
    units; instead of handing each factor its gradient through autograd (one accumulation per factor), add all
    of them to the factors' `.grad` with one foreach operation once this backward pass is over, after every
    end-of-backward callback queued before then: DDP's, which writes the averaged gradients into `.grad`, comes
    first. As the factors are then no inputs of this function, autograd does not hold back their gradient
    accumulation until it reaches the first layer's output: DDP reduces each bucket as the backward passes its
    layers, as it does for LoRA. The regularizer's gradient is the same on every rank, so adding it after the
    averaging gives what adding it before would (and what one process computes).
    """

    @staticmethod
    def forward(ctx, out: torch.Tensor, kinds: tuple[str, ...], sizes: tuple[int, ...],
                deferred: list[torch.Tensor] | None, ensure_present, *tensors: torch.Tensor) -> torch.Tensor:
        ctx.kinds, ctx.sizes, ctx.deferred, ctx.ensure_present = kinds, sizes, deferred, ensure_present
        ctx.save_for_backward(*tensors)
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        saved = ctx.saved_tensors
        count = 0 if ctx.deferred is not None else sum(ctx.sizes)
        factors, grads, start = (ctx.deferred if ctx.deferred is not None else saved[:count]), [], 0
        ctx.ensure_present(list(factors))
        for kind, size, units in zip(ctx.kinds, ctx.sizes, saved[count:]):
            group = factors[start:start + size]
            start += size
            gradient = _times_factor(units, _batch(list(group)), kind)
            grads += [g.to(f.dtype) for g, f in zip(gradient.unbind(0), group)]
        if ctx.deferred is not None:
            _after_backward_callbacks(lambda params=ctx.deferred, grads=grads: _add_to_grads(params, grads))
            return (grad_out, None, None, None, None, *([None] * (count + len(ctx.sizes))))
        return (grad_out, None, None, None, None, *grads, *([None] * len(ctx.sizes)))


def _after_backward_callbacks(callback) -> None:
    """Run `callback` at the end of this backward pass, after the callbacks queued so far and those they queue
    (a callback queued from a callback runs after every one queued before it)."""
    queue = torch.autograd.Variable._execution_engine.queue_callback
    queue(lambda: queue(callback))


def _add_to_grads(params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
    """param.grad += grad for every pair, in one foreach operation (a missing .grad becomes the grad)."""
    present = [(p.grad, g) for p, g in zip(params, grads) if p.grad is not None]
    if present:
        torch._foreach_add_([p for p, _ in present], [g for _, g in present])
    for param, grad in zip(params, grads):
        if param.grad is None:
            param.grad = grad.clone()


class OrthogonalityRegularizer(LayerHooks):
    """loss += gamma x the mean of ||A A^T - I||_F and ||B^T B - I||_F over every A and B (2 per module, counted
    separately: AdaLoRA's, IncreLoRA's and PEFT's normalisation), each over the layer's active components,
    applied in every training forward (docs/methods.md, "Orthogonality regularizer").

    The term is not added to the loss: a forward hook computes the residuals (float32, no autocast) and
    `_OrthogonalityGradient` adds their closed-form gradient in the backward. `groups`
    (`ShardAccess.resident_groups`; default one per layer): each group's first layer carries one hook for
    the group, in one batch per factor shape, reading the factors after `ensure_present`
    (`ShardAccess.ensure_present`) in the forward and in the backward; one process and DDP have one group, so
    the work per step does not grow with the number of modules; FSDP2 one per sharding unit (transformer
    block); ZeRO-3 one for its persistent factors. One layer per group multiplies batches of one: the same
    kernels, the same bits. `defer_grads` (one process and DDP, with a single group): the gradients go
    straight into `.grad` with one foreach operation at the end of the backward, after DDP's own
    end-of-backward callback has written the averaged gradients; elsewhere (FSDP,
    ZeRO: the engine moves gradients into shards during the backward) they flow through autograd into the
    engine's reduction. `coef` is gamma / (2 x modules) times `scale(factor)` (1 / grad_accum and an fp16 loss
    scale); `twice_coef` holds 2 x coef (the derivative's factor) on the layers' device, so that nothing is
    read back to the host.
    """

    def __init__(self, layers: list[AdaptiveLoRALayer], gamma: float, groups: list[list[int]] | None = None,
                 defer_grads: bool = False, ensure_present=already_present):
        super().__init__()
        groups = groups if groups is not None else one_group_per_layer(layers)
        if defer_grads and len(groups) != 1:
            raise ValueError("defer_grads needs a single group (one hook that sees every factor)")
        self.layers, self.defer_grads, self.ensure_present = layers, defer_grads, ensure_present
        self.weight = gamma / (2 * len(layers))
        self.coef = self.weight
        device = layers[0].lora_A.device
        self.twice_coef = torch.tensor(2 * self.coef, device=device)
        self.minus_eye = {r: -torch.eye(r, device=device) for r in {layer.r_max for layer in layers}}
        plans = [(layers[members[0]], self._groups(members)) for members in groups]
        self.groups = [group for _, groups in plans for group in groups]
        self.last: list[torch.Tensor | None] = [None] * len(self.groups)  # each group's norms
        slot = 0
        for host, groups in plans:
            self.handles.append(host.register_forward_hook(self._hook(groups, slot), prepend=True))
            slot += len(groups)

    def _groups(self, indices) -> list[_FactorGroup]:
        """The layers' A factors grouped by shape, then their B factors."""
        by_shape: dict[tuple, _FactorGroup] = {}
        for kind in ("A", "B"):
            for index in indices:
                layer = self.layers[index]
                key = (kind, layer.r_max, layer.d_in if kind == "A" else layer.d_out)
                by_shape.setdefault(key, _FactorGroup(kind, [], layer.r_max)).members.append(index)
        return list(by_shape.values())

    def _hook(self, groups: list[_FactorGroup], slot: int):
        kinds, sizes = tuple(g.kind for g in groups), tuple(len(g.members) for g in groups)

        def hook(layer: AdaptiveLoRALayer, args, out: torch.Tensor):
            if layer.merged or not torch.is_grad_enabled():
                return None
            by_group = [[self.layers[i].lora_A if group.kind == "A" else self.layers[i].lora_B
                         for i in group.members] for group in groups]
            factors, units = [factor for params in by_group for factor in params], []
            self.ensure_present(factors)
            with torch.no_grad(), torch.autocast(out.device.type, enabled=False):
                for offset, (group, params) in enumerate(zip(groups, by_group)):
                    residual = _gram(_batch(params), group.kind).add_(self.minus_eye[group.r])
                    pairs = self.active_pairs(group)
                    if pairs is not None:
                        residual.mul_(pairs)
                    norms = torch.linalg.vector_norm(residual, dim=(1, 2))
                    # a residual of exactly 0 (orthonormal factors; a rank-1 factor whose norm rounds to 1 as
                    # the learning rate decays) gets gradient 0, autograd's choice, not 0 / 0 = NaN
                    inverse = self.twice_coef / norms.clamp_min(torch.finfo(norms.dtype).tiny)
                    units.append(residual.mul_(inverse.view(-1, 1, 1)))
                    self.last[slot + offset] = norms
            if self.defer_grads:
                return _OrthogonalityGradient.apply(out, kinds, sizes, factors, self.ensure_present, *units)
            return _OrthogonalityGradient.apply(out, kinds, sizes, None, self.ensure_present, *factors, *units)
        return hook

    def active_pairs(self, group: _FactorGroup) -> torch.Tensor | None:
        """The 0/1 (g x r x r) mask of pairs of active components of the group's layers (None: all active),
        rebuilt only when one of their `active` buffers changes (every in-place edit bumps its version)."""
        actives = [self.layers[i].active for i in group.members]
        key = tuple((active.data_ptr(), active._version) for active in actives)
        if group.pairs_key != key:
            if all(self.layers[i].kept_components() is None for i in group.members):
                group.pairs = None
            else:
                active = torch.stack(actives).float()
                group.pairs = active[:, :, None] * active[:, None, :]
            group.pairs_key = key
        return group.pairs

    def scale(self, factor: float) -> None:
        """Scale the regularizer's gradient like the loss (1 / grad_accum, times an fp16 loss scale)."""
        self.coef = self.weight * factor
        self.twice_coef.fill_(2 * self.coef)

    def value(self) -> float:
        """The last forward's mean norm over all A and B (what gamma multiplies in the loss)."""
        norms = [n for n in self.last if n is not None]
        return float(torch.cat(norms).sum()) / (2 * len(self.layers)) if norms else 0.0


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
            with torch.no_grad():  # sqrt(sum x^2) reduced in float32 straight from x (no float32 copy), squared
                norms = torch.linalg.vector_norm(x, 2, dim=tuple(range(x.dim() - 1)), dtype=torch.float32)
                self.sums[index].addcmul_(norms, norms)
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
