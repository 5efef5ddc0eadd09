"""BatchedGates: every gated layer's B x gate in one operation per forward gives what each layer's own product
gives (outputs, gradients of A, B and lam), under activation checkpointing too, and only inside the forward."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils._python_dispatch import TorchDispatchMode

from scale_rank.gates import BatchedGates
from scale_rank.layer import AdaptiveLoRALayer


class Blocks(nn.Module):
    """Three blocks of two gated adapters (8 -> 12 -> 8; some components off in the second block), each block
    optionally recomputed in backward; `skip` leaves one block out of the forward."""

    def __init__(self, checkpointing: str | None = None, skip: int | None = None):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList()
        for block in range(3):
            for d_in, d_out in ((8, 12), (12, 8)):
                layer = AdaptiveLoRALayer(nn.Linear(d_in, d_out), r_max=4, scale=0.5)
                for param in (layer.lora_A, layer.lora_B, layer.lora_lam):
                    nn.init.normal_(param)
                layer.base_layer.requires_grad_(False)
                if block == 1:
                    layer.active[[0, 2]] = 0.0
                self.layers.append(layer)
        self.checkpointing, self.skip = checkpointing, skip

    def block(self, x: torch.Tensor, index: int) -> torch.Tensor:
        if index != self.skip:
            for k in (2 * index, 2 * index + 1):
                x = torch.tanh(self.layers[k](x))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for index in range(3):
            if self.checkpointing:
                x = checkpoint(self.block, x, index, use_reentrant=self.checkpointing == "reentrant")
            else:
                x = self.block(x, index)
        return x


def _run(model: Blocks, micro_batches: int = 1) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(1)
    for _ in range(micro_batches):
        x = torch.randn(5, 7, 8, requires_grad=model.checkpointing == "reentrant")
        out = model(x)
        out.square().sum().backward()
    return out.detach(), {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("checkpointing", [None, "non_reentrant", "reentrant"])
@pytest.mark.parametrize("micro_batches", [1, 2])
def test_batched_gates_give_each_layers_own_product(checkpointing, micro_batches):
    reference, reference_grads = _run(Blocks(checkpointing), micro_batches)
    model = Blocks(checkpointing)
    BatchedGates(model, list(model.layers))
    out, grads = _run(model, micro_batches)
    torch.testing.assert_close(out, reference, rtol=1e-6, atol=1e-6)
    assert grads.keys() == reference_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference_grads[name], rtol=1e-5, atol=1e-6, msg=name)
    assert all(layer.batched_B is None for layer in model.layers)


def test_the_forward_gates_every_layer_in_one_operation():
    """Without checkpointing the layers multiply no B by its gate themselves: one foreach product for all six."""
    counted = {}
    for batched in (False, True):
        model = Blocks()
        if batched:
            BatchedGates(model, list(model.layers))
        with _Ops() as ops:
            model(torch.randn(5, 7, 8))
        counted[batched] = ops.names
    assert counted[True].count("_foreach_mul") == 1
    assert counted[False].count("mul") - counted[True].count("mul") == 6


def test_layers_left_out_of_the_forward_get_no_gradient():
    reference, reference_grads = _run(Blocks(skip=2))
    model = Blocks(skip=2)
    BatchedGates(model, list(model.layers))
    out, grads = _run(model)
    torch.testing.assert_close(out, reference)
    assert all(p.grad is None for layer in model.layers[4:] for p in (layer.lora_B, layer.lora_lam))
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_no_batch_outside_a_forward_that_records_gradients():
    """Without gradients, after a forward, after one that raised, and once removed, each layer gates its B."""
    model = Blocks()
    gates = BatchedGates(model, list(model.layers))
    seen = []
    model.layers[0].register_forward_pre_hook(lambda layer, args: seen.append(layer.batched_B is not None))
    with torch.no_grad():
        model(torch.randn(2, 8))
    model(torch.randn(2, 8))
    with pytest.raises(RuntimeError):
        model(torch.randn(2, 5))  # wrong width: the first layer raises
    assert seen == [False, True, True]
    assert all(layer.batched_B is None for layer in model.layers)
    gates.remove()
    model(torch.randn(2, 8))
    assert seen[-1] is False
    assert not model._forward_pre_hooks and not model._forward_hooks


def test_layers_without_a_gate_are_left_alone():
    model = Blocks()
    for layer in model.layers:
        layer.gated = False
    gates = BatchedGates(model, list(model.layers))
    assert not gates.handles and not model._forward_pre_hooks
