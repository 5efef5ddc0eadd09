"""AdaLoRA: budget schedule, sensitivity scores, global top-k, lam masking, config checks.

Every expected value is computed here from docs/methods.md's formulas (exact fractions, per-module loops),
never read back from the library.
"""
from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

import scale_rank as sr
from scale_rank.config import AdaLoRAConfig, ConfigError, LoRAConfig, method_config
from scale_rank.methods.adalora import keep_top
from scale_rank.schedules import cubic_budget

from tests.support.methods import ReferenceScores, Run, fixed_batches, tiny_bert

pytestmark = pytest.mark.usefixtures("single_thread")

N_MODULES = 12  # 2 layers x 6 matrices of the tiny BERT


def reference_budget(t: int, T: int, b0: int, bT: int, t_init: int, t_final: int) -> int:
    """b(t) of docs/methods.md in exact arithmetic (int() of a positive number is its floor)."""
    if t <= t_init:
        return b0
    if t > T - t_final:
        return bT
    progress = 1 - Fraction(t - t_init, T - t_final - t_init)
    return math.floor(bT + (b0 - bT) * progress ** 3)


# ------------------------------------------------------------------------------------------------
# budget schedule
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("T,t_init,t_final,b0,bT", [
    (100, 10, 30, 72 * 12, 72 * 8),   # DeBERTa-sized budget, default phase lengths
    (20, 3, 6, 48, 24),
    (10, 0, 2, 48, 24),               # no warm-up phase
    (50, 5, 0, 30, 0),                # no final phase, prune to rank 0
])
def test_cubic_budget_matches_formula(T, t_init, t_final, b0, bT):
    for t in range(0, T + 3):
        assert cubic_budget(t, T, b0, bT, t_init, t_final) == reference_budget(t, T, b0, bT, t_init, t_final), t


def test_cubic_budget_hand_values_and_boundaries():
    # T=20, t_init=4, t_final=6: the cubic runs over (4, 14], length 10.
    T, ti, tf, b0, bT = 20, 4, 6, 48, 24
    b = lambda t: cubic_budget(t, T, b0, bT, ti, tf)  # noqa: E731
    assert b(0) == 48 and b(4) == 48                       # t <= t_init: b0 (boundary included)
    assert b(5) == 24 + math.floor(24 * 0.9 ** 3)          # 24 + 17.496 -> 41
    assert b(5) == 41
    assert b(9) == 24 + 3                                  # progress 1/2: 24 * 1/8 = 3 exactly
    assert b(13) == 24                                     # 24 + 24 * 0.1**3 = 24.024 -> 24
    assert b(14) == 24                                     # t = T - t_final: progress 0 -> bT
    assert b(15) == 24 and b(20) == 24 and b(25) == 24     # final phase: bT
    # monotone non-increasing
    values = [b(t) for t in range(T + 1)]
    assert all(x >= y for x, y in zip(values, values[1:]))


def test_method_budget_and_decision_steps():
    T, ti, tf, dt = 30, 4, 8, 3
    run = Run("adalora", total_steps=T, r_init=4, r_target=2, t_init=ti, t_final=tf, delta_t=dt)
    method = run.method
    b0, bT = 4 * N_MODULES, 2 * N_MODULES
    for t in range(T + 2):
        assert method.scheduled_budget(t) == reference_budget(t, T, b0, bT, ti, tf)
    # re-masking when t % delta_t == 0 inside (t_init, T - t_final], and once at T - t_final itself
    expected = {t for t in range(ti + 1, T - tf + 1) if t % dt == 0} | {T - tf}
    assert {t for t in range(T + 2) if method.decides_at(t)} == expected


def test_default_phases_resolve_to_10_and_30_percent():
    cfg = method_config("adalora")
    assert cfg.resolved_phases(1000) == (100, 300)


# ------------------------------------------------------------------------------------------------
# sensitivity scores against a per-module, per-entry loop
# ------------------------------------------------------------------------------------------------

