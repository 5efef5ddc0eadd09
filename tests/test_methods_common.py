"""Every method: a short run lowers the loss; controller state round-trips; a resumed run makes the same
decisions as an uninterrupted one."""
from __future__ import annotations

import pytest
import torch

from tests.support.methods import Run, fixed_batches

pytestmark = pytest.mark.usefixtures("single_thread")

T = 12  # total optimizer steps of the resume tests

# Small settings under which every method makes decisions both before and after the resume point.
METHOD_OPTIONS = {
    "lora": dict(r=4),
    "adalora": dict(total_steps=T, r_init=4, r_target=2, t_init=2, t_final=3, delta_t=2),  # masks 4, 6, 8, 9
    "sora": dict(r_max=4, xi=4e-3, xi_end=1e-2, xi_stages=3, init="paper", total_steps=T),  # gates that reach 0
    "increlora": dict(total_steps=T, r_start=1, r_target=3, r_max=5, incre_rank=1, top_h=4, t_init=1,
                      incre_interval=2, restart_warmup=3),  # grows at 3, 5, 7, 9, 11; warm-up crosses the resume point
    "prilora": dict(r_first=2, r_last=4, prune_interval=3),  # prunes at 3, 6, 9, 12
}
METHODS = list(METHOD_OPTIONS)


# ------------------------------------------------------------------------------------------------
# learning
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", METHODS)
def test_short_run_lowers_the_loss(name):
    """Adapters alone (head frozen), 30 AdamW steps: every method learns from the first steps."""
    run = Run(name, lr=1e-2, trainable=[], **short_run_options(name))
    batches = fixed_batches()
    before = run.loss(batches)
    run.train(batches, 30)
    assert run.loss(batches) < before - 0.015  # from 0.694: a small but clear decrease


def test_paper_init_stalls_where_the_default_learns():
    """The papers' start (lam = 0, A, B ~ N(0, 0.02)) makes the update second order: with the regularizer
    under Adam the loss does not move in 30 steps, while the default start learns like LoRA."""
    batches = fixed_batches()
    losses = {}
    for name, init in (("lora", None), ("adalora", "lora"), ("adalora", "paper"), ("increlora", "lora"),
                       ("increlora", "paper")):
        options = short_run_options(name) | ({"init": init} if init else {})
        run = Run(name, lr=1e-2, trainable=[], **options)
        before = run.loss(batches)
        run.train(batches, 30)
        losses[name, init] = before - run.loss(batches)
    lora = losses["lora", None]
    for name in ("adalora", "increlora"):
        assert losses[name, "lora"] > 0.4 * lora, losses  # IncreLoRA starts at rank 1 (LoRA: 4)
        assert losses[name, "paper"] < 0.1 * lora, losses


def short_run_options(name: str) -> dict:
    options = dict(METHOD_OPTIONS[name])
    if "total_steps" in options:
        options["total_steps"] = 30
    if name == "adalora":
        options.update(t_init=4, t_final=5)
    return options


# ------------------------------------------------------------------------------------------------
# state and resume
# ------------------------------------------------------------------------------------------------

