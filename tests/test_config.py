"""Bad input fails early with scale_rank.config.ConfigError, and the message says what to change."""
from __future__ import annotations

import pytest
import torch

import scale_rank as sr
from scale_rank.config import (AdaLoRAConfig, ConfigError, IncreLoRAConfig, PRILoRAConfig, SoRAConfig,
                               load_config, method_config)
from scale_rank.inject import find_sites

pytestmark = pytest.mark.usefixtures("single_thread")


def untouched(model: torch.nn.Module) -> bool:
    """No adapter attached and every parameter still trainable (the model was not modified)."""
    names = [n for n, _ in model.named_parameters()]
    return not any("lora_" in n for n in names) and all(p.requires_grad for p in model.parameters())


# ------------------------------------------------------------------------------------------------
# method names and budgets
# ------------------------------------------------------------------------------------------------

def test_unknown_method_name(tiny_model):
    with pytest.raises(ConfigError) as err:
        method_config("adalorra")
    assert "unknown method 'adalorra'" in str(err.value)
    for name in ("adalora", "increlora", "lora", "prilora", "sora"):  # lists the valid choices
        assert name in str(err.value)
    with pytest.raises(ConfigError, match="unknown method 'dora'"):
        sr.adapt(tiny_model, "dora", total_steps=10)
    assert untouched(tiny_model)
    with pytest.raises(ConfigError, match="unknown method 'dora'"):
        load_config(overrides=["method.name=dora"])


def test_adalora_target_above_init(tiny_model):
    with pytest.raises(ConfigError) as err:
        sr.adapt(tiny_model, "adalora", total_steps=100, r_init=4, r_target=6)
    message = str(err.value)
    assert "r_target (6)" in message and "r_init (4)" in message
    assert "raise r_init or lower r_target" in message
    assert untouched(tiny_model)


def test_increlora_target_above_capacity(tiny_model):
    with pytest.raises(ConfigError) as err:
        sr.adapt(tiny_model, "increlora", total_steps=100, r_target=8, r_max=8, incre_rank=1)
    message = str(err.value)
    assert "r_target (8)" in message and "r_max=8" in message
    assert "raise r_max to at least 9" in message
    assert untouched(tiny_model)
    # capacity must also hold the first reserves
    with pytest.raises(ConfigError, match="raise r_max"):
        IncreLoRAConfig(r_start=4, r_target=4, r_max=4, incre_rank=1).validate(100)
    with pytest.raises(ConfigError, match="IncreLoRA only grows"):
        IncreLoRAConfig(r_start=4, r_target=2, r_max=8).validate(100)


@pytest.mark.parametrize("name,key,value,expected", [
    ("adalora", "r_target", -1, "method.r_target must be >= 0, got -1"),
    ("adalora", "r_init", 0, "method.r_init must be > 0, got 0"),
    ("adalora", "t_init", -5, "method.t_init must be >= 0, got -5"),
    ("adalora", "delta_t", 0, "method.delta_t must be > 0"),
    ("adalora", "beta1", 1.0, "method.beta1 must be in [0, 1)"),
    ("adalora", "gamma", -0.1, "method.gamma must be >= 0"),
    ("increlora", "r_target", -2, "method.r_target must be > 0, got -2"),
    ("increlora", "top_h", 0, "method.top_h must be > 0"),
    ("increlora", "incre_interval", -3, "method.incre_interval must be > 0"),
    ("increlora", "restart_warmup", -1, "method.restart_warmup must be >= 0"),
    ("sora", "xi", -1e-3, "method.xi must be >= 0"),
    ("sora", "xi_end", -1.0, "method.xi_end must be >= 0"),
    ("sora", "l1", -0.5, "method.l1 must be >= 0"),
    ("sora", "gate_lr", 0.0, "method.gate_lr must be > 0"),
    ("sora", "xi_mode", "paper", "method.xi_mode must be one of ['absolute', 'lr']"),
    ("prilora", "prune_ratio", 1.5, "method.prune_ratio must be in [0, 1)"),
    ("prilora", "prune_ratio", -0.1, "method.prune_ratio must be in [0, 1)"),
    ("prilora", "prune_interval", 0, "method.prune_interval must be > 0"),
    ("prilora", "r_first", -4, "method.r_first must be > 0"),
    ("lora", "r", 0, "method.r must be > 0"),
    ("lora", "alpha", -16.0, "method.alpha must be > 0"),
    ("lora", "dropout", 1.0, "method.dropout must be in [0, 1)"),
])
def test_negative_or_out_of_range_values(name, key, value, expected, tiny_model):
    with pytest.raises(ConfigError) as err:
        sr.adapt(tiny_model, name, total_steps=100, **{key: value})
    assert expected in str(err.value)
    assert untouched(tiny_model)


