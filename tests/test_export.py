"""Export: PEFT adapter files that PEFT's own loader turns back into the trained model, merged models, runs.

The reference is always an independent loader (peft.PeftModel.from_pretrained on a freshly loaded base, or
transformers' from_pretrained for merged models), compared with the trained model's outputs in fp32.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertForSequenceClassification, BertTokenizer, GPT2Config, \
    GPT2ForSequenceClassification

from scale_rank import RankController, adapt
from scale_rank.config import config_from_dict
from scale_rank.export import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, export_merged, export_peft, export_run,
                               save_trainable)
from scale_rank.inject import adapter_layers

TOL = 1e-5
STEPS = 20
VOCAB = 100

METHOD_OPTIONS = {
    "lora": dict(r=4),
    "adalora": dict(r_init=6, r_target=3, t_init=2, t_final=6, delta_t=2),
    "sora": dict(r_max=6, xi=0.03, init="paper"),  # N(0, 1) gates: some are 0 at export
    "increlora": dict(r_start=1, r_target=3, r_max=6, incre_rank=1, incre_interval=2, t_init=2, top_h=4),
    "prilora": dict(r_first=2, r_last=6, prune_interval=5),
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: intra-op threads only add contention (20x slower on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, num_labels=2)
    return BertForSequenceClassification(config)


def tiny_gpt2() -> GPT2ForSequenceClassification:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=64, num_labels=2,
                        pad_token_id=0, bos_token_id=1, eos_token_id=1)
    return GPT2ForSequenceClassification(config)


def batch(seed: int, size: int = 8, length: int = 12) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(1, VOCAB, (size, length), generator=g),  # no pad id (0)
            "labels": torch.randint(0, 2, (size,), generator=g)}


def train(model, method, steps: int = STEPS) -> RankController:
    """AdamW lr 1e-2 with the controller stepping ranks, like the training loop does."""
    controller = RankController(model, method)
    layers = adapter_layers(model)
    groups = method.optimizer_groups(layers, 1e-2, 0.0)
    adapter_params = {id(p) for g in groups for p in g["params"]}
    heads = [p for p in model.parameters() if p.requires_grad and id(p) not in adapter_params]
    optimizer = torch.optim.AdamW(groups + [{"params": heads, "lr": 1e-2, "weight_decay": 0.0}], lr=1e-2)
    model.train()
    for step in range(steps):
        loss = model(**batch(step)).loss
        loss.backward()
        controller.step(optimizer)
        optimizer.zero_grad()
    model.eval()
    return controller


@torch.no_grad()
def outputs(model, seed: int = 1234) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, last hidden state) on random inputs, eval mode."""
    model.eval()
    inputs = batch(seed, size=4, length=10)
    out = model(input_ids=inputs["input_ids"], output_hidden_states=True)
    return out.logits.float(), out.hidden_states[-1].float()


def assert_close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    """Equal up to float32 rounding: TOL relative to the values' magnitude (absolute below 1)."""
    diff = (a - b).abs().max().item()
    bound = TOL * max(1.0, b.abs().max().item())
    assert diff <= bound, f"{what}: max abs diff {diff:.3e} > {bound:.3e}"


def zero_some(model) -> dict[str, int]:
    """Force rank 0 on one module and drop single components elsewhere; return the expected ranks. Plain LoRA
    math (LoRA, PRILoRA) leaves lam and the mask out of the forward, so its ranks stay as trained."""
    layers = adapter_layers(model)
    if all(layer.gated for layer in layers):
        with torch.no_grad():
            layers[0].active.zero_()  # rank 0 through the mask
            layers[1].lora_lam.zero_()  # rank 0 through the gate
            layers[2].active[0] = 0  # one component fewer
            layers[3].lora_lam[1] = 0
            for layer in layers[:3]:
                if layer.lam_zero_where_off:  # such a method (IncreLoRA) keeps lam at 0 where it is off
                    layer.lora_lam.mul_(layer.active)
    return {layer.site: int((layer.lora_lam * layer.active).ne(0).sum()) for layer in layers}


