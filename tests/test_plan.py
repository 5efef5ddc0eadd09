"""The planner: meta-device counts vs the closed form, exact bytes on a tiny Llama, the CLI and its errors."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, GPTNeoXConfig

from scale_rank import RankController, adapt
from scale_rank.cli import main
from scale_rank.config import method_config
from scale_rank.inject import adapter_layers
from scale_rank.planning import (PlanInputs, activations, build_meta_model, load_model_config, meta_trainable_count,
                                 model_geometry, plan_adapters)
from scale_rank.planning.adapters import adapter_buffer_bytes, method_state_bytes
from scale_rank.planning.memory import GIB, adapter_state_bytes, base_weight_bytes, layer_terms

# Published parameter counts (model cards / safetensors metadata of the hub repositories).
PUBLISHED = {"llama2_7b": 6_738_415_616, "llama3_8b": 8_030_261_248, "mistral_7b": 7_241_732_096,
             "qwen2_7b": 7_615_616_512, "llama2_70b": 68_976_648_192}
METHODS = ("lora", "adalora", "sora", "increlora", "prilora")
STEPS = 100


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_meta_build_matches_closed_form(name):
    """Trainable parameters after scale_rank.adapt on a meta-device build == sum of r (d_in + d_out) (+ lam)."""
    config = load_model_config(name)
    geometry = model_geometry(config)
    base = build_meta_model(config)
    assert geometry.total_params == sum(p.numel() for p in base.parameters()) == PUBLISHED[name]
    for method in METHODS:
        cfg = method_config(method)
        counted = meta_trainable_count(config, cfg, STEPS, model=copy.deepcopy(base))
        assert counted == plan_adapters(geometry, cfg).trainable, method


def test_closed_form_numbers_llama3_8b():
    """Spelled out: 32 layers x (q, o: 4096 -> 4096; k, v: 4096 -> 1024; gate, up: 4096 -> 14336; down)."""
    geometry = model_geometry(load_model_config("meta-llama/Meta-Llama-3-8B"))  # shipped: no network
    per_layer = 2 * (4096 + 4096) + 2 * (4096 + 1024) + 3 * (4096 + 14336)
    assert plan_adapters(geometry, method_config("lora", r=8)).trainable == 32 * 8 * per_layer
    assert plan_adapters(geometry, method_config("adalora", r_init=12)).trainable == 32 * 12 * (per_layer + 7)
    prilora = plan_adapters(geometry, method_config("prilora", r_first=4, r_last=12))
    assert [site.rank for site in prilora.sites[::7]] == [round(4 + 8 * i / 31 + 1e-9) for i in range(32)]
    assert plan_adapters(geometry, method_config("lora"), targets=["q_proj", "v_proj"]).modules == 64


# -- exact measurements on a tiny Llama (CPU, random init) ---------------------------------------------
def tiny_llama(method: str, **options):
    """The shipped tiny Llama in bf16 with (always float32) adapters of `method`, as the planner assumes."""
    torch.manual_seed(0)
    config = load_model_config("tiny_llama")
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    strategy = adapt(model, method_config(method, **options), STEPS, trainable=[])
    plan = plan_adapters(model_geometry(config), method_config(method, **options))
    return model, strategy, plan


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("method", METHODS)
def test_weights_gradients_adam_exact(method, single_thread):
    """Planner bytes == tensor bytes after one AdamW step: base (bf16), adapters, gradients, moments.

    The per-parameter `step` counters of torch's AdamW (a float32 scalar each, on the host) are not counted.
    """
    model, _, plan = tiny_llama(method)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    ids = torch.randint(0, 1000, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    adapters = [p for n, p in model.named_parameters() if "lora_" in n]
    base = [p for n, p in model.named_parameters() if "lora_" not in n]
    moments = [state[key] for state in optimizer.state.values() for key in ("exp_avg", "exp_avg_sq")]
    planned = adapter_state_bytes(plan, PlanInputs(engine="ddp", gpus=1))
    assert planned == (tensor_bytes(adapters), tensor_bytes(p.grad for p in trainable), tensor_bytes(moments))
    assert base_weight_bytes(model_geometry(load_model_config("tiny_llama")), 16) == tensor_bytes(base)
    if method != "lora" and method != "prilora":  # ZeRO's 16 bytes per parameter (2 + 2 + 12 there; 4 + 4 + 8 here)
        assert sum(planned) == 16 * plan.trainable


@pytest.mark.parametrize("method", ["adalora", "sora", "increlora", "prilora"])
def test_method_state_and_buffers_exact(method, single_thread):
    """Per-method statistics and layer buffers as allocated by the controller (one process)."""
    model, strategy, plan = tiny_llama(method)
    RankController(model, strategy)
    layers = adapter_layers(model)
    assert adapter_buffer_bytes(plan, 4) == tensor_bytes(b for layer in layers for b in layer.buffers())
    kept = {"adalora": lambda s: (s.tracker.i_bar, s.tracker.u_bar, s.tracker.index),
            "increlora": lambda s: (s.tracker.i_bar, s.tracker.u_bar, s.tracker.index),
            "sora": lambda s: (s.gate_index,), "prilora": lambda s: (s.inputs.flat,)}[method]
    assert method_state_bytes(plan, 1.0) == tensor_bytes(kept(strategy))


def test_saved_activations_exact(single_thread):
    """Bytes autograd saves in one forward (each storage once, parameters excluded) == the planner's."""
    model, _, plan = tiny_llama("adalora")
    RankController(model, _)  # the orthogonality regularizer runs as in training
    owned = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved = {}

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in owned:
            saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    ids = torch.randint(0, 1000, (2, 64))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids=ids, labels=ids)
    inputs = PlanInputs(seq_len=64, micro_batch=2, gradient_checkpointing=False)
    assert activations(model_geometry(load_model_config("tiny_llama")), plan, inputs).saved == sum(saved.values())