def assert_same_state(a, b, path="state"):
    """Deep equality of nested dicts / lists / tensors / scalars."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), path
        for key in a:
            assert_same_state(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


@pytest.mark.parametrize("name", METHODS)
def test_controller_state_round_trips(name, tmp_path):
    run = Run(name, **METHOD_OPTIONS[name])
    run.train(fixed_batches(), 7)
    state = run.controller.state_dict()
    torch.save(state, tmp_path / "controller.pt")
    loaded = torch.load(tmp_path / "controller.pt")

    fresh = Run(name, **METHOD_OPTIONS[name])
    fresh.controller.load_state_dict(loaded)
    assert_same_state(fresh.controller.state_dict(), state)
    assert fresh.controller.step_count == 7
    assert torch.equal(fresh.method.mask, run.method.mask)
    assert fresh.method.ranks().tolist() == run.method.ranks().tolist()


def test_loading_state_of_another_method_is_refused():
    ada = Run("adalora", **METHOD_OPTIONS["adalora"])
    inc = Run("increlora", **METHOD_OPTIONS["increlora"])
    with pytest.raises(ValueError, match="adalora"):
        inc.controller.load_state_dict(ada.controller.state_dict())


@pytest.mark.parametrize("name", METHODS)
def test_resumed_run_makes_the_same_decisions(name, tmp_path):
    batches, k = fixed_batches(), 5

    straight = Run(name, **METHOD_OPTIONS[name])
    straight.train(batches, T)

    first = Run(name, **METHOD_OPTIONS[name])
    first.train(batches, k)
    torch.save({"model": first.trainable_state(), "optimizer": first.optimizer.state_dict(),
                "controller": first.controller.state_dict(), "step": first.step}, tmp_path / "ckpt.pt")
    del first

    ckpt = torch.load(tmp_path / "ckpt.pt")
    resumed = Run(name, **METHOD_OPTIONS[name])  # everything rebuilt from scratch
    resumed.load_trainable_state(ckpt["model"])
    resumed.optimizer.load_state_dict(ckpt["optimizer"])
    resumed.controller.load_state_dict(ckpt["controller"])
    resumed.step = ckpt["step"]
    resumed.train(batches, T - k)

    assert resumed.controller.history == straight.controller.history
    if name != "lora":
        assert len({h["step"] for h in straight.controller.history if h["step"] > k}) >= 1
    assert torch.equal(resumed.method.mask, straight.method.mask)
    for a, b in zip(resumed.layers, straight.layers):
        assert torch.equal(a.active, b.active) and torch.equal(a.scale, b.scale)
        assert a.rank() == b.rank()
    ra, sa = resumed.trainable_state(), straight.trainable_state()
    assert set(ra) == set(sa)
    for key in sa:
        torch.testing.assert_close(ra[key], sa[key], rtol=1e-6, atol=1e-8, msg=key)
    assert_same_state(resumed.controller.state_dict(), straight.controller.state_dict())


# ------------------------------------------------------------------------------------------------
# the method contract
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", METHODS)
def test_partial_sums_have_no_side_effects(name):
    """The controller may ask for a step's sums more than once: the same answer, and the run unchanged."""
    run = Run(name, **METHOD_OPTIONS[name])
    reference = Run(name, **METHOD_OPTIONS[name])
    original = run.method.partial_sums
    asked = []

    def twice(step):
        first, second = original(step), original(step)
        assert (first is None) == (second is None)
        if first is not None:
            torch.testing.assert_close(first, second, rtol=0, atol=0)
            asked.append(step)
        return first

    run.method.partial_sums = twice
    run.train(fixed_batches(), T)
    reference.train(fixed_batches(), T)
    assert [h["ranks"] for h in run.controller.history] == [h["ranks"] for h in reference.controller.history]
    assert name in ("lora", "sora") or asked  # SoRA reduces its gate counts in apply()


@pytest.mark.parametrize("name", METHODS)
def test_capacity_rule_is_the_planners(name):
    """The planner asks the method class for each site's capacity: equal to what adapt() attaches."""
    from scale_rank.planning.adapters import capacity
    run = Run(name, **METHOD_OPTIONS[name])
    n_layers = 1 + max(layer.layer_index for layer in run.layers)
    for layer in run.layers:
        assert capacity(run.method.config, layer.layer_index, n_layers) == layer.r_max
    assert run.method.allocates_ranks == (name != "lora")
    assert run.method.trains_lam == (name not in ("lora", "prilora"))


# ------------------------------------------------------------------------------------------------
# method hooks: the layer computes only LoRA; each method installs what else it needs, and removes it
# ------------------------------------------------------------------------------------------------

def _hook_counts(layers) -> list[tuple[int, int]]:
    return [(len(layer._forward_pre_hooks), len(layer._forward_hooks) + len(layer.dropout._forward_hooks))
            for layer in layers]


@pytest.mark.parametrize("name,options,per_layer,regularized", [
    ("lora", {}, (0, 0), False),
    ("adalora", {}, (0, 0), True),
    ("adalora", {"gamma": 0.0}, (0, 0), False),
    ("sora", {}, (0, 0), False),
    ("increlora", {}, (0, 0), True),
    ("increlora", {"score": "dense"}, (0, 2), True),  # dense gradient: dropout's input + output
    ("prilora", {}, (1, 0), False),  # input sums
])
def test_methods_install_their_hooks_at_bind_and_remove_them_at_close(name, options, per_layer, regularized):
    """adapt() leaves plain layers; the controller's bind installs the method's hooks (in one process the
    regularizer is one forward hook, on the first layer, for all layers) and, for gated layers, the batched
    gates on the model; close() removes them, after which the adapted model computes the same output as before
    the controller existed."""
    import scale_rank as sr
    from scale_rank.inject import adapter_layers
    from tests.support.methods import tiny_bert
    model = tiny_bert(0, 2).eval()  # no dropout: the two plain outputs compare exactly
    method = sr.adapt(model, name, **(short_run_options(name) | options))
    layers = adapter_layers(model)
    assert set(_hook_counts(layers)) == {(0, 0)}
    ids = torch.randint(0, 100, (2, 8))
    plain = model(input_ids=ids).logits.detach()
    controller = sr.RankController(model, method)
    pre, post = per_layer
    assert _hook_counts(layers) == [(pre, post + (regularized and k == 0)) for k in range(len(layers))]
    gated = name not in ("lora", "prilora")
    assert (len(model._forward_pre_hooks), len(model._forward_hooks)) == (1 + gated, int(gated))
    model(input_ids=ids).logits.sum().backward()
    controller.close()
    assert set(_hook_counts(layers)) == {(0, 0)}
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert torch.equal(model(input_ids=ids).logits.detach(), plain)