def adapter_effect(model) -> float:
    """How much the adapters move the outputs (the test must be able to tell a missing adapter)."""
    logits, hidden = outputs(model)
    layers = adapter_layers(model)
    scales = [layer.scale.clone() for layer in layers]
    for layer in layers:
        layer.scale.zero_()
    try:
        base_logits, base_hidden = outputs(model)
    finally:
        for layer, scale in zip(layers, scales):
            layer.scale.copy_(scale)
    return max((logits - base_logits).abs().max().item(), (hidden - base_hidden).abs().max().item())


def load_with_peft(base_cls, base_dir: Path, adapter_dir: Path):
    base = base_cls.from_pretrained(str(base_dir))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(base, str(adapter_dir)).eval()


def manual_scale_one_merge(base_cls, base_dir: Path, adapter_dir: Path):
    """What a loader with one global scale lora_alpha / r does (vLLM): W += (alpha / r) B A, heads copied."""
    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    scaling = config["lora_alpha"] / config["r"]
    tensors = load_file(str(adapter_dir / ADAPTER_WEIGHTS))
    model = base_cls.from_pretrained(str(base_dir)).eval()
    with torch.no_grad():
        for name in config["target_modules"]:
            module = model.get_submodule(name)
            A = tensors[f"base_model.model.{name}.lora_A.weight"]
            B = tensors[f"base_model.model.{name}.lora_B.weight"]
            delta = scaling * (B @ A)
            module.weight += delta.t() if config["fan_in_fan_out"] else delta
        for head in config["modules_to_save"] or []:
            prefix = f"base_model.model.{head}."
            state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            model.get_submodule(head).load_state_dict(state)
    return model


# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method_name", sorted(METHOD_OPTIONS))
def test_peft_export_reproduces_every_method(method_name, tmp_path):
    model = tiny_bert()
    model.save_pretrained(tmp_path / "base")
    method = adapt(model, method_name, total_steps=STEPS, **METHOD_OPTIONS[method_name])
    train(model, method)
    expected_ranks = zero_some(model)
    assert adapter_effect(model) > 1e-3, "adapters barely change the outputs: the comparison would be blind"
    logits, hidden = outputs(model)

    summary = export_peft(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    tensors = load_file(str(tmp_path / "adapter" / ADAPTER_WEIGHTS))

    # ranks: per module, zero-gate components dropped, rank-0 modules omitted everywhere
    kept = {site: r for site, r in expected_ranks.items() if r > 0}
    omitted = sorted(site for site, r in expected_ranks.items() if r == 0)
    assert summary["ranks"] == kept and sorted(summary["omitted"]) == omitted
    assert config["rank_pattern"] == kept and config["alpha_pattern"] == config["rank_pattern"]
    assert config["r"] == config["lora_alpha"] == max(kept.values())
    assert sorted(config["target_modules"]) == sorted(kept)
    assert not any(site in key for key in tensors for site in omitted)
    for site, r in kept.items():
        assert tensors[f"base_model.model.{site}.lora_A.weight"].shape[0] == r
        assert tensors[f"base_model.model.{site}.lora_B.weight"].shape[1] == r
    assert config["modules_to_save"] == ["classifier"]
    assert set(k for k in tensors if "classifier" in k) == {"base_model.model.classifier.weight",
                                                          "base_model.model.classifier.bias"}
    assert config["task_type"] == "SEQ_CLS" and config["fan_in_fan_out"] is False
    if method_name in ("adalora", "sora", "increlora", "prilora"):
        assert len(set(kept.values())) > 1, f"{method_name}: ranks should differ per module after training"

    # PEFT's loader is the reference
    loaded = load_with_peft(BertForSequenceClassification, tmp_path / "base", tmp_path / "adapter")
    peft_layers = {name.removeprefix("base_model.model."): m for name, m in loaded.named_modules()
                   if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})}
    assert sorted(peft_layers) == sorted(kept), "PEFT wrapped other modules than the exported ones"
    for site, layer in peft_layers.items():
        assert layer.r["default"] == kept[site] and layer.scaling["default"] == 1.0
    peft_logits, peft_hidden = outputs(loaded)
    assert_close(peft_logits, logits, f"{method_name} logits via PEFT")
    assert_close(peft_hidden, hidden, f"{method_name} hidden states via PEFT")

    # a loader with one global scale (vLLM style) computes the same
    manual_logits, _ = outputs(manual_scale_one_merge(BertForSequenceClassification, tmp_path / "base",
                                                      tmp_path / "adapter"))
    assert_close(manual_logits, logits, f"{method_name} logits with global alpha / r")