@pytest.mark.parametrize("key,value,expected", [
    ("lr", -1e-4, "train.lr must be > 0"),
    ("batch_size", 0, "train.batch_size must be > 0"),
    ("grad_accum", 0, "train.grad_accum must be > 0"),
    ("weight_decay", -0.01, "train.weight_decay must be >= 0"),
    ("total_steps", -10, "train.total_steps must be > 0"),
])
def test_bad_training_values(key, value, expected):
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(")):
        load_config(overrides=[f"train.{key}={value}", "method.name=lora"]).validate()


def test_total_steps_required_for_scheduled_methods(tiny_model):
    for name in ("adalora", "increlora"):
        with pytest.raises(ConfigError) as err:
            sr.adapt(tiny_model, name)
        assert "set train.total_steps" in str(err.value) and name in str(err.value)
        assert untouched(tiny_model)
    with pytest.raises(ConfigError, match="set train.total_steps"):  # a schedule over the run
        sr.adapt(tiny_model, "sora", xi_end=0.01)
    with pytest.raises(ConfigError, match="set train.total_steps"):
        load_config(overrides=["method.name=adalora", "train.total_steps=null"]).validate()
    # methods without a schedule do not need it
    for name in ("lora", "prilora", "sora"):
        model = type(tiny_model)(tiny_model.config)
        sr.adapt(model, name)


def test_adalora_phases_longer_than_training():
    with pytest.raises(ConfigError, match=r"t_init \+ t_final < total steps"):
        AdaLoRAConfig(t_init=50, t_final=50).validate(100)
    AdaLoRAConfig(t_init=49, t_final=50).validate(100)  # one step of pruning is enough


# ------------------------------------------------------------------------------------------------
# targets
# ------------------------------------------------------------------------------------------------

def test_targets_that_match_nothing(tiny_model):
    with pytest.raises(ConfigError) as err:
        find_sites(tiny_model, ["attention.self.q_proj"])
    message = str(err.value)
    assert "match no module" in message
    assert "bert.encoder.layer.0.attention.self.query" in message  # shows names that would work
    with pytest.raises(ConfigError, match="match no module"):
        find_sites(tiny_model, r"decoder\..*")
    with pytest.raises(ConfigError, match="match no module"):
        sr.adapt(tiny_model, "lora", targets=["q_proj", "v_proj"])
    assert untouched(tiny_model)


@pytest.mark.parametrize("targets", [["attention.output"], ["LayerNorm"], r".*\.attention", ["query", "dropout"]])
def test_targets_that_match_a_non_linear_module(targets, tiny_model):
    with pytest.raises(ConfigError) as err:
        sr.adapt(tiny_model, "lora", targets=targets)
    message = str(err.value)
    assert "not linear layers" in message and "narrow the patterns to linear layers" in message
    assert untouched(tiny_model)


def test_default_and_explicit_targets(tiny_model):
    sites = find_sites(tiny_model)
    assert len(sites) == 12
    assert {s.kind for s in sites} == {"attention.self.query", "attention.self.key", "attention.self.value",
                                       "attention.output.dense", "intermediate.dense", "output.dense"}
    assert sorted({s.layer_index for s in sites}) == [0, 1]
    regex = find_sites(tiny_model, r"bert\.encoder\.layer\.\d+\.attention\.self\.(query|value)")
    assert [s.name for s in regex] == [f"bert.encoder.layer.{i}.attention.self.{m}"
                                       for i in (0, 1) for m in ("query", "value")]


def test_unknown_model_type_needs_explicit_targets():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ConfigError, match="set model.targets"):
        find_sites(model)
    assert [s.name for s in find_sites(model, ["0"])] == ["0"]


# ------------------------------------------------------------------------------------------------
# load_config: YAML, overrides, unknown keys
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("item", ["method.r_target4", "r_target=4", "method.r.target=4", "=4",
                                  "method.r_target:4"])
def test_bad_override_syntax(item):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[item])
    assert "must look like section.key=value" in str(err.value)
    assert repr(item) in str(err.value)