def test_increlora_drops_its_dense_gradient_hooks_when_growth_ends():
    run = Run("increlora", score="dense", **short_run_options("increlora"))
    dense = run.method.dense
    assert dense.installed and dense.grads
    run.train(fixed_batches(), 30)
    assert not run.method.growing and not dense.installed and not dense.grads
    assert _hook_counts(run.layers) == [(0, int(k == 0)) for k in range(len(run.layers))]  # the regularizer stays


@pytest.mark.parametrize("groups, defer_grads", [(None, False), ([[0, 2], [1]], False), ([[0, 1, 2]], False),
                                                 ([[0, 1, 2]], True)])
@pytest.mark.parametrize("inactive", [[], [1, 4]])
def test_regularizer_gradient_equals_autograd_of_the_norms_over_active_components(inactive, groups, defer_grads):
    """The closed-form gradient the regularizer adds in the backward equals autograd's gradient of
    gamma / (2n) x (||A_K A_K^T - I||_F + ||B_K^T B_K - I||_F) over the active components K, and pruned
    components get none (IncreLoRA's reserves and inactive components); per layer (sharded engines) and
    one hook per group of layers (FSDP2's units; DDP: one group), batched over layers of one shape, and the
    single group's gradients added at the end of the backward (one process)."""
    from scale_rank.layer import AdaptiveLoRALayer
    from scale_rank.methods.hooks import OrthogonalityRegularizer
    torch.manual_seed(0)
    gamma, r = 0.3, 6
    layers = [AdaptiveLoRALayer(torch.nn.Linear(10, 7), r, 1.0) for _ in range(2)]
    layers.append(AdaptiveLoRALayer(torch.nn.Linear(7, 10), r, 1.0))  # a shape of its own
    kept = torch.tensor([k for k in range(r) if k not in inactive])
    for layer in layers:
        torch.nn.init.normal_(layer.lora_A, std=0.4)
        torch.nn.init.normal_(layer.lora_B, std=0.4)
        layer.active[inactive] = 0.0
    regularizer = OrthogonalityRegularizer(layers, gamma, groups, defer_grads=defer_grads)
    for layer in layers:
        (layer(torch.randn(3, layer.d_in)).sum() * 0).backward()
    reference = 0.0
    for layer in layers:
        A = layer.lora_A.detach().clone().requires_grad_()
        B = layer.lora_B.detach().clone().requires_grad_()
        eye = torch.eye(len(kept))
        norms = (torch.linalg.matrix_norm(A[kept] @ A[kept].t() - eye)
                 + torch.linalg.matrix_norm(B[:, kept].t() @ B[:, kept] - eye))
        (gamma / (2 * len(layers)) * norms).backward()
        reference += float(norms)
        torch.testing.assert_close(layer.lora_A.grad, A.grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(layer.lora_B.grad, B.grad, rtol=1e-5, atol=1e-7)
        assert not layer.lora_A.grad[inactive].any() and not layer.lora_B.grad[:, inactive].any()
    assert regularizer.value() == pytest.approx(reference / (2 * len(layers)), rel=1e-6)


def test_edit_local_hands_the_gradient_to_the_write_unless_values_only():
    """A values-only edit (AdaLoRA's and SoRA's lam edits) gives the write no gradient to compare or store
    back; an edit that may touch the gradient hands it over."""
    from scale_rank.methods.base import edit_local
    from scale_rank.shards import WholeTensorAccess

    class Recording(WholeTensorAccess):
        def write(self, param, local):
            written.append(local.grad)

    param = torch.nn.Parameter(torch.ones(4))
    param.grad = torch.full((4,), 2.0)
    written: list = []
    edit_local(Recording(), param, lambda local: local.values.mul_(3.0), values_only=True)
    edit_local(Recording(), param, lambda local: local.values.mul_(3.0))
    assert written[0] is None and torch.equal(written[1], param.grad)
    assert torch.equal(param.detach(), torch.full((4,), 9.0))


def test_deferred_regularizer_does_not_hold_back_the_factors_gradients(monkeypatch):
    """With the gradients deferred (one process, DDP), the regularizer's node is not an input of the factors'
    gradient accumulation: a later layer's factors get their gradient (DDP's reducer sees them ready) as the
    backward passes their layer, not after the first layer's output, where the regularizer rides."""
    from scale_rank.layer import AdaptiveLoRALayer
    from scale_rank.methods import hooks
    torch.manual_seed(0)
    layers = [AdaptiveLoRALayer(torch.nn.Linear(8, 8), 4, 1.0) for _ in range(3)]
    for layer in layers:
        layer.init_gaussian(0.3)
    events: list[str] = []
    monkeypatch.setattr(hooks, "_times_factor", lambda units, batch, kind, _orig=hooks._times_factor: (
        events.append("regularizer"), _orig(units, batch, kind))[1])
    layers[-1].lora_A.register_post_accumulate_grad_hook(lambda param: events.append("last layer's A"))
    hooks.OrthogonalityRegularizer(layers, 0.1, [list(range(3))], defer_grads=True)
    x = torch.randn(5, 8)
    for layer in layers:
        x = layer(x)
    x.sum().backward()
    assert events.index("last layer's A") < events.index("regularizer"), events


@pytest.mark.parametrize("name", ["adalora", "sora", "increlora", "prilora"])
def test_whole_tensor_path_equals_the_sliced_path_bit_for_bit(name, monkeypatch):
    """One process works on the parameters directly (`ShardAccess.whole_tensors`: foreach operations and flat
    views over all modules); the per-parameter slices every sharded engine uses give the same weights,
    statistics, ranks and pruned entries, bit for bit. (The regularizer is batched in both runs: batched and
    per-layer matrix products may differ in the last bit, see the regularizer's own test.)"""
    import scale_rank.controller
    import scale_rank.methods.base
    from scale_rank.methods.hooks import OrthogonalityRegularizer
    from scale_rank.shards import WholeTensorAccess

    monkeypatch.setattr(scale_rank.methods.base, "OrthogonalityRegularizer",
                        lambda layers, gamma, groups, **_: OrthogonalityRegularizer(
                            layers, gamma, [list(range(len(layers)))], defer_grads=True))

    def trained(whole: bool) -> tuple[dict, dict, Run]:
        class Access(WholeTensorAccess):
            def __init__(self, rank: int = 0, world_size: int = 1):
                super().__init__(rank, world_size)
                self.whole_tensors = self.stores_whole = whole
        monkeypatch.setattr(scale_rank.controller, "WholeTensorAccess", Access)
        run = Run(name, **short_run_options(name))
        assert run.controller.access.whole_tensors == whole
        run.train(fixed_batches(), 24)
        return run.model.state_dict(), run.method.state_dict(), run

    fast_weights, fast_state, fast = trained(True)
    slow_weights, slow_state, _ = trained(False)
    assert fast_weights.keys() == slow_weights.keys()
    for key in fast_weights:
        assert torch.equal(fast_weights[key], slow_weights[key]), key
    assert torch.equal(fast_state["mask"], slow_state["mask"])
    if name in ("adalora", "increlora"):
        for key in ("i_bar", "u_bar"):
            assert torch.equal(fast_state["tracker"][key], slow_state["tracker"][key])
    if name == "prilora":  # ranks fixed by depth; entries of A pruned
        assert torch.equal(fast_state["input_norm"], slow_state["input_norm"])
        assert all(0 < int((layer.lora_A == 0).sum()) < layer.lora_A.numel() for layer in fast.layers)
    else:
        assert 0 < int(fast.method.ranks().sum()) < sum(layer.r_max for layer in fast.layers)


def test_regularizer_gives_an_exactly_orthonormal_factor_gradient_zero_not_nan():
    """||A A^T - I|| = 0 exactly (orthonormal rows; a rank-1 factor whose squared norm rounds to exactly 1, which
    happened to IncreLoRA's rank-1 modules late in a decaying schedule) has gradient 0 under autograd; the
    closed form divided 0 by 0 and turned every adapter weight into NaN on the next step."""
    from scale_rank.layer import AdaptiveLoRALayer
    from scale_rank.methods.hooks import OrthogonalityRegularizer
    torch.manual_seed(0)
    orthonormal, rank_one = (AdaptiveLoRALayer(torch.nn.Linear(6, 5), 3, 1.0) for _ in range(2))
    for layer in (orthonormal, rank_one):
        torch.nn.init.normal_(layer.lora_A, std=0.4)
        torch.nn.init.normal_(layer.lora_B, std=0.4)
    with torch.no_grad():
        orthonormal.lora_A.copy_(torch.eye(3, 6))
        rank_one.active[1:] = 0.0
        rank_one.lora_B[:, 0] = torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0])  # b^T b - 1 = 0 exactly
    OrthogonalityRegularizer([orthonormal, rank_one], 0.3)
    for layer in (orthonormal, rank_one):
        (layer(torch.randn(2, 6)).sum() * 0).backward()
    assert not orthonormal.lora_A.grad.any() and not rank_one.lora_B.grad.any()
    for grad in (orthonormal.lora_B.grad, rank_one.lora_A.grad):
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