def test_gpt2_conv1d_peft_and_merged(tmp_path):
    model = tiny_gpt2()
    model.save_pretrained(tmp_path / "base")
    method = adapt(model, "adalora", total_steps=STEPS, **METHOD_OPTIONS["adalora"])
    train(model, method)
    adapter_layers(model)[0].active.zero_()
    assert adapter_effect(model) > 1e-3
    logits, hidden = outputs(model)

    summary = export_peft(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    assert config["fan_in_fan_out"] is True
    assert config["modules_to_save"] == ["score"]
    assert "transformer.h.0.attn.c_attn" in summary["omitted"]
    assert config["rank_pattern"] == config["alpha_pattern"] == summary["ranks"]
    tensors = load_file(str(tmp_path / "adapter" / ADAPTER_WEIGHTS))
    A = tensors["base_model.model.transformer.h.1.attn.c_attn.lora_A.weight"]
    B = tensors["base_model.model.transformer.h.1.attn.c_attn.lora_B.weight"]
    assert A.shape[1] == 32 and B.shape[0] == 96  # A (r x d_in), B (d_out x r) also for Conv1D

    loaded = load_with_peft(GPT2ForSequenceClassification, tmp_path / "base", tmp_path / "adapter")
    peft_logits, peft_hidden = outputs(loaded)
    assert_close(peft_logits, logits, "GPT-2 logits via PEFT")
    assert_close(peft_hidden, hidden, "GPT-2 hidden states via PEFT")
    manual_logits, _ = outputs(manual_scale_one_merge(GPT2ForSequenceClassification, tmp_path / "base",
                                                      tmp_path / "adapter"))
    assert_close(manual_logits, logits, "GPT-2 logits with global alpha / r")

    export_merged(model, tmp_path / "merged")
    merged = GPT2ForSequenceClassification.from_pretrained(str(tmp_path / "merged"))
    assert not adapter_layers(merged)
    merged_logits, merged_hidden = outputs(merged)
    assert_close(merged_logits, logits, "GPT-2 merged logits")
    assert_close(merged_hidden, hidden, "GPT-2 merged hidden states")


def test_merged_export_leaves_live_model_alone(tmp_path):
    model = tiny_bert()
    method = adapt(model, "sora", total_steps=STEPS, **METHOD_OPTIONS["sora"])
    train(model, method, steps=8)
    assert adapter_effect(model) > 1e-3
    logits, hidden = outputs(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    export_merged(model, tmp_path / "merged")
    merged = BertForSequenceClassification.from_pretrained(str(tmp_path / "merged"))
    assert not any("lora" in k or k.endswith(".active") for k in merged.state_dict())
    merged_logits, merged_hidden = outputs(merged)
    assert_close(merged_logits, logits, "merged logits")
    assert_close(merged_hidden, hidden, "merged hidden states")

    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), "export_merged changed the live model"
    assert all(not layer.merged for layer in adapter_layers(model))
    assert len(adapter_layers(model)) == 12
    assert_close(outputs(model)[0], logits, "live model after merged export")


def test_export_refuses_degenerate_models(tmp_path):
    model = tiny_bert()
    adapt(model, "lora", total_steps=STEPS, r=2)
    for layer in adapter_layers(model):
        layer.active.zero_()
    with pytest.raises(ValueError, match="rank 0"):
        export_peft(model, tmp_path / "none")

    model = tiny_bert()
    adapt(model, "lora", total_steps=STEPS, r=2)
    adapter_layers(model)[0].merge()
    with pytest.raises(ValueError, match="merged"):
        export_peft(model, tmp_path / "merged")


# ---------------------------------------------------------------------------------------------------
# Run directories


def make_base_dir(path: Path) -> Path:
    tiny_bert().save_pretrained(path)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(VOCAB - 5)]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(str(path / "vocab.txt")).save_pretrained(path)
    return path


