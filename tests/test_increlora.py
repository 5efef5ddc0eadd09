"""IncreLoRA: growth events, reserves ("advance learning"), restarted warmup, module scores."""
from __future__ import annotations

import math

import pytest
import torch

from scale_rank.config import IncreLoRAConfig
from scale_rank.export import export_peft
from tests.support.methods import ReferenceScores, Run, fixed_batches, spearman

pytestmark = pytest.mark.usefixtures("single_thread")

N_MODULES = 12
RESERVE_LAM = torch.tensor(1e-5, dtype=torch.float32)  # the default, as stored in float32


def expected_growth(remaining: int, top_h: int, incre_rank: int) -> list[int]:
    """Growth amounts of one event (largest first): top_h modules get incre_rank, capped at the target."""
    out = []
    for _ in range(top_h):
        if remaining <= 0:
            break
        out.append(min(incre_rank, remaining))
        remaining -= out[-1]
    return out


def rank_history(run) -> list[tuple[int, list[int]]]:
    return [(h["step"], h["ranks"]) for h in run.controller.history]


# ------------------------------------------------------------------------------------------------
# growth
# ------------------------------------------------------------------------------------------------

def test_growth_events_add_incre_rank_to_top_h_modules_by_reference_score():
    cfg = dict(total_steps=20, r_start=1, r_target=2, r_max=4, incre_rank=1, top_h=5, t_init=2,
               incre_interval=2, gamma=0.1)
    run = Run("increlora", **cfg)
    ref = ReferenceScores(0.85, 0.85)
    events, state = [], {}
    ranks = [1] * N_MODULES

    def before_observe(step):
        if run.method.growing:
            ref.update(run.layers)
        state["event"] = run.method.decides_at(step)

    def after_apply(step):
        nonlocal ranks
        new_ranks = run.method.ranks().tolist()
        assert sum(new_ranks) <= 2 * N_MODULES and max(new_ranks) <= 4
        grown = torch.tensor(new_ranks) - torch.tensor(ranks)
        if not state["event"]:
            assert not grown.any()
            return
        # module score: sum of the AdaLoRA component scores over the module's active components
        comp = ref.component_scores(run.layers)
        active = torch.cat([torch.arange(4) < r for r in ranks])
        module_ref = torch.stack([comp[k * 4:(k + 1) * 4][active[k * 4:(k + 1) * 4]].sum()
                                  for k in range(N_MODULES)])
        torch.testing.assert_close(run.method.last_scores.double(), module_ref, rtol=1e-4,
                                   atol=1e-12 * float(module_ref.abs().max()))
        remaining = 2 * N_MODULES - sum(ranks)
        assert sorted(grown[grown > 0].tolist(), reverse=True) == expected_growth(remaining, 5, 1)
        if 0 < int((grown > 0).sum()) < N_MODULES:  # the grown modules are the best-scoring ones
            assert module_ref[grown > 0].min() >= module_ref[grown == 0].max() * (1 - 1e-4)
        events.append(step)
        ranks = new_ranks

    run.train(fixed_batches(), 20, before_observe=before_observe, after_apply=after_apply)
    assert events == [4, 6, 8]  # 12 -> 17 -> 22 -> 24
    totals = [sum(r) for _, r in rank_history(run)]
    assert totals == [12, 17, 22, 24]
    assert sum(run.method.ranks().tolist()) == 2 * N_MODULES


def test_remainder_smaller_than_incre_rank_does_not_overshoot():
    # 3 modules, incre_rank 2: 3 start + 3 to grow -> one event grows 2 + 1
    targets = r"bert\.encoder\.layer\.0\.attention\.self\.(query|key|value)"
    run = Run("increlora", total_steps=12, targets=targets, r_start=1, r_target=2, r_max=4, incre_rank=2,
              top_h=4, t_init=1, incre_interval=2)
    run.train(fixed_batches(), 12)
    history = rank_history(run)
    assert [sum(r) for _, r in history] == [3, 6]
    assert sorted(history[1][1]) == [1, 2, 3]  # growth 2 and 1, the third module did not grow
    assert not run.method.growing


