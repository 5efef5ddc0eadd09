"""The training loop's own duties on one process: gradient clipping before the scores see the gradients, and
no reads of device values on the steps between logged ones."""
from __future__ import annotations

import traceback
import weakref
from pathlib import Path

import pytest
import torch

from scale_rank.config import ConfigError, TrainConfig, load_config
from scale_rank.ds_config import load_ds_config
from scale_rank.importance import SensitivityTracker
from scale_rank.components import ComponentLayout
from scale_rank.layer import AdaptiveLoRALayer
from scale_rank.shards import WholeTensorAccess
from scale_rank.telemetry import TrainingMetrics
from scale_rank.train import train
from tests.support.tiny import overrides, tiny_model_dir

ROOT = Path(__file__).resolve().parents[1]
LOOP_FILES = ("scale_rank/train.py", "scale_rank/telemetry.py", "scale_rank/engine.py", "scale_rank/comm.py")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny"))


def run(model_dir: Path, out: Path, method: str = "adalora", steps: int = 8, **train_settings):
    """A short run; returns (losses, the gradient norms the loop logged)."""
    norms = []
    original = TrainingMetrics.step

    def record(self, step, loss, lr, grad_norm=None):
        if grad_norm is not None:
            norms.append(float(grad_norm))
        return original(self, step, loss, lr, grad_norm)

    TrainingMetrics.step = record
    try:
        result = train(load_config(None, overrides(model_dir, out, method, steps=steps, **train_settings)),
                       progress=False)
    finally:
        TrainingMetrics.step = original
    return result.losses, norms


def test_clipping_above_the_norm_changes_nothing_and_below_it_changes_training(model_dir, tmp_path):
    plain, no_norms = run(model_dir, tmp_path / "plain")
    loose, loose_norms = run(model_dir, tmp_path / "loose", max_grad_norm=1e9)
    tight, tight_norms = run(model_dir, tmp_path / "tight", max_grad_norm=0.01)
    assert no_norms == [] and len(loose_norms) == len(tight_norms) == 8
    assert loose == plain  # bit for bit: a coefficient of 1 is no clipping
    assert min(tight_norms) > 0.01  # clipping acted on every step
    assert tight[0] == plain[0]  # the first loss is before any step
    assert max(abs(a - b) for a, b in zip(tight, plain)) > 1e-3


def test_the_loop_reads_the_device_only_at_logged_steps(model_dir, tmp_path, monkeypatch):
    """The proxy for host-device syncs: calls of item/tolist/cpu/float/int/bool on tensors made by the loop's
    own code (train, telemetry, engine, comm). 10 more steps with log_every 5 add at most 2 reads."""
    calls = []

    def counting(name):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            caller = traceback.extract_stack(limit=2)[0].filename
            if caller.endswith(LOOP_FILES):
                calls.append(caller)
            return original(self, *args, **kwargs)
        return wrapper

    for name in ("item", "tolist", "cpu", "__float__", "__int__", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, counting(name))

    def reads(steps: int) -> int:
        calls.clear()
        run(model_dir, tmp_path / f"s{steps}", method="lora", steps=steps, log_every=5, max_grad_norm=0.5)
        return len(calls)

    short, long = reads(10), reads(20)
    assert long - short <= 2, f"{long - short} reads for 10 steps with 2 logged ones"


def test_scores_take_the_factor_a_later_clipping_applies():
    """DeepSpeed clips inside its step: the tracker scales what it reads, as if the gradients were clipped."""
    torch.manual_seed(0)
    layers = [AdaptiveLoRALayer(torch.nn.Linear(6, 5), r_max=3, scale=1.0)]
    for p in (layers[0].lora_A, layers[0].lora_B, layers[0].lora_lam):
        p.data.normal_()
        p.grad = torch.randn_like(p)
    layout = ComponentLayout(layers)
    deferred = SensitivityTracker(layers, layout, WholeTensorAccess(), 0.85, 0.85)
    deferred.update(torch.tensor(0.25))
    for p in (layers[0].lora_A, layers[0].lora_B, layers[0].lora_lam):
        p.grad.mul_(0.25)
    in_place = SensitivityTracker(layers, layout, WholeTensorAccess(), 0.85, 0.85)
    in_place.update()
    torch.testing.assert_close(deferred.partial_sums(), in_place.partial_sums(), rtol=1e-6, atol=0)


