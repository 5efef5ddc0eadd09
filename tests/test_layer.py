"""The adapter layer's forward and backward against the dense update W0 x + x (scale B diag(lam * active) A)^T."""
from __future__ import annotations

import pytest
import torch

from scale_rank.layer import AdaptiveLoRALayer


def _layer(gated: bool, inactive: list[int]) -> AdaptiveLoRALayer:
    torch.manual_seed(0)
    layer = AdaptiveLoRALayer(torch.nn.Linear(6, 5), r_max=4, scale=2.5)
    torch.nn.init.normal_(layer.lora_A)
    torch.nn.init.normal_(layer.lora_B)
    if gated:
        torch.nn.init.normal_(layer.lora_lam)
        layer.active[inactive] = 0.0
    else:
        layer.lora_lam.requires_grad_(False)
        layer.gated = False
    return layer


@pytest.mark.parametrize("gated,inactive", [(False, []), (True, []), (True, [1, 3])])
def test_forward_and_gradients_equal_the_dense_update(gated, inactive):
    layer = _layer(gated, inactive)
    x = torch.randn(3, 7, 6)
    out = layer(x)
    out.square().sum().backward()

    A, B = layer.lora_A.detach().double().requires_grad_(), layer.lora_B.detach().double().requires_grad_()
    lam = layer.lora_lam.detach().double().requires_grad_()
    gate = lam * layer.active.double() if gated else torch.ones(4, dtype=torch.float64)
    weight = layer.base_layer.weight.double() + 2.5 * (B * gate) @ A
    reference = x.double() @ weight.t() + layer.base_layer.bias.double()
    reference.square().sum().backward()

    assert out.double().detach() == pytest.approx(reference.detach(), rel=1e-5, abs=1e-5)
    assert layer.lora_A.grad.double() == pytest.approx(A.grad, rel=1e-4, abs=1e-4)
    assert layer.lora_B.grad.double() == pytest.approx(B.grad, rel=1e-4, abs=1e-4)
    if gated:
        assert layer.lora_lam.grad.double() == pytest.approx(lam.grad, rel=1e-4, abs=1e-4)
        assert (layer.lora_lam.grad[inactive] == 0).all()
    else:
        assert layer.lora_lam.grad is None