def test_decide_with_all_scores_tied():
    run = Run("increlora", total_steps=20, r_start=1, r_target=3, r_max=5, incre_rank=2, top_h=4, t_init=1)
    method = run.method
    method.scores_from_sums = lambda sums: torch.zeros(N_MODULES)  # a complete tie
    growth = method.decide(None, step=5)
    assert growth.tolist().count(2) == 4 and int(growth.sum()) == 8  # exactly top_h modules
    # near the target: 2 components left -> one module gets them, nobody else
    method.rank = torch.tensor([3] * 11 + [1])
    growth = method.decide(None, step=7)
    assert int(growth.sum()) == 2 and int((growth > 0).sum()) == 1
    # modules without room for incre_rank more are skipped; the next ones take their place
    method.rank = torch.tensor([4, 4, 4] + [1] * 9)
    growth = method.decide(None, step=9)
    assert growth[:3].tolist() == [0, 0, 0] and int(growth.sum()) == 8 and int((growth > 0).sum()) == 4


def test_natural_tie_at_init_grows_exactly_top_h():
    """Without the regularizer, active lam = 0 at init makes every module score 0 at the first event."""
    run = Run("increlora", total_steps=10, r_start=1, r_target=2, r_max=3, incre_rank=1, top_h=5, t_init=0,
              incre_interval=1, gamma=0.0)
    assert run.method.decides_at(1)
    run.train(fixed_batches(), 1)
    assert torch.all(run.method.last_scores == 0)
    growth = torch.tensor(run.method.ranks().tolist()) - 1
    assert int((growth > 0).sum()) == 5 and int(growth.sum()) == 5


# ------------------------------------------------------------------------------------------------
# reserves ("advance learning")
# ------------------------------------------------------------------------------------------------

def test_reserves_train_with_lam_frozen():
    """Reserve lam stays at reserve_lam and gets no gradient, so its AdamW moments are still zero when it is
    activated (the official code keeps it frozen, then trains it with fresh optimizer state)."""
    cfg = dict(total_steps=16, r_start=1, r_target=2, r_max=4, incre_rank=1, top_h=6, t_init=4,
               incre_interval=4)
    run = Run("increlora", **cfg)
    init = {k: (l.lora_A.detach().clone(), l.lora_B.detach().clone()) for k, l in enumerate(run.layers)}
    before = {}

    def before_observe(step):
        before["ranks"] = run.method.ranks().tolist()
        before["AB"] = [(l.lora_A.detach().clone(), l.lora_B.detach().clone()) for l in run.layers]

    def after_apply(step):
        ranks = run.method.ranks().tolist()
        for k, layer in enumerate(run.layers):
            r = ranks[k]
            lam = layer.lora_lam.detach()
            assert lam[r] == RESERVE_LAM, (step, k)           # reserve lam frozen
            moments = run.optimizer.state[layer.lora_lam]
            assert moments["exp_avg"][r] == 0 and moments["exp_avg_sq"][r] == 0, (step, k)
            assert torch.all(lam[r + 1:] == 0)                # beyond the reserve: untouched
            assert not moments["exp_avg"][r + 1:].any() and not moments["exp_avg_sq"][r + 1:].any()
            A0, B0 = init[k]
            assert torch.equal(layer.lora_A.detach()[r + 1:], A0[r + 1:])
            assert torch.equal(layer.lora_B.detach()[:, r + 1:], B0[:, r + 1:])
            if before["ranks"][k] == r:  # the same reserve as before this step: its A and B trained
                A1, B1 = before["AB"][k]
                assert not torch.equal(layer.lora_A.detach()[r], A1[r]), (step, k)
                assert not torch.equal(layer.lora_B.detach()[:, r], B1[:, r]), (step, k)

    run.train(fixed_batches(), 11, before_observe=before_observe, after_apply=after_apply)  # events at 8, 12
    grown = [k for k, r in enumerate(run.method.ranks().tolist()) if r > 1]
    assert len(grown) == 6
    for k in grown:  # once selected, the former reserve's lam trains (leaves reserve_lam)
        assert run.layers[k].lora_lam.detach()[1] != RESERVE_LAM


def test_reserve_masks_reach_the_device_once_per_change(monkeypatch):
    """The reserve mask and its complement go to the adapters' device when the reserve changes (at a growth
    event), not in every step: on a GPU each host-to-device copy of ordinary memory waits for the queued work."""
    run = Run("increlora", total_steps=16, r_start=1, r_target=2, r_max=4, incre_rank=1, top_h=6, t_init=4,
              incre_interval=4)
    copies = []
    per_module = run.method._per_module
    monkeypatch.setattr(run.method, "_per_module", lambda values: copies.append(run.step + 1) or per_module(values))
    run.train(fixed_batches(), 11)  # a growth event at step 8
    assert copies == [1, 1, 8, 8]  # both masks in step 1, then again once step 8's growth changed the reserve


