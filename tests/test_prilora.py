"""PRILoRA: linear ranks over depth, pruning of A by |A| * input-norm EMA, regrowth, row k-th smallest."""
from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from scale_rank.comm import Collective
from scale_rank.methods.prilora import depth_rank, row_kth_smallest

from tests.support.methods import Run, fixed_batches

pytestmark = pytest.mark.usefixtures("single_thread")


def reference_rank(l: int, L: int, r_first: int, r_last: int) -> int:
    """round-half-up(r_first + (r_last - r_first)(l - 1)/(L - 1)), exact."""
    return math.floor(r_first + Fraction(r_last - r_first) * (l - 1) / (L - 1) + Fraction(1, 2))


# ------------------------------------------------------------------------------------------------
# ranks over depth
# ------------------------------------------------------------------------------------------------

def test_depth_rank_12_layers():
    expected = [4, 5, 5, 6, 7, 8, 8, 9, 10, 11, 11, 12]  # 4 + 8 (l - 1) / 11, by hand
    assert [reference_rank(l, 12, 4, 12) for l in range(1, 13)] == expected
    assert [depth_rank(l, 12, 4, 12) for l in range(1, 13)] == expected
    assert sum(expected) / 12 == pytest.approx(8, abs=0.1)


def test_depth_rank_2_layers_and_halves():
    assert [depth_rank(l, 2, 4, 12) for l in (1, 2)] == [4, 12]
    # exact halves round up (Python's round() would give 2 and 4 here)
    assert [depth_rank(l, 3, 1, 4) for l in (1, 2, 3)] == [1, 3, 4]   # 2.5 -> 3
    assert [depth_rank(l, 3, 3, 6) for l in (1, 2, 3)] == [3, 5, 6]   # 4.5 -> 5
    assert [depth_rank(l, 3, 12, 4) for l in (1, 2, 3)] == [12, 8, 4]  # decreasing works too
    for L in range(2, 30):
        for r_first, r_last in ((4, 12), (1, 2), (8, 3), (2, 64)):
            assert [depth_rank(l, L, r_first, r_last) for l in range(1, L + 1)] == \
                   [reference_rank(l, L, r_first, r_last) for l in range(1, L + 1)]


@pytest.mark.parametrize("num_layers", [2, 12])
def test_adapted_model_gets_linear_ranks(num_layers):
    run = Run("prilora", num_layers=num_layers, r_first=4, r_last=12)
    assert len(run.layers) == 6 * num_layers
    for layer in run.layers:
        l = int(layer.site.split(".")[3]) + 1  # bert.encoder.layer.<i>.…
        assert layer.r_max == reference_rank(l, num_layers, 4, 12), layer.site
        assert float(layer.scale) == pytest.approx(16.0 / layer.r_max)
        assert torch.all(layer.lora_B == 0) and not layer.lora_lam.requires_grad
    assert run.method.ranks().tolist() == [layer.r_max for layer in run.layers]


# ------------------------------------------------------------------------------------------------
# pruning
# ------------------------------------------------------------------------------------------------

class InputNorms:
    """Per adapted layer: EMA (beta) of the L2 norm of each input feature over the tokens of a step."""

    def __init__(self, layers, beta: float):
        self.beta = beta
        self.step_sq = [torch.zeros(l.d_in, dtype=torch.float64) for l in layers]
        self.ema = [torch.zeros(l.d_in, dtype=torch.float64) for l in layers]
        for k, layer in enumerate(layers):
            layer.register_forward_pre_hook(self._hook(k))

    def _hook(self, k):
        def hook(module, args):
            if module.training and torch.is_grad_enabled():
                x = args[0].detach().double().reshape(-1, module.d_in)
                self.step_sq[k] += (x ** 2).sum(0)
        return hook

    def end_step(self) -> None:
        for k, sq in enumerate(self.step_sq):
            self.ema[k] = self.beta * self.ema[k] + (1 - self.beta) * sq.sqrt()
            sq.zero_()


def reference_prune(A: torch.Tensor, norm: torch.Tensor, ratio: float) -> torch.Tensor:
    """Zero, per row, the entries at or below the row's k-th smallest |A_ij| * n_j (k = floor(ratio d_in))."""
    importance = A.abs() * norm.float()
    k = math.floor(ratio * A.shape[1])
    kth = torch.kthvalue(importance, k, dim=1).values
    return torch.where(importance <= kth[:, None], torch.zeros_like(A), A)