def test_component_scores_match_per_entry_reference():
    """S_ki = s(lam_i) + mean_j s(A_ij) + mean_j s(B_ji), EMAs recomputed entry by entry.

    The reference scores each step with the weights and gradients present after backward, before the
    optimizer step: that is when the controller observes (docs/design.md's binding order). docs/methods.md says
    AdaLoRA's code scores after the optimizer step (post-step weights, same gradient); the two differ by
    one optimizer update of w in I = |w * g|. This test pins the implemented (pre-step) reading.
    """
    T, ti, tf, dt = 20, 3, 6, 2
    run = Run("adalora", total_steps=T, r_init=4, r_target=2, t_init=ti, t_final=tf, delta_t=dt, lr=1e-2)
    ref = ReferenceScores(0.85, 0.85)
    checked = []

    def before_observe(step):
        if step <= T - tf:  # the scores are frozen in the final phase
            ref.update(run.layers)  # scored with the weights and gradients of this optimizer step

    def after_apply(step):
        if not run.method.decides_at(step):
            return
        expected = ref.component_scores(run.layers)
        actual = run.method.last_scores.double()
        assert expected.abs().max() > 0, "scores should be non-trivial after a few steps"
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-12 * float(expected.abs().max()))
        # the decision keeps the b(t) best by the reference scores (robust to float near-ties)
        mask = run.method.mask.bool()
        budget = reference_budget(step, T, 4 * N_MODULES, 2 * N_MODULES, ti, tf)
        assert int(mask.sum()) == budget
        if 0 < budget < len(mask):
            assert expected[mask].min() >= expected[~mask].max() * (1 - 1e-4)
        checked.append(step)

    run.train(fixed_batches(), 16, before_observe=before_observe, after_apply=after_apply)
    assert checked == [4, 6, 8, 10, 12, 14]


def test_scores_are_frozen_in_final_phase():
    T, tf = 12, 4
    run = Run("adalora", total_steps=T, r_init=3, r_target=1, t_init=2, t_final=tf, delta_t=1)
    batches = fixed_batches()
    run.train(batches, T - tf)
    frozen = {k: v.clone() for k, v in run.method.tracker.state_dict().items()}
    mask = run.method.mask.clone()
    run.train(batches, tf)
    for key, value in run.method.tracker.state_dict().items():
        assert torch.equal(value, frozen[key])
    assert torch.equal(run.method.mask, mask)
    assert int(mask.sum()) == 1 * N_MODULES


# ------------------------------------------------------------------------------------------------
# top-k with ties, lam masking
# ------------------------------------------------------------------------------------------------

def test_keep_top_exact_count_with_ties():
    scores = torch.tensor([3.0, 1.0, 1.0, 1.0, 0.0, 1.0])
    for budget in range(len(scores) + 1):
        keep = keep_top(scores, budget)
        assert int(keep.sum()) == budget
        if 0 < budget < len(scores):  # never keeps a lower score over a higher one
            assert scores[keep.bool()].min() >= scores[~keep.bool()].max()
    all_tied = torch.zeros(10)
    assert int(keep_top(all_tied, 7).sum()) == 7


def test_global_topk_keeps_exactly_budget_when_all_scores_tie():
    """With lam = 0 at init and no regularizer, every score of the first step is 0: a full tie."""
    T, ti, tf = 10, 0, 2
    run = Run("adalora", total_steps=T, r_init=4, r_target=2, t_init=ti, t_final=tf, delta_t=1, gamma=0.0)
    seen = []

    def after_apply(step):
        assert run.method.decides_at(step)  # t_init = 0, delta_t = 1: a masking event every step
        if step == 1:
            assert torch.all(run.method.last_scores == 0), "expected a complete tie at step 1"
        seen.append((int(run.method.mask.sum()), reference_budget(step, T, 4 * N_MODULES, 2 * N_MODULES, ti, tf)))

    run.train(fixed_batches(), 8, after_apply=after_apply)
    assert seen[0][1] == 40 and seen[0][0] == 40  # 24 + 24 * (7/8)^3 = 40.07
    assert all(kept == budget for kept, budget in seen)
    assert [sum(h["ranks"]) for h in run.controller.history] == [budget for _, budget in seen]


