"""16-bit frozen bases under the torch engines: with train.precision bf16 / fp16 the frozen base is stored in
16 bits, what trains (adapters, task heads) and its AdamW moments in float32; autocast sets the compute dtype.

One process here; DDP, FSDP2 and FSDP1 on 2 processes (bytes per rank, decisions equal to 1 process's) in
tests/distributed/test_equivalence.py::test_bf16_base_is_stored_in_16_bits_and_matches_one_process.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from scale_rank.config import load_config
from scale_rank.engine import transformer_blocks, uniform_dtype_units
from scale_rank.export import load_run
from scale_rank.inject import adapter_layers
from scale_rank.layer import AdaptiveLoRALayer
from scale_rank.model import build_adapted_model
from scale_rank.planning import PlanInputs, load_model_config, model_geometry
from scale_rank.planning.memory import base_weights_per_gpu
from scale_rank.train import train
from tests.support.storage import storage_report
from tests.support.tiny import overrides, tiny_decoder_dir, tiny_model_dir

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
DECODER = ("data.task=synthetic_chat", "data.max_length=48")


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("models")
    return {"classifier": tiny_model_dir(root / "bert", hidden=64), "decoder": tiny_decoder_dir(root / "llama")}


def settings(model_dirs: dict, model: str, out, precision: str) -> list[str]:
    """Overrides of a 10-step adalora run of the tiny BERT classifier or the tiny Llama decoder."""
    items = overrides(model_dirs[model], out, "adalora", steps=10) + [f"train.precision={precision}"]
    return items + list(DECODER if model == "decoder" else ())


_runs: dict = {}


def run(model_dirs: dict, tmp_path_factory, model: str, precision: str):
    """One process, one short run per (model, precision), shared by the tests below."""
    if (model, precision) not in _runs:
        out = tmp_path_factory.mktemp(f"{model}_{precision}") / "run"
        _runs[model, precision] = train(load_config(None, settings(model_dirs, model, out, precision)),
                                        progress=False)
    return _runs[model, precision]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("model", ["classifier", "decoder"])
def test_one_process_stores_the_base_in_16_bits_and_trains_in_float32(model, precision, model_dirs,
                                                                     tmp_path_factory, single_thread):
    result = run(model_dirs, tmp_path_factory, model, precision)
    report = storage_report(result.engine.model, result.engine.optimizer)
    assert report["base_bytes"] == 2 * report["base_numel"] > 0
    assert report["base_dtypes"] == [str(DTYPES[precision])]
    assert report["adapter_dtypes"] == report["moment_dtypes"] == ["torch.float32"]
    assert report["head_dtypes"] == (["torch.float32"] if model == "classifier" else [])


def test_planner_counts_the_base_bytes_the_trainer_stores(model_dirs, tmp_path_factory, single_thread):
    """The plan's weight line for one GPU is the measured 16-bit base of a bf16 run (2 bytes per parameter)."""
    result = run(model_dirs, tmp_path_factory, "decoder", "bf16")
    geometry = model_geometry(load_model_config(str(model_dirs["decoder"])))
    held = storage_report(result.engine.model, result.engine.optimizer)["base_bytes"]
    assert base_weights_per_gpu(geometry, PlanInputs(engine="ddp", gpus=1, bits=16)) == held


def test_bf16_training_decreases_the_loss(model_dirs, tmp_path_factory, single_thread):
    losses = run(model_dirs, tmp_path_factory, "decoder", "bf16").losses
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1, losses


def test_export_of_a_bf16_run_rebuilds_a_float32_model(model_dirs, tmp_path_factory, single_thread):
    """The export runs without autocast, so the rebuilt base is float32 (as before), and it runs."""
    result = run(model_dirs, tmp_path_factory, "classifier", "bf16")
    model, tokenizer, _ = load_run(result.run_dir)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    with torch.no_grad():
        assert model(**tokenizer(["a fine film"], return_tensors="pt")).logits.dtype == torch.float32


@pytest.mark.parametrize("autocast", [False, True])
def test_float32_adapter_on_a_bf16_base_takes_bf16_input(autocast):
    """Without autocast the adapter computes in float32 and returns the base's dtype; under autocast the
    matmuls run in bf16. Either way the result is the float32 computation to bf16 accuracy, and the
    gradients of A, B and lam are float32."""
    torch.manual_seed(0)
    layer = AdaptiveLoRALayer(nn.Linear(64, 32).bfloat16().requires_grad_(False), r_max=4, scale=2.0)
    layer.init_gaussian(0.5)
    assert {p.dtype for p in (layer.lora_A, layer.lora_B, layer.lora_lam)} == {torch.float32}
    x = torch.randn(3, 5, 64).bfloat16()
    context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with context:
        out = layer(x)
    assert out.dtype == torch.bfloat16
    with torch.no_grad():
        base, A, B = layer.base_layer, layer.lora_A, layer.lora_B
        expected = x.float() @ base.weight.float().t() + base.bias.float()
        expected += 2.0 * ((x.float() @ A.t()) * layer.lora_lam) @ B.t()
    torch.testing.assert_close(out.float(), expected, rtol=0.02, atol=0.02 * float(expected.abs().max()))
    out.float().pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32
               for p in (layer.lora_A, layer.lora_B, layer.lora_lam))


def unit_params(root: nn.Module, units: set[nn.Module]) -> list[list[nn.Parameter]]:
    """The parameters each FSDP1 unit (the root and `units`) flattens: its own, less those of nested units."""
    def claimed(module: nn.Module) -> list[nn.Parameter]:
        params = list(module.parameters(recurse=False))
        for child in module.children():
            if child not in units:
                params += claimed(child)
        return params
    return [claimed(unit) for unit in [root, *units]]


@pytest.mark.parametrize("model", ["classifier", "decoder"])
def test_fsdp1_units_hold_one_dtype_each(model, model_dirs, tmp_path):
    """bf16: every unit FSDP1 flattens holds one dtype (adapter layers, their base linears and the head apart
    from the blocks); float32: the units are the blocks, as before."""
    built, _, _ = build_adapted_model(load_config(None, settings(model_dirs, model, tmp_path, "bf16")), 2)
    units = uniform_dtype_units(built)
    layers = adapter_layers(built)
    assert set(transformer_blocks(built)) | set(layers) | {layer.base_layer for layer in layers} <= units
    if model == "classifier":
        assert built.classifier in units
    groups = unit_params(built, units)
    assert all(len({p.dtype for p in group}) == 1 for group in groups if group)
    assert {p.dtype for group in groups for p in group} == {torch.bfloat16, torch.float32}
    full, _, _ = build_adapted_model(load_config(None, settings(model_dirs, model, tmp_path, "fp32")), 2)
    assert uniform_dtype_units(full) == set(transformer_blocks(full))


def test_fsdp1_refuses_a_module_whose_own_parameters_mix_dtypes():
    model = nn.Sequential(nn.Linear(4, 4))
    model[0].bias.data = model[0].bias.data.bfloat16()
    with pytest.raises(ValueError, match="0: its own parameters mix dtypes"):
        uniform_dtype_units(model)
