"""Decoder fine-tuning: chat data (formats, sources, response-only labels, packing), gradient checkpointing
with every method, training + PEFT export for the Llama, Mistral, Qwen2 and GPT-2 families, bad input."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from scale_rank.config import ConfigError, DataConfig, load_config
from scale_rank.data import chat
from scale_rank.data.tasks import build_task, select
from scale_rank.inject import adapter_layers
from scale_rank.model import build_adapted_model
from scale_rank.train import train
from tests.support.tiny import FAST_METHODS, tiny_decoder_dir

CONVERSATION = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"},
                {"role": "assistant", "content": "hi friend"}, {"role": "user", "content": "add two and two"},
                {"role": "assistant", "content": "four"}]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return tiny_decoder_dir(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def tokenizer(llama_dir):
    return AutoTokenizer.from_pretrained(llama_dir)


def trained_text(tokenizer, ids: list[int], labels: list[int]) -> str:
    return tokenizer.decode([t for t, label in zip(ids, labels) if label != chat.IGNORE_INDEX])


# ------------------------------------------------------------------------------------------------ data

def test_labels_cover_exactly_the_assistant_turns_with_a_chat_template(tokenizer):
    ids, labels = chat.encode(tokenizer, chat.render(tokenizer, CONVERSATION), max_length=128)
    assert tokenizer.decode(ids).startswith("< | system | >")  # the template rendered the whole conversation
    assert trained_text(tokenizer, ids, labels) == "hi friend [SEP] four [SEP]"


def test_labels_without_a_chat_template_use_the_plain_layout(llama_dir):
    plain = AutoTokenizer.from_pretrained(llama_dir)
    plain.chat_template = None
    rendered = chat.render(plain, CONVERSATION)
    assert rendered.text.startswith("system: be brief\nuser: hello there\nassistant: hi friend")
    ids, labels = chat.encode(plain, rendered, max_length=128)
    assert trained_text(plain, ids, labels) == "hi friend four"


def test_record_formats_give_the_same_conversation():
    cfg = DataConfig(task="chat")
    alpaca = chat.to_messages({"instruction": "add", "input": "2 and 2", "output": "4"}, cfg, "r")
    assert alpaca == [{"role": "user", "content": "add\n\n2 and 2"}, {"role": "assistant", "content": "4"}]
    sharegpt = chat.to_messages({"messages": [{"from": "human", "value": "add\n\n2 and 2"},
                                              {"from": "gpt", "value": "4"}]}, cfg, "r")
    assert sharegpt == alpaca
    custom = DataConfig(task="chat", prompt_field="q", response_field="a", input_field=None)
    assert chat.to_messages({"q": "add\n\n2 and 2", "a": "4"}, custom, "r") == alpaca


@pytest.mark.parametrize("record,message", [
    ({"text": "hi"}, "expected a 'messages' list"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    ({"messages": [{"speaker": "a", "text": "hi"}]}, "needs 'role' and 'content'"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "unknown role 'robot'"),
    ({"messages": []}, "non-empty list"),
])
def test_malformed_records_name_the_record_and_the_fix(record, message):
    with pytest.raises(ConfigError, match=message) as error:
        chat.to_messages(record, DataConfig(task="chat"), "train record 7")
    assert "train record 7" in str(error.value)


def _write_records(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif path.suffix == ".json":
        path.write_text(json.dumps(records))
    else:
        import pandas as pd
        pd.DataFrame(records).to_parquet(path)
    return path


RECORDS = [{"instruction": f"say {w}", "input": "", "output": w} for w in
           ["apple", "river", "stone", "cloud", "tiger", "piano", "lemon", "forest", "candle", "mirror"] * 2]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_local_files_load_with_a_held_out_split(suffix, tmp_path, tokenizer):
    path = _write_records(tmp_path / f"data{suffix}", RECORDS)
    task = build_task(DataConfig(task="chat", dataset=str(path), max_length=32, eval_size=4), tokenizer, 0)
    assert (task.kind, task.metric_name, task.greater_is_better) == ("causal_lm", "eval_loss", False)
    assert task.train_size + len(task.eval["labels"]) == 20 and len(task.eval["labels"]) == 2  # <= 10%
    row = task.train["input_ids"][0]
    kept = task.train["labels"][0] != chat.IGNORE_INDEX
    assert tokenizer.decode(row[kept]) in {f"{r['output']} [SEP]" for r in RECORDS}


def test_directory_with_a_validation_file_uses_it(tmp_path, tokenizer):
    _write_records(tmp_path / "ds" / "train.jsonl", RECORDS)
    _write_records(tmp_path / "ds" / "validation.jsonl", RECORDS[:3])
    task = build_task(DataConfig(task="chat", dataset=str(tmp_path / "ds"), max_length=32), tokenizer, 0)
    assert task.train_size == 20 and len(task.eval["labels"]) == 3


@pytest.mark.parametrize("dataset,message", [
    (None, "needs data.dataset"),
    ("/nonexistent/data.jsonl", "does not exist"),
    ("EMPTY_DIR", "has no train.json"),
    ("BAD_SUFFIX", "unsupported file type"),
])
def test_bad_sources_say_what_to_pass(dataset, message, tmp_path, tokenizer):
    if dataset == "EMPTY_DIR":
        (tmp_path / "empty").mkdir()
        dataset = str(tmp_path / "empty")
    elif dataset == "BAD_SUFFIX":
        dataset = str(tmp_path / "data.csv")
        Path(dataset).write_text("a,b\n")
    with pytest.raises(ConfigError, match=message):
        build_task(DataConfig(task="chat", dataset=dataset), tokenizer, 0)


def test_truncation_drops_conversations_without_a_response_token(tokenizer):
    long_prompt = {"instruction": "word " * 100, "output": "yes"}
    cfg = DataConfig(task="chat", max_length=16)
    rows = chat.tokenize_records(tokenizer, [long_prompt, RECORDS[0]], cfg, "train")
    assert rows["input_ids"].shape == (1, 16)
    with pytest.raises(ConfigError, match="raise data.max_length"):
        chat.tokenize_records(tokenizer, [long_prompt], cfg, "train")


def test_packing_fills_rows_and_keeps_every_response_token(tokenizer):
    unpacked = chat.tokenize_records(tokenizer, RECORDS, DataConfig(task="chat", max_length=32), "train")
    packed = chat.tokenize_records(tokenizer, RECORDS, DataConfig(task="chat", max_length=32, packing=True),
                                   "train")
    assert len(packed["labels"]) < len(unpacked["labels"])
    assert bool(packed["attention_mask"][:-1].all())  # every row but the last is full
    trained = lambda rows: rows["input_ids"][rows["labels"] != chat.IGNORE_INDEX].tolist()  # noqa: E731
    assert trained(packed) == trained(unpacked)


def test_select_trims_token_labels_with_the_inputs(tokenizer):
    rows = chat.tokenize_records(tokenizer, RECORDS[:4], DataConfig(task="chat", max_length=32), "train")
    batch = select(rows, torch.tensor([0, 2]), 9)
    assert {k: tuple(v.shape) for k, v in batch.items()} == {k: (2, 9) for k in rows}


# ------------------------------------------------------------------------------ gradient checkpointing

def _config(model_dir: Path, method: str, out: Path, *extra: str):
    items = [f"method.name={method}", f"model.name_or_path={model_dir}", "model.random_init=true",
             "data.task=synthetic_chat", "data.train_size=64", "data.eval_size=16", "data.max_length=48",
             f"train.output_dir={out}", "train.total_steps=8", "train.batch_size=8", "train.lr=0.005",
             "train.warmup_steps=0"]
    items += [f"method.{k}={v}" for k, v in FAST_METHODS[method].items()]
    return load_config(None, items + list(extra))


def _one_backward(cfg, batch):
    model, _, method = build_adapted_model(cfg, 0)
    model.train()
    from scale_rank.controller import RankController
    controller = RankController(model, method)  # installs the regularizer / statistics hooks
    model(**batch).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    stats = [s.clone() for s in method.inputs.sums] if method.name == "prilora" else []
    controller.close()
    return grads, stats


@pytest.mark.parametrize("method,mode", [(m, "true") for m in sorted(FAST_METHODS)] + [("adalora", "reentrant")])
def test_gradient_checkpointing_gives_the_same_gradients_and_statistics(method, mode, llama_dir, tokenizer,
                                                                        tmp_path):
    cfg = _config(llama_dir, method, tmp_path)
    task = build_task(cfg.data, tokenizer, 0)
    batch = select(task.train, torch.arange(4), 48)
    plain_grads, plain_stats = _one_backward(cfg, batch)
    cfg.train.gradient_checkpointing = True if mode == "true" else mode
    ckpt_grads, ckpt_stats = _one_backward(cfg, batch)
    assert plain_grads.keys() == ckpt_grads.keys() and plain_grads
    for name in plain_grads:
        torch.testing.assert_close(ckpt_grads[name], plain_grads[name], rtol=1e-5, atol=1e-7, msg=name)
    for plain, ckpt in zip(plain_stats, ckpt_stats):  # PRILoRA's input norms: counted once, not twice
        torch.testing.assert_close(ckpt, plain)
    if method == "prilora":
        assert all(bool(s.sum() > 0) for s in plain_stats)


def test_reentrant_checkpointing_is_refused_for_prilora(llama_dir, tmp_path):
    with pytest.raises(ConfigError, match="non-reentrant"):
        _config(llama_dir, "prilora", tmp_path, "train.gradient_checkpointing=reentrant").validate()


# ------------------------------------------------------------------------- training, export, families

def rebuilt_decoder(model_dir: Path, seed: int = 0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gpt2"])
def test_each_family_trains_and_exports_a_peft_causal_lm_adapter(family, tmp_path):
    from peft import PeftModel
    torch.set_num_threads(1)
    model_dir = tiny_decoder_dir(tmp_path / "model", family)
    cfg = _config(model_dir, "adalora", tmp_path / "run", "train.gradient_checkpointing=true",
                  "train.eval_every=4", "data.max_length=96")  # transformers gives qwen2 a char-level tokenizer here
    result = train(cfg, progress=False)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(metrics["final"]) == {"eval_loss", "perplexity"}
    assert metrics["best"]["metrics"]["eval_loss"] <= metrics["final"]["eval_loss"]  # lower is better
    adapter_config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["task_type"] == "CAUSAL_LM"
    peft_model = PeftModel.from_pretrained(rebuilt_decoder(model_dir), str(tmp_path / "run" / "adapter")).eval()
    trained = result.engine.module.eval()
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (peft_model(input_ids=ids).logits - trained(input_ids=ids).logits).abs().max()
    assert diff <= 1e-4


def test_response_loss_falls(llama_dir, tmp_path):
    cfg = _config(llama_dir, "lora", tmp_path / "run", "train.total_steps=40", "train.lr=0.02",
                  "data.train_size=320")
    losses = train(cfg, progress=False).losses
    assert sum(losses[-10:]) / 10 < sum(losses[:3]) / 3 - 0.2  # measured: 10.31 -> 9.94


def test_evaluation_loss_is_the_token_average_over_the_split(llama_dir, tmp_path):
    """The reported eval loss equals a dense recomputation: summed response-token losses / their count."""
    result = train(_config(llama_dir, "lora", tmp_path / "run"), progress=False)
    cfg = _config(llama_dir, "lora", tmp_path / "x")
    task = build_task(cfg.data, AutoTokenizer.from_pretrained(llama_dir), 0)
    model = result.engine.module.eval()
    with torch.no_grad():
        logits = model(input_ids=task.eval["input_ids"], attention_mask=task.eval["attention_mask"]).logits
    labels = task.eval["labels"][:, 1:]
    losses = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(),
                                               reduction="sum", ignore_index=chat.IGNORE_INDEX)
    expected = float(losses / (labels != chat.IGNORE_INDEX).sum())
    assert result.metrics["eval_loss"] == pytest.approx(expected, rel=1e-4)


def test_max_length_beyond_the_context_is_refused(llama_dir, tmp_path):
    cfg = _config(llama_dir, "lora", tmp_path / "run", "data.max_length=4096")
    with pytest.raises(ConfigError, match=r"exceeds the context .*\(128 positions\)"):
        train(cfg, progress=False)
    assert not (tmp_path / "run").exists()


def test_model_type_without_default_targets_asks_for_targets(tmp_path):
    model_dir = tmp_path / "opt"
    tokenizer_dir = tiny_decoder_dir(tmp_path / "tok")
    AutoConfig.for_model("opt", hidden_size=32, num_hidden_layers=1, ffn_dim=64, num_attention_heads=2,
                         word_embed_proj_dim=32, vocab_size=30522).save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(model_dir)
    cfg = _config(model_dir, "lora", tmp_path / "run")
    with pytest.raises(ConfigError, match="set model.targets"):
        train(cfg, progress=False)
    cfg = _config(model_dir, "lora", tmp_path / "run2", "model.targets=[q_proj, v_proj]")
    assert len(train(cfg, progress=False).ranks) == 2


def test_hub_dataset_name_loads_through_datasets(monkeypatch, tokenizer):
    """A name that is not a local path goes to datasets.load_dataset (simulated hub); its test split evaluates."""
    import datasets
    calls = []

    def load_dataset(name, *args, **kwargs):
        if args or kwargs:  # local json/parquet files use the real loader
            return real(name, *args, **kwargs)
        calls.append(name)
        return datasets.DatasetDict({"train": datasets.Dataset.from_list(RECORDS),
                                     "test": datasets.Dataset.from_list(RECORDS[:5])})
    real = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    task = build_task(DataConfig(task="chat", dataset="tatsu-lab/alpaca", max_length=32), tokenizer, 0)
    assert calls == ["tatsu-lab/alpaca"] and task.train_size == 20 and len(task.eval["labels"]) == 5
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: (_ for _ in ()).throw(ConnectionError("offline")))
    with pytest.raises(ConfigError, match="pass a local .json/.jsonl/.parquet file"):
        build_task(DataConfig(task="chat", dataset="tatsu-lab/alpaca"), tokenizer, 0)


def test_bf16_training_keeps_float32_adapters_and_optimizer_state(llama_dir, tmp_path):
    """Every engine stores the frozen base in bf16; the torch engines compute in bf16 (autocast) and keep
    adapters and AdamW moments float32 (DeepSpeed keeps float32 masters)."""
    import torch as t

    from scale_rank.model import storage_dtype
    assert storage_dtype("bf16") == t.bfloat16 and storage_dtype("fp32") == t.float32
    result = train(_config(llama_dir, "adalora", tmp_path / "run", "train.precision=bf16"), progress=False)
    layers = adapter_layers(result.engine.module)
    assert all(l.lora_A.dtype == l.lora_B.dtype == t.float32 for l in layers)
    states = [s for s in result.engine.optimizer.state.values() if "exp_avg" in s]
    assert states and all(s["exp_avg"].dtype == t.float32 for s in states)
    assert all(p.dtype == (t.float32 if "lora_" in n else t.bfloat16)
               for n, p in result.engine.module.named_parameters())


def test_4bit_base_trains_and_evaluates_without_touching_its_weights(llama_dir, tmp_path):
    """nf4 base (QLoRA-style): lm_head stays unquantized, evaluation between steps leaves the packed 4-bit
    weights as they were (bitsandbytes' CPU inference repacking is off)."""
    result = train(_config(llama_dir, "adalora", tmp_path / "run", "model.quantization=nf4",
                           "train.eval_every=4"), progress=False)
    model = result.engine.module
    assert type(model.lm_head).__name__ == "Linear"
    quantized = [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
    assert len(quantized) == 14  # 7 projections x 2 layers
    assert all(not getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in quantized)
    assert set(result.metrics) == {"eval_loss", "perplexity"}