def make_run(tmp_path: Path, method: str, **model_options) -> tuple[Path, torch.nn.Module]:
    """A run directory as the training loop writes it, from a model built the way export_run rebuilds it."""
    from scale_rank.model import build_adapted_model

    base = make_base_dir(tmp_path / "base")
    cfg = config_from_dict({"method": {"name": method, **METHOD_OPTIONS[method]},
                            "model": {"name_or_path": str(base), **model_options},
                            "train": {"total_steps": STEPS}})
    model, _, strategy = build_adapted_model(cfg, 2)
    train(model, strategy, steps=10)
    run = tmp_path / "run"
    run.mkdir()
    (run / "run_config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    save_trainable(model, run / "final")
    (run / "final" / "meta.json").write_text(json.dumps({"num_labels": 2, "base_model": str(base)}))
    return run, model


def test_export_run_round_trip(tmp_path):
    run, model = make_run(tmp_path, "increlora")
    assert adapter_effect(model) > 1e-3
    logits, hidden = outputs(model)
    saved = load_file(str(run / "final" / "trainable.safetensors"))
    assert "classifier.weight" in saved and "bert.encoder.layer.0.attention.self.query.active" in saved
    assert "bert.encoder.layer.0.attention.self.query.scale" in saved

    summary = export_run(run, tmp_path / "adapter")
    assert summary["ranks"] == {layer.site: layer.rank() for layer in adapter_layers(model) if layer.rank()}
    config = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    assert config["base_model_name_or_path"] == str(tmp_path / "base")
    loaded = load_with_peft(BertForSequenceClassification, tmp_path / "base", tmp_path / "adapter")
    peft_logits, peft_hidden = outputs(loaded)
    assert_close(peft_logits, logits, "export_run logits via PEFT")
    assert_close(peft_hidden, hidden, "export_run hidden states via PEFT")

    export_run(run, tmp_path / "merged", merge=True)
    assert (tmp_path / "merged" / "tokenizer_config.json").is_file()
    merged_logits, _ = outputs(BertForSequenceClassification.from_pretrained(str(tmp_path / "merged")))
    assert_close(merged_logits, logits, "export_run merged logits")


def test_export_run_rejects_incomplete_or_foreign_files(tmp_path):
    run, _ = make_run(tmp_path, "lora")
    path = run / "final" / "trainable.safetensors"
    state = load_file(str(path))

    incomplete = {k: v for k, v in state.items() if k != "bert.encoder.layer.1.output.dense.scale"}
    save_file(incomplete, str(path))
    with pytest.raises(ValueError, match="lacks"):
        export_run(run, tmp_path / "out1")

    save_file({**state, "bert.encoder.layer.9.output.dense.lora_A": torch.zeros(2, 64)}, str(path))
    with pytest.raises(ValueError, match="does not have"):
        export_run(run, tmp_path / "out2")


def test_export_run_on_random_init_base(tmp_path):
    """A random-init base is rebuilt from the run's seed: both exports reproduce the trained model."""
    run, model = make_run(tmp_path, "adalora", random_init=True)
    logits, _ = outputs(model)
    export_run(run, tmp_path / "adapter")
    export_peft(model, tmp_path / "live")
    from_run = load_file(str(tmp_path / "adapter" / ADAPTER_WEIGHTS))
    from_live = load_file(str(tmp_path / "live" / ADAPTER_WEIGHTS))
    assert from_run.keys() == from_live.keys()
    assert all(torch.equal(from_run[k], from_live[k]) for k in from_run)
    export_run(run, tmp_path / "merged", merge=True)
    merged_logits, _ = outputs(BertForSequenceClassification.from_pretrained(str(tmp_path / "merged")))
    assert_close(merged_logits, logits, "merged export of a random-init run")