def test_unknown_config_keys(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["method.name=adalora", "method.r_targt=4"])
    message = str(err.value)
    assert "unknown method option(s) ['r_targt']" in message and "'r_target'" in message  # names valid keys
    with pytest.raises(ConfigError, match=r"unknown train option\(s\) \['lrate'\]"):
        load_config(overrides=["train.lrate=0.1"])
    with pytest.raises(ConfigError, match=r"unknown config section\(s\) \['optim'\]; valid: method, model, data, train"):
        load_config(overrides=["optim.lr=0.1"])
    # an option of another method
    with pytest.raises(ConfigError, match=r"unknown method option\(s\) \['r_init'\]"):
        load_config(overrides=["method.name=lora", "method.r_init=4"])
    path = tmp_path / "bad.yaml"
    path.write_text("method:\n  name: sora\n  xi_start: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown method option\(s\) \['xi_start'\]"):
        load_config(path)


def test_wrong_types():
    with pytest.raises(ConfigError, match="method.r_target must be of type int, got 'four'"):
        load_config(overrides=["method.name=adalora", "method.r_target=four"])
    with pytest.raises(ConfigError, match="method.r_init must be of type int"):
        load_config(overrides=["method.name=adalora", "method.r_init=4.5"])
    with pytest.raises(ConfigError, match="method.alpha must be of type float"):
        load_config(overrides=["method.name=lora", "method.alpha=true"])
    with pytest.raises(ConfigError, match="method.r may not be empty"):
        load_config(overrides=["method.name=lora", "method.r=null"])


def test_missing_or_malformed_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping of sections"):
        load_config(path)


def test_yaml_and_overrides_give_typed_config(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("method:\n  name: sora\n  r_max: 6\n  xi: 1e-3\n"
                    "train:\n  lr: 5e-4\n  total_steps: 100\n")
    cfg = load_config(path, ["method.r_max=4", "method.xi_end=0.01", "train.batch_size=16",
                             "model.targets=[query, value]"]).validate()
    assert isinstance(cfg.method, SoRAConfig)
    assert cfg.method.r_max == 4 and cfg.method.xi == 1e-3 and isinstance(cfg.method.xi, float)  # YAML "1e-3"
    assert cfg.method.xi_end == 0.01 and cfg.train.lr == 5e-4 and cfg.train.batch_size == 16
    assert cfg.model.targets == ["query", "value"]
    # the method can be switched by an override; its defaults then come from docs/methods.md
    cfg = load_config(overrides=["method.name=prilora", "method.prune_ratio=0.25"])
    assert isinstance(cfg.method, PRILoRAConfig)
    assert (cfg.method.r_first, cfg.method.r_last, cfg.method.prune_interval, cfg.method.beta) == (4, 12, 100, 0.9)
    assert cfg.method.prune_ratio == 0.25


def test_method_defaults_follow_methods_md():
    ada = method_config("adalora")
    assert (ada.beta1, ada.beta2, ada.resolved_gamma()) == (0.85, 0.85, 0.03)
    inc = method_config("increlora")
    assert (inc.reserve_lam, inc.resolved_gamma(), inc.score, inc.scale_rule) == (1e-5, 0.1, "component", "fixed")
    # the default start: half the target rank, activated components rebalanced; the papers': rank 1, reserve
    assert (inc.resolved_r_start(), inc.resolved_activation()) == (inc.r_target // 2, "rebalance")
    paper = method_config("increlora", init="paper")
    assert (paper.resolved_r_start(), paper.resolved_activation()) == (1, "reserve")
    # AdaLoRA's regularizer: a third of the papers' weight with the LoRA-like start, theirs with init=paper,
    # and a given gamma whatever the start
    assert method_config("adalora", init="paper").resolved_gamma() == 0.1
    assert method_config("adalora", init="paper", gamma=0.5).resolved_gamma() == 0.5
    assert method_config("adalora", gamma=0.0).resolved_gamma() == 0.0
    sora = method_config("sora")
    assert (sora.r_max, sora.alpha, sora.l1, sora.xi_mode, sora.xi, sora.init) == \
        (8, 16.0, 0.0, "absolute", 3e-4, "lora")
    pri = method_config("prilora")
    assert (pri.r_first, pri.r_last, pri.prune_interval, pri.prune_ratio, pri.beta) == (4, 12, 100, 0.5, 0.9)