def test_deepspeed_clips_with_the_runs_max_grad_norm(tmp_path):
    ds = load_ds_config(ROOT / "ds_configs/zero2.json", TrainConfig(max_grad_norm=1.0), world_size=2)
    assert ds["gradient_clipping"] == 1.0
    assert load_ds_config(ROOT / "ds_configs/zero2.json", TrainConfig(), 2)["gradient_clipping"] == 0.0
    path = tmp_path / "clip.json"
    path.write_text('{"gradient_clipping": 1.0}')
    with pytest.raises(ConfigError, match="gradient_clipping"):
        load_ds_config(path, TrainConfig(), world_size=2)


def test_negative_max_grad_norm_is_refused():
    with pytest.raises(ConfigError, match="train.max_grad_norm"):
        load_config(None, ["train.max_grad_norm=-1"]).validate()


def one_and_two_rank_trackers():
    """Two small adapter layers, their parameters, and trackers for one process and for each of 2 DDP ranks."""
    torch.manual_seed(0)
    layers = [AdaptiveLoRALayer(torch.nn.Linear(7, 5), r_max=3, scale=1.0) for _ in range(2)]
    params = [p for layer in layers for p in (layer.lora_A, layer.lora_B, layer.lora_lam)]
    layout = ComponentLayout(layers)
    trackers = [SensitivityTracker(layers, layout, access, 0.85, 0.85)
                for access in (WholeTensorAccess(), WholeTensorAccess(0, 2), WholeTensorAccess(1, 2))]
    return layers, params, trackers


def update_and_compare(trackers) -> None:
    """One update of every tracker; the two ranks' partial sums add up to one process's."""
    for tracker in trackers:
        tracker.update()
    torch.testing.assert_close(trackers[1].partial_sums() + trackers[2].partial_sums(),
                               trackers[0].partial_sums(), rtol=1e-12, atol=0)


def test_replicated_ranges_add_up_to_one_process_and_follow_a_moved_storage():
    """DDP: each of 2 ranks scores its half of every parameter from views it keeps between steps; over
    several updates their partial sums add up to one process's, also after a parameter's storage is replaced."""
    layers, params, trackers = one_and_two_rank_trackers()
    assert trackers[1].ranges is not None and trackers[0].ranges is None
    for step in range(3):
        for p in params:
            p.data.normal_()
            p.grad = torch.randn_like(p)
        if step == 1:  # a new storage (as after moving the model): stale views would read the old values
            layers[1].lora_B.data = torch.randn_like(layers[1].lora_B)
        update_and_compare(trackers)


def test_replicated_ranges_read_gradients_kept_in_a_bucket():
    """DDP with gradient_as_bucket_view: the gradients are views into one buffer that every backward writes in
    place. The views each rank keeps of its ranges follow the new values and a rebuilt buffer, and gradients
    that are tensors of their own are not kept past the update that read them."""
    _, params, trackers = one_and_two_rank_trackers()
    bucket = torch.zeros(sum(p.numel() for p in params))
    for step in range(4):
        for p in params:
            p.data.normal_()
        if step == 2:  # DDP rebuilds its buckets once: views of the old buffer would read stale gradients
            bucket = torch.zeros_like(bucket)
        bucket.normal_()
        for p, flat in zip(params, bucket.split([p.numel() for p in params])):
            p.grad = flat.view_as(p)
        update_and_compare(trackers)
    for p in params:
        p.grad = torch.randn_like(p)
    first = weakref.ref(params[0].grad)
    trackers[1].update()
    for p in params:
        p.grad = None
    assert first() is None
