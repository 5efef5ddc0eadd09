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


def test_lam_zero_where_off_skips_active_in_the_forward():
    """A method that keeps lam at 0 where a component is off (IncreLoRA) lets the forward skip `active`: the
    same output as the masked forward, and lam's gradient there is left for the method to zero."""
    masked, trusting = _layer(True, [1, 3]), _layer(True, [1, 3])
    for layer in (masked, trusting):
        with torch.no_grad():
            layer.lora_lam[[1, 3]] = 0.0
    trusting.lam_zero_where_off = True
    x = torch.randn(3, 7, 6)
    out_masked, out_trusting = masked(x), trusting(x)
    assert torch.allclose(out_masked, out_trusting, rtol=1e-6, atol=1e-6)
    out_masked.square().sum().backward()
    out_trusting.square().sum().backward()
    assert torch.allclose(masked.lora_A.grad, trusting.lora_A.grad, rtol=1e-5, atol=1e-6)
    assert torch.allclose(masked.lora_B.grad, trusting.lora_B.grad, rtol=1e-5, atol=1e-6)
    keep = masked.active.bool()
    assert torch.allclose(masked.lora_lam.grad[keep], trusting.lora_lam.grad[keep], rtol=1e-5, atol=1e-6)
    assert (masked.lora_lam.grad[~keep] == 0).all() and (trusting.lora_lam.grad[~keep] != 0).all()