def test_block_terms_llama2_7b():
    """One Llama-2-7B block per token, spelled out (h 4096, f 11008, 32 heads, bf16 compute)."""
    geometry = model_geometry(load_model_config("llama2_7b"))
    plan = plan_adapters(geometry, method_config("lora", r=8))
    h, f = 4096, 11008
    same = layer_terms(geometry, plan, PlanInputs(adapter_bytes=2))
    assert same == {"norms": 2 * (4 * h + 4), "attention": 4 * h * 2 + 4 * 32, "mlp": 3 * f * 2,
                    "adapter inputs": (2 * h + f) * 2, "adapter ranks": 7 * 8 * 2}
    fp32 = layer_terms(geometry, plan, PlanInputs(adapter_bytes=4))
    assert fp32["adapter inputs"] == (6 * h + f) * 4  # a float32 copy per adapted layer


# -- the CLI -----------------------------------------------------------------------------------------
def test_cli_prints_a_table_that_fits(capsys):
    code = main(["plan", "--model", "llama3_8b", "--method", "adalora", "--engine", "zero3", "--gpus", "8",
                 "--bits", "4", "--seq-len", "4096", "--micro-batch", "1"])
    out = capsys.readouterr().out
    assert code == 0
    for line in ("base weights", "gradients", "AdamW states", "method state", "activations", "logits", "total"):
        assert line in out
    assert "fits in 80 GiB" in out and "75,264 B in 2 collective(s)" in out  # 28 B x 2688 components


def test_cli_json(capsys):
    code = main(["plan", "--model", "mistral_7b", "--method", "sora", "--engine", "fsdp2", "--gpus", "4",
                 "--no-gradient-checkpointing", "--seq-len", "1024", "-o", "method.r_max=16", "--json"])
    plan = json.loads(capsys.readouterr().out)
    assert code == 0 and plan["fits"] and plan["method"]["r_max"] == 16
    assert plan["memory"]["total"] == sum(v for k, v in plan["memory"].items() if k != "total")
    assert plan["trainable_params"] == 32 * 16 * (2 * 8192 + 2 * 5120 + 3 * 18432 + 7)


def test_does_not_fit_more_gpus_help(capsys):
    code = main(["plan", "--model", "llama2_70b", "--method", "lora", "--engine", "fsdp2", "--gpus", "1",
                 "--seq-len", "2048"])
    assert code == 1
    assert "fits with --gpus 2" in capsys.readouterr().err


def test_does_not_fit_at_any_gpu_count(capsys):
    code = main(["plan", "--model", "llama3_8b", "--engine", "zero3", "--gpus", "8", "--seq-len", "8192",
                 "--micro-batch", "16", "--no-gradient-checkpointing"])
    err = capsys.readouterr().err
    assert code == 1
    for advice in ("cannot help", "lower --seq-len or --micro-batch", "--gradient-checkpointing", "--bits 4"):
        assert advice in err


@pytest.mark.parametrize("args, message", [
    (["--seq-len", "4097"], "exceeds the model's max_position_embeddings (4096)"),
    (["--bits", "3"], "bits must be one of [16, 8, 4]"),
    (["--engine", "megatron"], "unknown engine 'megatron'"),
    (["--engine", "zero3", "--gpus", "2", "--bits", "8"], "cannot be sharded by zero3"),
    (["-o", "train.lr=1"], "plan reads only method.*"),
])
def test_bad_input(capsys, args, message):
    assert main(["plan", "--model", "llama2_7b", *args]) == 2
    assert message in capsys.readouterr().err


def test_unknown_model_type_needs_targets(tmp_path, capsys):
    GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  vocab_size=500, max_position_embeddings=128).save_pretrained(tmp_path)
    assert main(["plan", "--model", str(tmp_path)]) == 2
    assert "--targets" in capsys.readouterr().err
    assert main(["plan", "--model", str(tmp_path), "--targets", "query_key_value", "--seq-len", "64"]) == 0
    assert "meta-device build" in capsys.readouterr().out


# -- published figures -------------------------------------------------------------------------------
def test_published_weight_sizes():
    """Llama-2-7B in bf16 is ~13.5 GB; QLoRA (Dettmers et al. 2023) fine-tunes a 65B model on one 48 GB GPU."""
    llama7 = model_geometry(load_model_config("llama2_7b"))
    assert base_weight_bytes(llama7, 16) == 2 * 6_738_415_616
    llama70 = model_geometry(load_model_config("llama2_70b"))
    assert base_weight_bytes(llama70, 4, double_quant=True) / GIB < 36
    code = main(["plan", "--model", "llama2_70b", "--method", "lora", "--engine", "ddp", "--gpus", "1", "--bits",
                 "4", "-o", "model.double_quant=true", "--gpu-memory", "48", "--seq-len", "512"])
    assert code == 0