def test_pruning_matches_kthvalue_reference_and_pruned_entries_regrow():
    interval, ratio, beta = 3, 0.5, 0.9
    run = Run("prilora", r_first=2, r_last=4, prune_interval=interval, prune_ratio=ratio, beta=beta, lr=1e-2)
    norms = InputNorms(run.layers, beta)
    pruned_at = {}
    checked = []

    def before_observe(step):
        norms.end_step()  # the forward/backward of this step is complete

    def after_optimizer(step):
        if step % interval == 0:
            pruned_at["A"] = [layer.lora_A.detach().clone() for layer in run.layers]

    def after_apply(step):
        for k, ema in enumerate(norms.ema):  # the method's EMA equals the hand-computed one
            d = run.layers[k].d_in
            offset = sum(l.d_in for l in run.layers[:k])
            torch.testing.assert_close(run.method.input_norm[offset:offset + d], ema, rtol=1e-6, atol=1e-9)
        if step % interval == 0:
            masks = []
            for layer, A, ema in zip(run.layers, pruned_at["A"], norms.ema):
                expected = reference_prune(A, ema, ratio)
                assert torch.equal(layer.lora_A.detach(), expected), (step, layer.site)
                zero = layer.lora_A.detach() == 0
                assert torch.all(zero.sum(1) >= layer.d_in // 2)
                masks.append(zero & (A != 0))  # what this event pruned
            pruned_at["mask"] = masks
            checked.append(step)
        elif step % interval == 1 and "mask" in pruned_at:
            # one step later: the pruned entries got gradient and moved off zero
            regrown = sum(int((layer.lora_A.detach()[m] != 0).sum()) for layer, m in zip(run.layers, pruned_at["mask"]))
            total = sum(int(m.sum()) for m in pruned_at["mask"])
            assert total > 0 and regrown == total, (regrown, total)
            checked.append(step)

    run.train(fixed_batches(), 7, before_observe=before_observe, after_optimizer=after_optimizer,
              after_apply=after_apply)
    assert checked == [3, 4, 6, 7]
    assert [h["step"] for h in run.controller.history] == [1, 3, 6]  # the first step, then each event


def test_pruned_entries_receive_gradient():
    run = Run("prilora", r_first=2, r_last=4, prune_interval=2, prune_ratio=0.5)
    batches = fixed_batches()
    run.train(batches, 2)  # prunes at step 2
    zero = [layer.lora_A.detach() == 0 for layer in run.layers]
    ids, labels = batches[2]
    run.model(input_ids=ids, labels=labels).loss.backward()
    for layer, z in zip(run.layers, zero):
        assert z.any()
        assert torch.all(layer.lora_A.grad[z] != 0), layer.site


# ------------------------------------------------------------------------------------------------
# the distributed k-th smallest
# ------------------------------------------------------------------------------------------------

def test_row_kth_smallest_matches_kthvalue():
    gen = torch.Generator().manual_seed(0)
    n_rows, width = 9, 17
    data = torch.rand(n_rows, width, generator=gen)
    data[0] = torch.round(data[0] * 3) / 3          # heavy ties incl. zeros
    data[1] = 0.0                                    # all zeros
    data[2, ::2] = 0.0                               # half zeros
    data[3] = 0.5                                    # all tied
    data[4] = data[4] * 1e-38                        # subnormals
    data[5] = data[5] * 1e30                         # large values
    data[6, :5] = data[6, 5:10]                      # duplicates
    # the entries arrive flat, in shuffled order, each with its row id
    rows = torch.arange(n_rows).repeat_interleave(width)
    perm = torch.randperm(rows.numel(), generator=gen)
    values, rows = data.reshape(-1)[perm], rows[perm]
    for k in range(1, width + 1):
        ks = torch.full((n_rows,), k)
        got = row_kth_smallest(values, rows, ks, n_rows, Collective())
        want = torch.kthvalue(data, k, dim=1).values
        assert torch.equal(got, want), k
    # a different k per row
    ks = torch.randint(1, width + 1, (n_rows,), generator=gen)
    got = row_kth_smallest(values, rows, ks, n_rows, Collective())
    want = torch.stack([torch.kthvalue(data[r], int(ks[r])).values for r in range(n_rows)])
    assert torch.equal(got, want)