def test_reserves_leave_the_model_when_growth_ends(tmp_path):
    """As in the official code, reserves are gone as soon as the target is reached (not only at step T), so
    an export after growth holds exactly the allocated ranks."""
    run = Run("increlora", total_steps=12, r_start=1, r_target=2, r_max=4, incre_rank=1, top_h=6, t_init=1,
              incre_interval=2)
    run.train(fixed_batches(), 4)  # events at 3 and 5 (6 modules each)
    assert all(int(l.active.sum()) == r + 1 for l, r in zip(run.layers, run.method.ranks().tolist()))
    run.train(fixed_batches(), 1)
    ranks = run.method.ranks().tolist()
    assert sum(ranks) == 24 and not run.method.growing
    for layer, r in zip(run.layers, ranks):
        assert layer.active.tolist() == [1.0] * r + [0.0] * (4 - r)
        assert layer.rank() == r
    assert sum(export_peft(run.model, tmp_path)["ranks"].values()) == 24


# ------------------------------------------------------------------------------------------------
# restarted warmup
# ------------------------------------------------------------------------------------------------

def test_restarted_warmup_scales_new_components_updates():
    """With SGD the unscaled update is -lr * grad. With the official activation (`activation=reserve`), as in
    the official code, a growth event at step a restarts
    a warmup min((t - a) / W, 1) for the activated components' lam and for the new reserves' A and B; the
    activated components' A and B (trained as reserves already) keep full steps."""
    lr, W = 0.05, 4
    run = Run("increlora", optimizer="sgd", lr=lr, total_steps=20, r_start=1, r_target=3, r_max=5,
              incre_rank=1, top_h=3, t_init=2, incre_interval=2, restart_warmup=W, activation="reserve")
    lam_since: dict[tuple[int, int], int] = {}
    factors_since: dict[tuple[int, int], int] = {}
    state = {}
    scaled_seen = set()

    def factor(since, k, i, step):
        return min((step - since[(k, i)]) / W, 1.0) if (k, i) in since else 1.0

    def before_observe(step):
        state["ranks"] = run.method.ranks().tolist()
        state["old"] = [(l.lora_A.detach().clone(), l.lora_B.detach().clone(), l.lora_lam.detach().clone())
                        for l in run.layers]
        state["grad"] = [(l.lora_A.grad.clone(), l.lora_B.grad.clone(), l.lora_lam.grad.clone())
                         for l in run.layers]

    def after_apply(step):
        new_ranks = run.method.ranks().tolist()
        for k, layer in enumerate(run.layers):
            (A0, B0, lam0), (gA, gB, glam) = state["old"][k], state["grad"][k]
            f_lam = torch.tensor([factor(lam_since, k, i, step) for i in range(layer.r_max)])
            f_ab = torch.tensor([factor(factors_since, k, i, step) for i in range(layer.r_max)])
            scaled_seen.update(float(f) for f in torch.cat([f_lam, f_ab]) if f < 1)
            torch.testing.assert_close(layer.lora_A.detach(), A0 - lr * gA * f_ab[:, None], rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(layer.lora_B.detach(), B0 - lr * gB * f_ab[None, :], rtol=1e-5, atol=1e-7)
            lam_expected = lam0 - lr * glam * f_lam
            old_rank = state["ranks"][k]
            lam_expected[old_rank:] = lam0[old_rank:]  # the reserve's lam and those beyond it had no gradient
            if new_ranks[k] < layer.r_max:  # the (new) reserve's lam: reserve_lam; 0 once growth is over
                lam_expected[new_ranks[k]] = RESERVE_LAM if run.method.growing else 0.0
            torch.testing.assert_close(layer.lora_lam.detach(), lam_expected, rtol=1e-5, atol=1e-9)
            for i in range(old_rank, new_ranks[k]):  # activated at this step; the next one is a fresh reserve
                lam_since[(k, i)] = step
                factors_since[(k, i + 1)] = step

    run.train(fixed_batches(), 20, before_observe=before_observe, after_apply=after_apply)
    assert scaled_seen == {0.25, 0.5, 0.75}, scaled_seen
    assert sum(run.method.ranks().tolist()) == 36


# ------------------------------------------------------------------------------------------------
# scale rule and init
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("init,lam", [("lora", 1.0), ("paper", 0.0)])
def test_init_layout(init, lam):
    run = Run("increlora", total_steps=10, r_start=2, r_target=3, r_max=6, incre_rank=2, alpha=8.0, init=init)
    for layer in run.layers:
        assert layer.active.tolist() == [1, 1, 1, 1, 0, 0]
        assert layer.lora_lam.detach()[:2].tolist() == [lam, lam]
        assert torch.all(layer.lora_lam.detach()[4:] == 0)
        assert torch.all(layer.lora_B == 0) == (init == "lora")
        assert torch.all(layer.lora_lam.detach()[2:4] == RESERVE_LAM)
        assert float(layer.scale) == pytest.approx(8.0 / 2)
    assert run.method.ranks().tolist() == [2] * N_MODULES


@pytest.mark.parametrize("rule", ["fixed", "rank"])
def test_scale_rule(rule):
    run = Run("increlora", total_steps=10, r_start=1, r_target=2, r_max=3, incre_rank=1, top_h=4,
              t_init=1, incre_interval=1, alpha=8.0, scale_rule=rule)
    run.train(fixed_batches(), 4)
    for layer, r in zip(run.layers, run.method.ranks().tolist()):
        assert float(layer.scale) == pytest.approx(8.0 if rule == "fixed" else 8.0 / r)


# ------------------------------------------------------------------------------------------------
# dense vs component module scores
# ------------------------------------------------------------------------------------------------

class DenseReference:
    """S_k = sum |dW * dL/d(dW)| / sqrt(numel), dL/d(dW) = sum over tokens of grad(out)^T x, EMA-smoothed."""

    def __init__(self, layers, beta1=0.85, beta2=0.85):
        self.layers, self.b1, self.b2 = layers, beta1, beta2
        self.grad = [torch.zeros(l.d_out, l.d_in, dtype=torch.float64) for l in layers]
        self.i_bar = torch.zeros(len(layers), dtype=torch.float64)
        self.u_bar = torch.zeros(len(layers), dtype=torch.float64)
        for k, layer in enumerate(layers):
            layer.register_forward_hook(self._hook(k))

    def _hook(self, k):
        def hook(module, args, out):
            if not out.requires_grad:
                return
            x = args[0].detach().reshape(-1, module.d_in).double()

            def on_grad(g):
                self.grad[k] += g.reshape(-1, module.d_out).double().t() @ x
            out.register_hook(on_grad)
        return hook

    def update(self) -> None:
        score = torch.stack([(l.delta_weight().double() * g).abs().sum() / math.sqrt(g.numel())
                             for l, g in zip(self.layers, self.grad)])
        for g in self.grad:
            g.zero_()
        self.i_bar = self.b1 * self.i_bar + (1 - self.b1) * score
        self.u_bar = self.b2 * self.u_bar + (1 - self.b2) * (score - self.i_bar).abs()

    def scores(self) -> torch.Tensor:
        return self.i_bar * self.u_bar


def first_event_scores(score: str, gamma: float, check_dense: bool = False) -> torch.Tensor:
    """Module scores at the first growth event (step 10); both runs are identical up to that point."""
    run = Run("increlora", total_steps=30, r_start=2, r_target=3, r_max=5, incre_rank=1, top_h=4, t_init=5,
              incre_interval=5, score=score, gamma=gamma, lr=1e-2)
    dense = DenseReference(run.layers) if check_dense else None
    out = {}

    def before_observe(step):
        if dense is not None:
            dense.update()
        out["event"] = run.method.decides_at(step)

    def after_apply(step):
        if out["event"] and "scores" not in out:
            out["scores"] = run.method.last_scores.double().clone()
            if dense is not None:  # the exact option equals the official code's formula
                torch.testing.assert_close(out["scores"], dense.scores(), rtol=1e-4, atol=0.0)

    run.train(fixed_batches(), 10, before_observe=before_observe, after_apply=after_apply)
    return out["scores"]


@pytest.mark.parametrize("gamma", [0.0, 0.1])
def test_dense_and_component_scores_rank_modules(gamma, capsys):
    """How score="dense" (official code) and score="component" (default) rank the 12 modules.

    Measured on this tiny random BERT at the first growth event (step 10, three seeds tried while
    writing this test):
    - gamma = 0 (no regularizer): the two agree closely, Spearman about +0.9.
    - gamma = 0.1 (the default): they do not agree (Spearman between -0.4 and 0). Early in training
      lam is ~0, so the task gradient reaching A and B is ~0, and |w * g| of A and B is dominated by the
      orthogonality regularizer's gradient, which is about the same for every module; the component
      score is then nearly flat (within ~20% across modules) and its order says little about the task.
      The dense score is the gradient of the task loss with respect to dW only, so the regularizer does
      not enter it.
    So with the regularizer on, the default score does not reproduce the official ranking early in
    training. Asserted here: both are strict, finite, non-negative rankings, the dense one equals the
    official formula, and without the regularizer the two are positively correlated.
    """
    dense = first_event_scores("dense", gamma, check_dense=True)
    component = first_event_scores("component", gamma)
    for scores in (dense, component):
        assert scores.shape == (N_MODULES,)
        assert torch.all(torch.isfinite(scores)) and torch.all(scores >= 0)
        assert len(torch.unique(scores)) == N_MODULES  # a strict order, no degenerate ties
    rho = spearman(dense, component)
    top_dense = set(torch.argsort(dense, descending=True)[:4].tolist())
    top_component = set(torch.argsort(component, descending=True)[:4].tolist())
    spread = float(component.min() / component.max())
    with capsys.disabled():
        print(f"\n[increlora gamma={gamma}] Spearman(dense, component) over {N_MODULES} modules = {rho:+.3f}; "
              f"top-4 overlap {len(top_dense & top_component)}/4; component min/max = {spread:.2f}")
    if gamma == 0.0:
        assert rho > 0.5


def test_official_growth_defaults():
    """The official code grows top_h = 6 modules per event by incre_rank = r_target // 2 (8 -> 4, 2 -> 1)."""
    assert IncreLoRAConfig(r_target=8, r_max=12).resolved_incre_rank() == 4
    assert IncreLoRAConfig(r_target=2).resolved_incre_rank() == 1
    assert IncreLoRAConfig(r_target=8, incre_rank=2).resolved_incre_rank() == 2
    assert IncreLoRAConfig().top_h == 6
    run = Run("increlora", total_steps=20, r_start=1, r_target=4, r_max=6, t_init=2)
    assert run.method.incre_rank == 2 and int(run.method.reserve.sum()) == 2 * N_MODULES


def test_rebalanced_activation_keeps_the_update_and_gives_lam_init_lam():
    """Default `activation=rebalance`: at a growth event the activated components' lam jumps from reserve_lam to
    init_lam and their B columns shrink by reserve_lam / init_lam, so scale * B diag(lam) A does not change;
    with `activation=reserve` their lam keeps growing from reserve_lam (the official code)."""
    lr = 0.05
    settings = dict(optimizer="sgd", lr=lr, total_steps=20, r_start=1, r_target=3, r_max=5, incre_rank=1,
                    top_h=3, t_init=2, incre_interval=2, restart_warmup=0)
    for activation in ("rebalance", "reserve"):
        run = Run("increlora", activation=activation, **settings)
        init_lam, reserve = run.method.config.init_lam, run.method.config.reserve_lam
        state, activated = {}, []

        def before_observe(step):
            state["ranks"] = run.method.ranks().tolist()
            state["stepped"] = [(l.lora_B.detach() - lr * l.lora_B.grad, l.lora_lam.detach().clone())
                                for l in run.layers]

        def after_apply(step):
            for k, layer in enumerate(run.layers):
                B_stepped, lam_before = state["stepped"][k]
                for i in range(state["ranks"][k], int(run.method.ranks()[k])):
                    activated.append((k, i))
                    lam = float(layer.lora_lam.detach()[i])
                    assert lam_before[i] == RESERVE_LAM
                    if activation == "reserve":
                        assert lam == RESERVE_LAM
                        torch.testing.assert_close(layer.lora_B.detach()[:, i], B_stepped[:, i])
                        continue
                    assert lam == init_lam
                    torch.testing.assert_close(layer.lora_B.detach()[:, i] * lam, B_stepped[:, i] * reserve,
                                               rtol=1e-5, atol=0.0)

        run.train(fixed_batches(), 20, before_observe=before_observe, after_apply=after_apply)
        assert len(activated) == 24  # 12 modules grow from 1 to 3
