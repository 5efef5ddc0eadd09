"""The engine classes: the factory builds the class of each kind; each engine steps, clips and checkpoints
through its own methods (none asks which engine it is); every torch engine trains one process alike."""
from __future__ import annotations

import datetime
import inspect
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import scale_rank as sr
from scale_rank.config import ENGINES, TrainConfig
from scale_rank.engine import ProcessInfo
from scale_rank.engines import (ENGINE_CLASSES, DeepSpeedEngine, FSDP1Engine, FSDP2Engine, FSDPEngine, LocalEngine,
                                TorchEngine, engine_class, make_engine)
from scale_rank.inject import adapter_layers
from tests.support.methods import fixed_batches, tiny_bert

KINDS = [kind for kind in ENGINES if kind != "auto"]
TORCH_KINDS = ["single", "ddp", "fsdp2", "fsdp1"]
ONE_PROCESS = ProcessInfo(0, 1, 0, torch.device("cpu"))
STEPS = 4
CLIP = 1e-2


def test_the_factory_has_one_class_per_configurable_engine():
    assert sorted(ENGINE_CLASSES) == sorted(KINDS)
    for kind in KINDS:
        assert engine_class(kind).kind == kind
        assert not inspect.isabstract(engine_class(kind)), kind
    with pytest.raises(ValueError, match="unknown engine 'fsdp3'"):
        engine_class("fsdp3")


def test_the_factory_refuses_missing_or_misplaced_options():
    model, groups = _adapted()
    with pytest.raises(ValueError, match="needs a DeepSpeed config"):
        make_engine("deepspeed", model, groups, TrainConfig(), 10, ONE_PROCESS)
    with pytest.raises(ValueError, match="hybrid sharding"):
        make_engine("ddp", model, groups, TrainConfig(), 10, ProcessInfo(0, 4, 0, torch.device("cpu")), shard_size=2)
    with pytest.raises(ValueError, match="engine 'single' is one process"):
        make_engine("single", model, groups, TrainConfig(), 10, ProcessInfo(0, 2, 0, torch.device("cpu")))


def _owner(cls: type, *names: str) -> type:
    """The most derived class in `cls`'s MRO that defines any of `names`."""
    return next(c for c in cls.__mro__ if any(name in vars(c) for name in names))


@pytest.mark.parametrize("kind,step,clip,checkpoint", [
    ("single", TorchEngine, TorchEngine, LocalEngine),
    ("ddp", TorchEngine, TorchEngine, LocalEngine),
    ("fsdp2", TorchEngine, FSDP2Engine, FSDPEngine),
    ("fsdp1", TorchEngine, FSDP1Engine, FSDPEngine),
    ("deepspeed", DeepSpeedEngine, DeepSpeedEngine, DeepSpeedEngine)])
def test_each_engine_steps_clips_and_checkpoints_through_its_own_class(kind, step, clip, checkpoint):
    """Engines that differ in a part implement it in different classes, found by inheritance."""
    cls = engine_class(kind)
    assert _owner(cls, "step") is step
    assert _owner(cls, "clip_gradients", "_clip_norm") is clip
    assert _owner(cls, "save_state") is _owner(cls, "load_state") is _owner(cls, "_full_state") is checkpoint


def test_importing_the_engines_leaves_deepspeed_unloaded():
    import subprocess
    import sys
    code = "import sys, scale_rank.train, scale_rank.engines; print('deepspeed' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.stdout.strip() == "False", done.stderr[-2000:]


@pytest.fixture(scope="module")
def one_rank_group():
    """A gloo process group of this process alone (DDP and FSDP need one); removed afterwards."""
    if dist.is_initialized():
        pytest.skip("a process group exists already")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                            timeout=datetime.timedelta(minutes=2))
    yield
    dist.destroy_process_group()


def _adapted() -> tuple[torch.nn.Module, list[dict]]:
    model = tiny_bert()
    method = sr.adapt(model, "adalora", total_steps=10, t_init=1, t_final=2, delta_t=1)
    return model, method.optimizer_groups(adapter_layers(model), 1e-2, 0.0)


