"""Per-entry EMA sensitivity of adapter parameters (AdaLoRA, IncreLoRA), on this rank's local slices.

I = |w * g|;  I_bar <- b1 I_bar + (1-b1) I;  U_bar <- b2 U_bar + (1-b2) |I - I_bar|;  s = I_bar * U_bar.

All local slices of all modules live in one flat buffer, so an update is a handful of vector operations
whatever the number of modules, and per-component partial sums are one index_add. When this rank holds the
parameters whole (one process), the buffer is also seen as one view per parameter, and the update works on
the parameters and their gradients with `torch._foreach_*` operations: no slice per parameter. When every
rank holds them whole but scores a range of each (DDP), the views of those ranges of the values are kept
from step to step (rebuilt if a parameter's storage moves), and so are those of the gradients while they
live in DDP's buckets: an update is then two concatenations and the vector operations.
"""
from __future__ import annotations

import torch

from .components import ComponentLayout
from .layer import AdaptiveLoRALayer
from .shards import ShardAccess

KINDS = ("A", "B", "lam")


def adapter_params(layer: AdaptiveLoRALayer) -> dict[str, torch.nn.Parameter]:
    return {"A": layer.lora_A, "B": layer.lora_B, "lam": layer.lora_lam}


class SensitivityTracker:
    """EMAs beside the local slice of every A, B and lam; partial sums per component and kind."""

    def __init__(self, layers: list[AdaptiveLoRALayer], layout: ComponentLayout, access: ShardAccess,
                 beta1: float, beta2: float):
        self.layers, self.layout, self.access = layers, layout, access
        self.beta1, self.beta2 = beta1, beta2
        self.params: list[torch.nn.Parameter] = []
        index = []
        for k, layer in enumerate(layers):
            for slot, kind in enumerate(KINDS):
                param = adapter_params(layer)[kind]
                local = access.scoring(param)
                ids = layout.component_index(kind, k, local.start, local.end, layer.r_max, layer.d_in)
                index.append(ids + slot * layout.n_components)
                self.params.append(param)
        device = layers[0].lora_A.device
        self.index = torch.cat(index).to(device=device, dtype=torch.int32)
        self.i_bar = torch.zeros(self.index.numel(), device=device)
        self.u_bar = torch.zeros_like(self.i_bar)
        float32 = all(p.dtype == torch.float32 for p in self.params)
        self.whole = access.whole_tensors and float32
        if self.whole:  # the buffers seen per parameter, in the order (and row-major layout) of the index
            sizes = [p.numel() for p in self.params]
            self.i_views = [v.view(p.shape) for v, p in zip(self.i_bar.split(sizes), self.params)]
            self.u_views = [v.view(p.shape) for v, p in zip(self.u_bar.split(sizes), self.params)]
        # a replicated parameter (DDP): this rank scores the same flat range of it at every step
        self.ranges = None
        if not self.whole and access.stores_whole and float32:
            self.ranges = [(local.start, local.end) for local in map(access.scoring, self.params)]
        self._value_views: tuple[list[int], list[torch.Tensor]] = ([], [])
        self._grad_views: tuple[list[int], list[torch.Tensor]] = ([], [])

    @torch.no_grad()
    def update(self, grad_factor: torch.Tensor | float = 1.0) -> None:
        """Fold the current gradients, times `grad_factor` (a clipping the optimizer has still to apply), into
        the EMAs (call once per optimizer step, grads present)."""
        if self.whole:
            self._update_whole(grad_factor)
            return
        if self.ranges is not None:
            values = torch.cat(self._scored_values())
            grads = torch.cat(self._scored_grads())
        else:
            slices = [self.access.scoring(p) for p in self.params]
            values = torch.cat([s.values.float() for s in slices])
            grads = torch.cat([_grad_or_zeros(s) for s in slices])
        if isinstance(grad_factor, torch.Tensor):
            grads.mul_(grad_factor.to(grads.device))
        sensitivity = values.mul_(grads).abs_()
        self.i_bar.lerp_(sensitivity, 1 - self.beta1)
        self.u_bar.mul_(self.beta2).add_(sensitivity.sub_(self.i_bar).abs_(), alpha=1 - self.beta2)

    def _scored_values(self) -> list[torch.Tensor]:
        """Views of the scored range of every replicated parameter, made again when a storage moved."""
        pointers = [p.data_ptr() for p in self.params]
        if pointers != self._value_views[0]:
            self._value_views = (pointers, self._range_views([p.detach() for p in self.params]))
        return self._value_views[1]

    def _scored_grads(self) -> list[torch.Tensor]:
        """Views of the scored range of every replicated parameter's gradient (zeros where it has none).

        Kept from step to step while the gradients are views into storage that outlives them (DDP with
        `gradient_as_bucket_view`: every backward writes into the same buckets), made again when one moves.
        Gradients that are tensors of their own are new every step; keeping views of them would keep a
        step's gradients alive into the next, so they are sliced afresh.
        """
        grads = [p.grad for p in self.params]
        if any(grad is None for grad in grads):
            return self._range_views(grads)
        pointers = [grad.data_ptr() for grad in grads]
        if pointers == self._grad_views[0]:
            return self._grad_views[1]
        views = self._range_views(grads)
        self._grad_views = (pointers, views) if all(grad._is_view() for grad in grads) else ([], [])
        return views

    def _range_views(self, tensors: list[torch.Tensor | None]) -> list[torch.Tensor]:
        """The scored range of each tensor, flattened (zeros in place of a missing gradient)."""
        return [t.view(-1)[start:end] if t is not None else torch.zeros(end - start, device=self.i_bar.device)
                for t, (start, end) in zip(tensors, self.ranges)]

    def _update_whole(self, grad_factor: torch.Tensor | float) -> None:
        """`update` on whole float32 parameters: the same elementwise operations, one foreach call each."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        if isinstance(grad_factor, torch.Tensor):
            grads = torch._foreach_mul(grads, grad_factor.to(self.i_bar.device))
        sensitivity = torch._foreach_mul(self.params, grads)
        torch._foreach_abs_(sensitivity)
        torch._foreach_lerp_(self.i_views, sensitivity, 1 - self.beta1)
        torch._foreach_sub_(sensitivity, self.i_views)
        torch._foreach_abs_(sensitivity)
        torch._foreach_mul_(self.u_views, self.beta2)
        torch._foreach_add_(self.u_views, sensitivity, alpha=1 - self.beta2)

    def partial_sums(self) -> torch.Tensor:
        """float64 [sum s over A entries | over B entries | over lam entries], per component."""
        out = torch.zeros(3 * self.layout.n_components, dtype=torch.float64, device=self.i_bar.device)
        return out.index_add_(0, self.index, (self.i_bar * self.u_bar).double())

    def component_scores(self, sums: torch.Tensor) -> torch.Tensor:
        """S_ki = s(lam_i) + mean_j s(A_ij) + mean_j s(B_ji) from globally reduced partial sums."""
        n = self.layout.n_components
        sums = sums.cpu()
        return sums[2 * n:] + sums[:n] / self.layout.d_in + sums[n:2 * n] / self.layout.d_out

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"i_bar": self.i_bar.clone(), "u_bar": self.u_bar.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for key in ("i_bar", "u_bar"):
            if state[key].shape != getattr(self, key).shape:
                raise ValueError(f"sensitivity state {key} has shape {tuple(state[key].shape)}, expected "
                                 f"{tuple(getattr(self, key).shape)}: the checkpoint comes from another "
                                 "model, method or sharding")
            getattr(self, key).copy_(state[key])


def _grad_or_zeros(local) -> torch.Tensor:
    return local.grad.float() if local.grad is not None else torch.zeros_like(local.values, dtype=torch.float32)