def test_pruned_lam_is_zero_after_masking_and_can_regrow_between_events():
    T, ti, tf, dt = 24, 3, 6, 3
    run = Run("adalora", total_steps=T, r_init=4, r_target=2, t_init=ti, t_final=tf, delta_t=dt, lr=1e-2)
    end = T - tf
    regrown, pruned_ab_trained, events = [], [], []
    state = {}

    def lam():
        return torch.cat([layer.lora_lam.detach().clone() for layer in run.layers])

    def A_rows():
        return [layer.lora_A.detach().clone() for layer in run.layers]

    def after_apply(step):
        mask = run.method.mask.bool()
        values = lam()
        if run.method.decides_at(step) or step > end:
            # right after a masking event (and every step of the final phase) pruned lam is exactly 0
            assert int(mask.sum()) == reference_budget(step, T, 4 * N_MODULES, 2 * N_MODULES, ti, tf)
            if (~mask).any():
                assert torch.all(values[~mask] == 0), step
            assert torch.any(values[mask] != 0)
            events.append(step)
            state["pruned"], state["A"] = ~mask, A_rows()
        elif "pruned" in state and step <= end:
            # between events pruned lam still get gradient and may move away from 0
            regrown.append(bool(torch.any(values[state["pruned"]] != 0)))
            moved = torch.cat([(now - then).abs().sum(1) > 0 for now, then in zip(A_rows(), state["A"])])
            pruned_ab_trained.append(bool(moved[state["pruned"]].all()))

    run.train(fixed_batches(), T, after_apply=after_apply)
    assert events[:5] == [6, 9, 12, 15, 18] and events[5:] == list(range(19, T + 1))
    assert any(regrown), "a pruned lam should regrow between masking events"
    assert all(pruned_ab_trained), "A of pruned components keeps training"


def test_orthogonality_regularizer_matches_peft_value_and_gradient():
    """The regularizer is gamma times the mean norm over all A and B matrices (2 per module), as in AdaLoRA's
    code and PEFT: same value and same gradient as PEFT's AdaLoRA on the same weights. (Our former form
    divided by the number of modules only, twice as strong: this test fails on it.)"""
    from peft import AdaLoraConfig, get_peft_model
    from scale_rank.inject import exact_names_regex

    gamma, r = 0.3, 4
    ids, labels = fixed_batches()[0]
    torch.manual_seed(0)
    peft_model = get_peft_model(tiny_bert(), AdaLoraConfig(
        task_type="SEQ_CLS", init_r=r, target_r=2, tinit=1, tfinal=1, total_step=10, orth_reg_weight=gamma,
        lora_alpha=8,
        target_modules=exact_names_regex(tiny_bert())))
    run = Run("adalora", total_steps=10, r_init=r, r_target=2, t_init=1, t_final=1, gamma=gamma)
    peft_base = peft_model.get_base_model()
    with torch.no_grad():  # non-trivial factors; lam = E = 0 leaves the regularizer as A's and B's only gradient
        for layer in run.layers:
            peft_layer = peft_base.get_submodule(layer.site)
            A, B, E = (getattr(peft_layer, key)["default"] for key in ("lora_A", "lora_B", "lora_E"))
            A.normal_(0, 0.3)
            B.normal_(0, 0.3)
            E.zero_()
            layer.lora_A.copy_(A)
            layer.lora_B.copy_(B)
            layer.lora_lam.zero_()
    peft_out = peft_model(input_ids=ids, labels=labels)
    peft_reg = peft_out.loss - torch.nn.functional.cross_entropy(peft_out.logits, labels)
    peft_out.loss.backward()
    run.model(input_ids=ids, labels=labels).loss.backward()
    assert gamma * run.controller.regularization() == pytest.approx(peft_reg.item(), rel=1e-5)
    for layer in run.layers:
        peft_layer = peft_base.get_submodule(layer.site)
        torch.testing.assert_close(layer.lora_A.grad, peft_layer.lora_A["default"].grad, rtol=1e-4, atol=1e-8)
        torch.testing.assert_close(layer.lora_B.grad, peft_layer.lora_B["default"].grad, rtol=1e-4, atol=1e-8)