def _train(kind: str, directory: Path) -> dict:
    """STEPS clipped steps through engine `kind`, whose `kind` attribute is then hidden (a method that asked
    for it would fail or take another engine's path); a checkpoint after them; one more step; the load."""
    model, groups = _adapted()
    engine = make_engine(kind, model, groups, TrainConfig(lr=1e-2, warmup_steps=0), 10, ONE_PROCESS)
    assert type(engine) is ENGINE_CLASSES[kind]
    engine.kind = "hidden"
    engine.train(True)
    losses, norms = [], []

    def one_step(ids, labels):
        loss = engine.forward({"input_ids": ids, "labels": labels}).loss
        engine.backward(loss, 1)
        assert not engine.prepare_step()
        norms.append(float(engine.clip_gradients(CLIP)[0]))
        engine.step()
        engine.zero_grad()
        losses.append(float(loss))

    batches = fixed_batches()
    for step in range(STEPS):
        one_step(*batches[step % len(batches)])
    engine.save_state(directory)
    saved, lr = engine.full_trainable_state(), engine.lr()
    one_step(*batches[0])
    engine.load_state(directory)
    loaded = engine.full_trainable_state()
    assert engine.lr() == lr
    return {"losses": losses, "norms": norms, "saved": saved, "loaded": loaded,
            "files": sorted(p.name for p in directory.iterdir())}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, one_rank_group) -> dict:
    return _train("single", tmp_path_factory.mktemp("single"))


@pytest.mark.parametrize("kind", TORCH_KINDS)
def test_each_torch_engine_trains_clips_saves_and_loads_one_process(kind, reference, tmp_path, single_thread):
    run = reference if kind == "single" else _train(kind, tmp_path)
    assert run["files"] == (["dcp", "engine.pt"] if issubclass(engine_class(kind), FSDPEngine) else ["engine.pt"])
    assert run["losses"][STEPS] < run["losses"][0]  # the first batch again, one pass later
    assert run["norms"][0] > CLIP  # the clipping acted
    assert run["saved"].keys() == run["loaded"].keys() == reference["saved"].keys()
    for name, tensor in run["saved"].items():
        torch.testing.assert_close(run["loaded"][name], tensor, rtol=0, atol=0, msg=name)
        torch.testing.assert_close(tensor, reference["saved"][name], rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(run["losses"], reference["losses"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", TORCH_KINDS)
def test_each_torch_engine_checkpoints_the_fp16_loss_scale(kind, one_rank_group, tmp_path, single_thread):
    """A resumed fp16 run continues with the loss scale it had, not GradScaler's initial 65536."""
    model, groups = _adapted()
    engine = make_engine(kind, model, groups, TrainConfig(lr=1e-2, warmup_steps=0, precision="fp16"), 10,
                         ONE_PROCESS)
    ids, labels = fixed_batches()[0]
    engine.backward(engine.forward({"input_ids": ids, "labels": labels}).loss, 1)
    engine.prepare_step()
    engine.step()
    engine.scaler.update(new_scale=1024.0)  # as after a run of overflows
    engine.save_state(tmp_path)
    engine.scaler.update(new_scale=8.0)
    engine.load_state(tmp_path)
    assert engine.grad_scale() == 1024.0


def test_fsdp2_storage_is_the_local_shard_and_follows_a_new_one(one_rank_group, single_thread):
    """FSDP2's access hands out (and keeps) a flat view of each DTensor's local tensor: an edit through it reaches
    the parameter, and when FSDP2 puts a new local tensor in place (it does on resetting its shards) the next
    read views that one, not the kept one."""
    model, groups = _adapted()
    engine = make_engine("fsdp2", model, groups, TrainConfig(), 10, ONE_PROCESS)
    ids, labels = fixed_batches()[0]
    engine.backward(engine.forward({"input_ids": ids, "labels": labels}).loss, 1)
    lam = adapter_layers(engine.model)[0].lora_lam
    local = engine.access.storage(lam)
    assert local.values.data_ptr() == lam._local_tensor.data_ptr()
    assert local.grad.data_ptr() == lam.grad._local_tensor.data_ptr()
    assert engine.access.storage(lam).values is local.values  # kept, not made again
    local.values.fill_(3.0)
    assert torch.equal(lam.full_tensor(), torch.full_like(lam.full_tensor(), 3.0))
    lam._local_tensor = torch.full_like(lam._local_tensor, 5.0)
    again = engine.access.storage(lam)
    assert again.values.data_ptr() == lam._local_tensor.data_ptr() and torch.all(again.values == 5.0)
