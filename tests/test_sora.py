"""SoRA: the L1 proximal step on the gates, rank = non-zero gates, the gate optimizer group, xi schedule."""
from __future__ import annotations

import math

import pytest
import torch

from scale_rank.methods.sora import GATE_GROUP, soft_threshold
from scale_rank.schedules import staged_linear

from tests.support.methods import Run, fixed_batches

pytestmark = pytest.mark.usefixtures("single_thread")


def reference_prox(values: list[float], xi: float) -> list[float]:
    """sign(g) * max(|g| - xi, 0), one value at a time."""
    return [math.copysign(max(abs(g) - xi, 0.0), g) if g != 0 else 0.0 for g in values]


XI = 0.1
# values around 0, xi and 2*xi; the band (xi, 2xi) must survive (the official code's masks zeroed it)
GATE_VALUES = [-1.0, -0.25, -0.2, -0.19, -0.15, -0.11, -0.1, -0.05, 0.0, 0.05, 0.1, 0.1001, 0.12, 0.15,
               0.1999, 0.2, 0.2001, 0.5, 3.0]


def test_soft_threshold_elementwise():
    gate = torch.tensor(GATE_VALUES, dtype=torch.float64)
    other = -gate[:5].clone()  # several tensors in one call
    soft_threshold([gate, other], XI)  # in place
    expected = torch.tensor(reference_prox(GATE_VALUES, XI), dtype=torch.float64)
    torch.testing.assert_close(gate, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(other, -expected[:5], rtol=0, atol=1e-12)
    band = [(i, g) for i, g in enumerate(GATE_VALUES) if XI < abs(g) < 2 * XI]
    assert len(band) >= 6
    for i, g in band:  # survives, shrunk by xi, sign kept
        assert gate[i] != 0 and math.copysign(1, float(gate[i])) == math.copysign(1, g)
        assert float(gate[i]) == pytest.approx(g - math.copysign(XI, g), abs=1e-12)


def test_controller_applies_prox_with_configured_xi():
    """Through the controller: gates set by hand between observe() and apply() come out thresholded."""
    run = Run("sora", r_max=len(GATE_VALUES), xi=XI, targets=["attention.self.query"])
    ids, labels = fixed_batches()[0]
    run.model(input_ids=ids, labels=labels).loss.backward()
    run.controller.observe()
    with torch.no_grad():  # in place of the optimizer step
        for layer in run.layers:
            layer.lora_lam.copy_(torch.tensor(GATE_VALUES))
    run.controller.apply()
    expected = torch.tensor(reference_prox(GATE_VALUES, XI), dtype=torch.float32)
    for layer in run.layers:
        torch.testing.assert_close(layer.lora_lam.detach(), expected, rtol=0, atol=1e-6)


def test_rank_is_the_number_of_nonzero_gates_after_every_step():
    run = Run("sora", r_max=4, xi=5e-3, lr=1e-2, init="paper")  # N(0, 1) gates: small ones reach 0
    counts = {}

    def after_apply(step):
        counts[step] = [int((layer.lora_lam != 0).sum()) for layer in run.layers]
        assert run.method.ranks().tolist() == counts[step], step
        assert list(run.controller.ranks().values()) == counts[step]

    run.train(fixed_batches(), 12, after_apply=after_apply)
    assert sum(counts[12]) < sum(counts[1]), "xi = 5e-3 should zero some gates within 12 steps"
    # history: one entry at the first step and at every step where some module's rank changed
    changed = [1] + [t for t in range(2, 13) if counts[t] != counts[t - 1]]
    history = run.controller.history
    assert [h["step"] for h in history] == changed
    for entry in history:
        assert entry["ranks"] == counts[entry["step"]]


def test_gates_get_their_own_group_without_weight_decay():
    run = Run("sora", r_max=4, gate_lr=5e-2)
    groups = run.method.optimizer_groups(run.layers, lr=1e-3, weight_decay=0.3)
    by_name = {g["name"]: g for g in groups}
    gates = by_name[GATE_GROUP]
    assert gates["weight_decay"] == 0.0 and gates["lr"] == 5e-2
    assert {id(p) for p in gates["params"]} == {id(layer.lora_lam) for layer in run.layers}
    others = [p for g in groups if g["name"] != GATE_GROUP for p in g["params"]]
    assert {id(p) for p in others} == {id(p) for layer in run.layers for p in (layer.lora_A, layer.lora_B)}
    assert all(g["weight_decay"] == 0.3 for g in groups if g["name"] != GATE_GROUP)

    # behaviour: with zero gradients AdamW decays A but leaves the gates alone
    opt = torch.optim.AdamW(groups)
    before_lam = [layer.lora_lam.detach().clone() for layer in run.layers]
    before_A = [layer.lora_A.detach().clone() for layer in run.layers]
    for layer in run.layers:
        for p in (layer.lora_A, layer.lora_B, layer.lora_lam):
            p.grad = torch.zeros_like(p)
    opt.step()
    for layer, lam, A in zip(run.layers, before_lam, before_A):
        assert torch.equal(layer.lora_lam.detach(), lam)
        torch.testing.assert_close(layer.lora_A.detach(), A * (1 - 1e-3 * 0.3))


def test_gate_lr_defaults_to_training_lr():
    run = Run("sora", r_max=4)
    groups = run.method.optimizer_groups(run.layers, lr=2e-3, weight_decay=0.0)
    assert {g["name"]: g["lr"] for g in groups} == {"adapters": 2e-3, GATE_GROUP: 2e-3}


@pytest.mark.parametrize("init", ["lora", "paper"])
def test_init_and_scale(init):
    run = Run("sora", r_max=8, alpha=16.0, init=init)
    gates = torch.cat([layer.lora_lam.detach() for layer in run.layers])
    if init == "paper":
        assert 0.7 < float(gates.std()) < 1.3 and float(gates.abs().min()) < 0.5  # N(0, 1)
    else:
        assert torch.equal(gates, torch.ones_like(gates))  # a LoRA adapter of alpha 16, rank 8
    for layer in run.layers:
        assert torch.all(layer.lora_B == 0)
        assert float(layer.scale) == pytest.approx(16.0 / 8)
        bound = 1 / math.sqrt(layer.d_in)  # kaiming_uniform(a=sqrt 5) on (r, d_in)
        assert float(layer.lora_A.detach().abs().max()) <= bound + 1e-6


def test_l1_term_is_the_mean_over_all_gates():
    """The official code adds l1 * sum|g| / p_total (p_total: every gate of every module): its gradient is
    l1 * sign(g) / p_total (our former term was p_total times stronger: this test fails on it)."""
    run = Run("sora", r_max=4, l1=0.25)
    p_total = 4 * len(run.layers)
    ids, labels = fixed_batches()[0]
    run.model(input_ids=ids, labels=labels).loss.backward()
    plain = [layer.lora_lam.grad.clone() for layer in run.layers]
    signs = [layer.lora_lam.detach().sign() for layer in run.layers]
    run.controller.observe()
    for layer, g, s in zip(run.layers, plain, signs):
        torch.testing.assert_close(layer.lora_lam.grad, g + 0.25 / p_total * s)
    run.optimizer.step()
    run.controller.apply()


def test_xi_schedule():
    # constant without xi_end
    assert staged_linear(37, 100, 1e-3, None, 1) == 1e-3
    # continuous ramp: start + (end - start) * t / T, capped at the end
    for t in (0, 10, 50, 100, 150):
        assert staged_linear(t, 100, 0.0, 2.0, 1) == pytest.approx(2.0 * min(t, 100) / 100)
    # 4 plateaus from 0 to 3: [0, 25) -> 0, [25, 50) -> 1, [50, 75) -> 2, [75, ...) -> 3
    expected = {0: 0, 24: 0, 25: 1, 49: 1, 50: 2, 74: 2, 75: 3, 100: 3, 120: 3}
    for t, value in expected.items():
        assert staged_linear(t, 100, 0.0, 3.0, 4) == pytest.approx(value), t


def test_xi_mode_lr_follows_gate_group_lr():
    run = Run("sora", r_max=4, xi=0.5, xi_mode="lr", gate_lr=0.02)
    assert run.method.xi(1) == pytest.approx(0.5 * 0.02)
    run.method.track_optimizer(run.optimizer)
    group = next(g for g in run.optimizer.param_groups if g["name"] == GATE_GROUP)
    group["lr"] = 0.004  # as a scheduler would
    assert run.method.xi(5) == pytest.approx(0.5 * 0.004)


def test_xi_mode_lr_uses_the_rate_of_the_step_taken():
    """A scheduler stepping between the optimizer step and apply() must not shift the threshold to the next
    step's rate: on the last step of a linear decay that rate is 0 and nothing would be thresholded."""
    T, xi, lr = 4, 0.5, 0.02
    run = Run("sora", r_max=4, xi=xi, xi_mode="lr", total_steps=T, lr=lr)
    run.method.track_optimizer(run.optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(run.optimizer, lambda step: 1 - step / T)
    thresholds = []

    def after_optimizer(step):
        gates = [layer.lora_lam.detach().clone() for layer in run.layers]
        scheduler.step()  # the loop's order: optimizer, scheduler, then the controller's apply
        state["gates"] = gates

    def after_apply(step):
        before = torch.cat(state["gates"])
        after = torch.cat([layer.lora_lam.detach() for layer in run.layers])
        survived = after != 0
        thresholds.append(float((before.abs() - after.abs())[survived].mean()))

    state = {}
    run.train(fixed_batches(), T, after_optimizer=after_optimizer, after_apply=after_apply)
    used = [xi * lr * (1 - (t - 1) / T) for t in range(1, T + 1)]
    assert thresholds == pytest.approx(used, rel=1e-3)


def test_xi_mode_lr_without_a_known_lr_fails_clearly():
    run = Run("sora", r_max=4, xi=0.5, xi_mode="lr")  # no gate_lr, optimizer not tracked
    with pytest.raises(RuntimeError, match="set method.gate_lr, or call method.track_optimizer"):
        run.train(fixed_batches(), 1)
    run.method.track_optimizer(run.optimizer)  # the fix the message names
    run.train(fixed_batches(), 1)
    assert run.method.xi(1) == pytest.approx(0.5 * 1e-2)


def test_zero_xi_leaves_gates_to_the_optimizer():
    run = Run("sora", r_max=4, xi=0.0)
    run.train(fixed_batches(), 3)
    assert [h["ranks"] for h in run.controller.history] == [[4] * len(run.layers)]