# ------------------------------------------------------------------------------------------------
# configuration
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("t_init,t_final", [(4, 6), (6, 6), (0, 10), (10, 0)])
def test_config_rejects_phases_longer_than_training(t_init, t_final):
    with pytest.raises(ConfigError) as err:
        method_config("adalora", t_init=t_init, t_final=t_final).validate(10)
    message = str(err.value)
    assert "t_init" in message and "t_final" in message
    assert "lower method.t_init / method.t_final or train for more steps" in message


def test_adapt_rejects_phases_before_touching_the_model():
    model = tiny_bert()
    before = {n for n, p in model.named_parameters() if p.requires_grad}
    with pytest.raises(ConfigError, match="t_init"):
        sr.adapt(model, "adalora", total_steps=10, t_init=5, t_final=5)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == before
    assert not any("lora_" in n for n, _ in model.named_parameters())


def test_paper_init_is_lam_zero_and_gaussian_factors():
    run = Run("adalora", total_steps=10, r_init=6, r_target=2, t_init=1, t_final=1, alpha=24.0, init="paper")
    for layer in run.layers:
        assert torch.all(layer.lora_lam == 0)
        assert float(layer.scale) == pytest.approx(24.0 / 6)
        assert 0.01 < float(layer.lora_A.detach().std()) < 0.03
        assert 0.01 < float(layer.lora_B.detach().std()) < 0.03


def test_default_init_starts_as_a_lora_adapter():
    """init "lora": A Kaiming-uniform, B = 0, lam = init_lam (0.5), so the first step already trains B (first
    order), with the update scale alpha x init_lam of a LoRA adapter."""
    run = Run("adalora", total_steps=10, r_init=6, r_target=2, t_init=1, t_final=1, alpha=24.0)
    ids, labels = fixed_batches()[0]
    run.model(input_ids=ids, labels=labels).loss.backward()
    for layer in run.layers:
        assert torch.all(layer.lora_lam == 0.5) and torch.all(layer.lora_B == 0)
        assert float(layer.lora_A.detach().abs().max()) <= 1 / math.sqrt(layer.d_in) + 1e-6
        assert float(layer.scale) == pytest.approx(24.0 / 6)
        assert float(layer.lora_B.grad.abs().max()) > 0


def test_the_default_start_has_the_default_loras_update_scale():
    """alpha / r_init per component x r_init components x init_lam = alpha x init_lam: with AdaLoRA's defaults
    (alpha 32, init_lam 0.5) the 16 of LoRA's default alpha. Starting at AdaLoRA's full alpha (init_lam 1)
    trained like a LoRA of twice the step and diverged at 2.5x the recipe lr (docs/methods.md, "The stall")."""
    assert AdaLoRAConfig().alpha * AdaLoRAConfig().init_lam == LoRAConfig().alpha
    run = Run("adalora", total_steps=10, r_init=6, r_target=2, t_init=1, t_final=1, init_lam=1.0)
    assert all(torch.all(layer.lora_lam == 1) for layer in run.layers)
    with pytest.raises(ConfigError, match="method.init_lam"):
        AdaLoRAConfig(init_lam=0).validate(100)


@pytest.mark.parametrize("options, gamma", [({}, 0.03), ({"init": "paper"}, 0.1), ({"gamma": 0.2}, 0.2),
                                            ({"init": "paper", "gamma": 0.0}, 0.0)])
def test_the_regularizer_weight_follows_the_start_unless_given(options, gamma):
    """A third of the papers' weight with the default LoRA-like start, theirs (0.1) with init=paper, so that
    init=paper alone is the papers' AdaLoRA; a given gamma wins with either start (0: no regularizer at all)."""
    run = Run("adalora", total_steps=10, r_init=4, r_target=2, **options)
    if gamma == 0:
        assert run.method.regularizer is None
    else:
        assert run.method.regularizer.weight == pytest.approx(gamma / (2 * len(run.layers)))
