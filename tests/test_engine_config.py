"""Engine choice, DeepSpeed config filling and refusals: each bad combination stops with one clear error."""
from __future__ import annotations

import json

import pytest

from scale_rank.config import ConfigError, ModelConfig, TrainConfig, load_config
from scale_rank.ds_config import load_ds_config, micro_batch_size
from scale_rank.engine import adopt_launcher_precision, fsdp_shard_size, refuse_unsupported, resolve_engine

LAUNCHER_VARS = ["ACCELERATE_USE_FSDP", "FSDP_VERSION", "ACCELERATE_USE_DEEPSPEED",
                 "ACCELERATE_DEEPSPEED_CONFIG_FILE", "ACCELERATE_MIXED_PRECISION", "FSDP_SHARDING_STRATEGY",
                 "LOCAL_WORLD_SIZE", "PARALLELISM_CONFIG_DP_REPLICATE_SIZE", "PARALLELISM_CONFIG_DP_SHARD_SIZE"]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in LAUNCHER_VARS:
        monkeypatch.delenv(name, raising=False)


def test_engine_from_config_and_launcher_environment(monkeypatch):
    assert resolve_engine(TrainConfig(), 1) == ("single", None)
    assert resolve_engine(TrainConfig(), 2) == ("ddp", None)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    assert resolve_engine(TrainConfig(), 2) == ("fsdp1", None)
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert resolve_engine(TrainConfig(), 2) == ("fsdp2", None)
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", "ds_configs/zero3.json")
    assert resolve_engine(TrainConfig(), 2) == ("deepspeed", "ds_configs/zero3.json")
    assert resolve_engine(TrainConfig(engine="ddp"), 2)[0] == "ddp"  # the config wins


def test_unknown_or_inconsistent_engine_is_refused():
    with pytest.raises(ConfigError, match="train.engine"):
        load_config(None, ["train.engine=megatron"]).validate()
    with pytest.raises(ConfigError, match="--deepspeed"):
        resolve_engine(TrainConfig(engine="deepspeed"), 2)
    with pytest.raises(ConfigError, match="drop one"):
        resolve_engine(TrainConfig(engine="fsdp2", deepspeed_config="ds_configs/zero3.json"), 2)


def test_launcher_precision_is_adopted_unless_configured(monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    cfg = TrainConfig()
    adopt_launcher_precision(cfg)
    assert cfg.precision == "bf16"


def test_auto_values_are_filled_from_the_run(tmp_path):
    cfg = TrainConfig(batch_size=32, grad_accum=2, lr=3e-4, weight_decay=0.01, precision="bf16")
    ds = load_ds_config("ds_configs/zero3.json", cfg, world_size=2)
    assert ds["train_batch_size"] == 32
    assert ds["train_micro_batch_size_per_gpu"] == 8
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["optimizer"]["params"]["lr"] == 3e-4 and ds["optimizer"]["params"]["weight_decay"] == 0.01
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert ds["zero_optimization"]["stage"] == 3


def test_deepspeed_config_that_contradicts_the_command_line(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_batch_size": 64, "zero_optimization": {"stage": 2}}))
    with pytest.raises(ConfigError, match="train_batch_size = 64 but the run asks for 32"):
        load_ds_config(path, TrainConfig(batch_size=32), world_size=2)
    with pytest.raises(ConfigError, match="does not exist"):
        load_ds_config(tmp_path / "missing.json", TrainConfig(), world_size=2)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_ds_config(path, TrainConfig(), world_size=2)


def test_world_size_must_divide_the_batch():
    assert micro_batch_size(TrainConfig(batch_size=32, grad_accum=2), 2) == 8
    with pytest.raises(ConfigError, match="multiple of 6"):
        micro_batch_size(TrainConfig(batch_size=32, grad_accum=2), 3)


def test_int8_cannot_be_sharded(tmp_path):
    with pytest.raises(ConfigError, match="nf4"):
        refuse_unsupported("fsdp2", None, ModelConfig(quantization="int8"))
    with pytest.raises(ConfigError, match="ZeRO-3"):
        refuse_unsupported("deepspeed", "ds_configs/zero3.json", ModelConfig(quantization="int8"))
    refuse_unsupported("deepspeed", "ds_configs/zero2.json", ModelConfig(quantization="int8"))
    refuse_unsupported("fsdp2", None, ModelConfig(quantization="nf4"))


def test_fp16_overflow_step_is_detected_and_not_scored():
    """fp16 with a loss scaler: a step whose gradients overflow is skipped by the optimizer and the controller."""
    import torch

    import scale_rank as sr
    from scale_rank.engine import ProcessInfo
    from scale_rank.engines import make_engine
    from scale_rank.inject import adapter_layers
    from tests.support.methods import tiny_bert

    model = tiny_bert()
    method = sr.adapt(model, "adalora", total_steps=10, t_init=1, t_final=2, delta_t=1)
    groups = method.optimizer_groups(adapter_layers(model), 1e-3, 0.0)
    engine = make_engine("single", model, groups, TrainConfig(precision="fp16"), 10,
                         ProcessInfo(0, 1, 0, torch.device("cpu")))
    controller = sr.RankController(model, method)
    ids, labels = torch.randint(1, 100, (4, 8)), torch.randint(0, 2, (4,))
    engine.backward(engine.forward({"input_ids": ids, "labels": labels}).loss, 1)
    first_layer = controller.layers[0]
    first_layer.lora_A.grad[0, 0] = float("inf")
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    ema_before = method.tracker.i_bar.clone()
    skipped = engine.prepare_step()
    assert skipped
    controller.observe(skipped=skipped)
    engine.step()
    controller.apply()
    assert controller.step_count == 0 and torch.equal(method.tracker.i_bar, ema_before)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)


def test_hybrid_sharding_from_the_config_or_accelerates_environment(monkeypatch):
    assert fsdp_shard_size(TrainConfig(), "fsdp2", 8) == 8  # full sharding
    assert fsdp_shard_size(TrainConfig(fsdp_shard_size=4), "fsdp1", 8) == 4
    monkeypatch.setenv("FSDP_SHARDING_STRATEGY", "HYBRID_SHARD")  # FSDP1 yaml: within a machine
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert fsdp_shard_size(TrainConfig(), "fsdp1", 8) == 2
    monkeypatch.setenv("PARALLELISM_CONFIG_DP_REPLICATE_SIZE", "2")  # FSDP2 yaml: parallelism_config
    monkeypatch.setenv("PARALLELISM_CONFIG_DP_SHARD_SIZE", "4")
    assert fsdp_shard_size(TrainConfig(), "fsdp2", 8) == 4
    assert fsdp_shard_size(TrainConfig(fsdp_shard_size=8), "fsdp2", 8) == 8  # the config wins
    with pytest.raises(ConfigError, match="2 replicas x 4 shards, but 4 processes"):
        fsdp_shard_size(TrainConfig(), "fsdp2", 4)


@pytest.mark.parametrize("size,kind,match", [(3, "fsdp2", "divides the world size"), (1, "fsdp1", "engine=ddp"),
                                             (2, "deepspeed", "is for FSDP")])
def test_impossible_hybrid_sharding_is_refused(size, kind, match):
    with pytest.raises(ConfigError, match=match):
        fsdp_shard_size(TrainConfig(fsdp_shard_size=size), kind, 4)
