"""A tiny random BERT that the training pipeline can load like any model directory (config + tokenizer)."""
from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, BertConfig

from scale_rank.model import resolve_model_path


def tiny_model_dir(path: Path, layers: int = 2, hidden: int = 32) -> Path:
    """config.json of a 2-layer BERT (no dropout) plus the MiniLM tokenizer; load with model.random_init."""
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("minilm"))
    BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=hidden, num_hidden_layers=layers,
               num_attention_heads=2, intermediate_size=2 * hidden, max_position_embeddings=64,
               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# Method settings that make decisions happen within a dozen steps.
FAST_METHODS = {
    "lora": {"r": 4},
    "adalora": {"r_init": 6, "r_target": 3, "t_init": 2, "t_final": 3, "delta_t": 2},
    "sora": {"r_max": 6, "xi": 0.05, "init": "paper"},  # N(0, 1) gates: some reach 0 within a few steps
    "increlora": {"r_start": 1, "r_target": 3, "r_max": 6, "incre_rank": 1, "top_h": 3, "incre_interval": 2, "t_init": 2},
    "prilora": {"r_first": 2, "r_last": 6, "prune_interval": 3, "prune_ratio": 0.5},
}


def overrides(model_dir: Path, out_dir: Path, method: str, steps: int = 12, **train) -> list[str]:
    """`-o` overrides for a fast run of `method` on the tiny model and a small synthetic task."""
    items = [f"method.name={method}", f"model.name_or_path={model_dir}", "model.random_init=true",
             "data.train_size=256", "data.eval_size=64", "data.max_length=24",
             f"train.output_dir={out_dir}", f"train.total_steps={steps}", "train.batch_size=16",
             "train.lr=0.005", "train.warmup_steps=0"]
    items += [f"method.{k}={v}" for k, v in FAST_METHODS[method].items()]
    items += [f"train.{k}={v}" for k, v in train.items()]
    return items


CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}[SEP]\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def tiny_decoder_dir(path: Path, family: str = "llama", layers: int = 2, hidden: int = 64,
                     chat_template: bool = True) -> Path:
    """config.json of a tiny decoder (llama, mistral, qwen2 or gpt2) plus a fast tokenizer (MiniLM's
    WordPiece, with a chat template unless `chat_template` is False); load with model.random_init.

    hidden 64: bitsandbytes' 4-bit CPU kernels need inner dimensions of at least 64.
    """
    from transformers import AutoConfig
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("minilm"))
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    shape = {"vocab_size": tokenizer.vocab_size}
    if family == "gpt2":
        shape.update(n_embd=hidden, n_layer=layers, n_head=4, n_positions=128, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0)
    else:
        shape.update(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    AutoConfig.for_model(family, **shape).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
