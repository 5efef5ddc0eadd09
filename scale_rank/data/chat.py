"""Instruction / chat data for causal-LM fine-tuning: loading, conversation rendering, response-only labels,
optional packing.

Sources (`data.dataset`): a local .json / .jsonl / .parquet file, a directory holding `train.<ext>` (and
optionally `validation|eval|dev|test.<ext>`), or a hub dataset name; all go through `datasets.load_dataset`,
so the code after loading is the same. `data.eval_dataset` names a separate evaluation source; without one,
the hub's validation/test split or `data.eval_size` held-out records are used.

Record formats (checked on every record, errors name the record):
* `messages`-style: a list of {"role", "content"} (or ShareGPT's {"from", "value"}) under `data.messages_field`;
* instruction-style: `data.prompt_field` (+ optional `data.input_field`) and `data.response_field` columns
  (Alpaca's instruction / input / output by default).

Rendering uses the tokenizer's chat template when it has one, else a plain "role: content" layout ending
each assistant turn with the EOS token. Labels are the token ids of the assistant turns and -100 elsewhere
(loss on responses only). Long conversations are truncated to `data.max_length`; ones left without any
response token are dropped (counted in the log). With `data.packing`, conversations are concatenated into
rows of exactly max_length tokens (documents in a row attend to earlier ones, as simple packing does).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ConfigError, DataConfig

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
EVAL_SPLITS = ("validation", "eval", "dev", "test")
SOURCE_KEY = "__scale_rank_source__"  # where a record came from (file and line), for error messages
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}


@dataclass(frozen=True)
class Rendered:
    """One conversation as text plus the character spans whose tokens are trained on."""

    text: str
    spans: tuple[tuple[int, int], ...]


# ----------------------------------------------------------------------------------------------- loading

def _load_source(source: str) -> dict[str, list[dict]]:
    """{split name: records} of a local file, a local directory or a hub dataset."""
    import datasets
    path = Path(source)
    if path.is_file():
        return {"train": _load_file(path)}
    if path.is_dir():
        files = {p.stem: p for p in path.iterdir() if p.suffix in FILE_BUILDERS}
        if "train" not in files:
            raise ConfigError(f"data.dataset directory {path} has no train.json / train.jsonl / train.parquet "
                              f"(found: {sorted(p.name for p in path.iterdir())})")
        return {name: _load_file(file) for name, file in files.items()}
    if path.suffix in FILE_BUILDERS or source.startswith((".", "/")):
        raise ConfigError(f"data.dataset {source} does not exist")
    try:
        loaded = datasets.load_dataset(source)
    except Exception as error:  # network, unknown name, auth: one clear line
        raise ConfigError(f"cannot load dataset {source!r} from the hub ({type(error).__name__}: {error}); "
                          "pass a local .json/.jsonl/.parquet file or directory as data.dataset") from error
    return {name: [{**record, SOURCE_KEY: f"{source} [{name}] record {i + 1}"} for i, record in enumerate(split)]
            for name, split in loaded.items()}


def _load_file(path: Path) -> list[dict]:
    import datasets
    if path.suffix not in FILE_BUILDERS:
        raise ConfigError(f"{path}: unsupported file type; use one of {sorted(FILE_BUILDERS)}")
    try:
        table = datasets.load_dataset(FILE_BUILDERS[path.suffix], data_files=str(path), split="train")
    except Exception as error:
        raise ConfigError(f"cannot read {path} as {path.suffix[1:]} ({type(error).__name__}: {error})") from error
    where = "line" if path.suffix == ".jsonl" else "record"
    return [{**record, SOURCE_KEY: f"{path} {where} {i + 1}"} for i, record in enumerate(table)]


def load_splits(cfg: DataConfig, seed: int) -> tuple[list[dict], list[dict]]:
    """(train records, eval records) as `cfg` describes."""
    if not cfg.dataset:
        raise ConfigError("data.task=chat needs data.dataset: a .json/.jsonl/.parquet file, a directory with "
                          "train.<ext>, or a hub dataset name")
    splits = _load_source(cfg.dataset)
    train = splits["train"]
    if cfg.eval_dataset:
        evals = _load_source(cfg.eval_dataset)["train"]
    elif (name := next((s for s in EVAL_SPLITS if s in splits), None)) is not None:
        evals = splits[name]
    else:
        held_out = min(cfg.eval_size, max(1, len(train) // 10))
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
        evals = [train[i] for i in order[:held_out]]
        train = [train[i] for i in order[held_out:]]
    if not train or not evals:
        raise ConfigError(f"data.dataset {cfg.dataset}: {len(train)} training and {len(evals)} evaluation "
                          "records; both must be non-empty")
    return train, evals


# --------------------------------------------------------------------------------------------- records

def _has(record: dict, key: str | None) -> bool:
    """`key` is a field of this record (files with mixed fields give every record every field, as None)."""
    return key is not None and record.get(key) is not None


def to_messages(record: dict, cfg: DataConfig, where: str) -> list[dict[str, str]]:
    """A record as a list of {"role", "content"} with at least one assistant turn."""
    where = record.get(SOURCE_KEY, where)
    if _has(record, cfg.messages_field):
        turns = record[cfg.messages_field]
        if not isinstance(turns, list) or not turns:
            raise ConfigError(f"{where}: {cfg.messages_field!r} must be a non-empty list of turns")
        messages = [_turn(turn, where) for turn in turns]
    elif _has(record, cfg.prompt_field) and _has(record, cfg.response_field):
        prompt = str(record[cfg.prompt_field])
        extra = record.get(cfg.input_field) if cfg.input_field else None
        if extra:
            prompt = f"{prompt}\n\n{extra}"
        messages = [{"role": "user", "content": prompt},
                    {"role": "assistant", "content": str(record[cfg.response_field])}]
    else:
        raise ConfigError(
            f"{where} has fields {sorted(k for k in record if k != SOURCE_KEY and record[k] is not None)}; expected a {cfg.messages_field!r} list of {{role, content}} "
            f"turns or {cfg.prompt_field!r} and {cfg.response_field!r} fields: set data.messages_field, or "
            "data.prompt_field / data.response_field (and data.input_field) to your column names")
    if not any(m["role"] == "assistant" for m in messages):
        raise ConfigError(f"{where}: no assistant turn, so there is nothing to train on")
    return messages


def _turn(turn, where: str) -> dict[str, str]:
    if isinstance(turn, dict) and "role" in turn and "content" in turn:
        role, content = turn["role"], turn["content"]
    elif isinstance(turn, dict) and "from" in turn and "value" in turn:
        role, content = SHAREGPT_ROLES.get(turn["from"], turn["from"]), turn["value"]
    else:
        raise ConfigError(f"{where}: turn {turn!r} needs 'role' and 'content' (or ShareGPT 'from' and 'value')")
    if role not in ("system", "user", "assistant"):
        raise ConfigError(f"{where}: unknown role {role!r}; expected system, user or assistant")
    return {"role": role, "content": str(content)}


# ----------------------------------------------------------------------------------- rendering, labels

def render(tokenizer, messages: list[dict[str, str]]) -> Rendered:
    """Text of a conversation and the character spans of its assistant turns."""
    if getattr(tokenizer, "chat_template", None):
        return _render_template(tokenizer, messages)
    eos = tokenizer.eos_token or ""
    text, spans = "", []
    for message in messages:
        text += f"{message['role']}: "
        if message["role"] == "assistant":
            start = len(text)
            text += message["content"] + eos
            spans.append((start, len(text)))
            text += "\n"
        else:
            text += message["content"] + "\n"
    return Rendered(text, tuple(spans))


def _render_template(tokenizer, messages: list[dict[str, str]]) -> Rendered:
    """Assistant spans found by rendering growing prefixes of the conversation with the chat template."""
    def apply(turns, generation_prompt=False) -> str:
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)

    text = apply(messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = apply(messages[:i], generation_prompt=True) if i else ""
        through = apply(messages[:i + 1])
        if not (through.startswith(before) and text.startswith(through)):
            raise ConfigError("the tokenizer's chat template renders a conversation differently from its "
                              "prefixes, so response tokens cannot be located; set the tokenizer's "
                              "chat_template to one that renders turns incrementally")
        spans.append((len(before), len(through)))
    return Rendered(text, tuple(spans))


def encode(tokenizer, rendered: Rendered, max_length: int) -> tuple[list[int], list[int]] | None:
    """(input_ids, labels) truncated to max_length; labels keep tokens overlapping an assistant span.

    None when truncation left no response token.
    """
    templated = bool(getattr(tokenizer, "chat_template", None))
    encoded = tokenizer(rendered.text, add_special_tokens=not templated, return_offsets_mapping=True,
                        truncation=True, max_length=max_length)
    ids = encoded["input_ids"]
    labels = [token if any(start < end_span and end > start_span and end > start
                           for start_span, end_span in rendered.spans) else IGNORE_INDEX
              for token, (start, end) in zip(ids, encoded["offset_mapping"])]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return ids, labels


def tokenize_records(tokenizer, records: list[dict], cfg: DataConfig, split: str) -> dict[str, torch.Tensor]:
    """Tokenised rows {input_ids, attention_mask, labels} of one split (padded, or packed if cfg.packing)."""
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError("chat data needs a fast tokenizer (offset mapping) to locate response tokens")
    examples, dropped = [], 0
    for i, record in enumerate(records):
        messages = to_messages(record, cfg, f"{split} record {i}")
        encoded = encode(tokenizer, render(tokenizer, messages), cfg.max_length)
        if encoded is None:
            dropped += 1
        else:
            examples.append(encoded)
    if dropped:
        log.warning("%s: %d of %d conversations dropped: no response token within data.max_length=%d",
                    split, dropped, len(records), cfg.max_length)
    if not examples:
        raise ConfigError(f"{split}: no conversation keeps a response token within data.max_length="
                          f"{cfg.max_length}; raise data.max_length")
    if cfg.packing:
        examples = pack(examples, cfg.max_length)
    return pad(examples, cfg.max_length, _pad_id(tokenizer))


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pad) if pad is not None else 0


def pack(examples: list[tuple[list[int], list[int]]], length: int) -> list[tuple[list[int], list[int]]]:
    """Concatenate examples in order and cut the stream into rows of `length` tokens (the last may be short)."""
    ids = [token for example, _ in examples for token in example]
    labels = [label for _, example_labels in examples for label in example_labels]
    rows = [(ids[i:i + length], labels[i:i + length]) for i in range(0, len(ids), length)]
    return [row for row in rows if any(label != IGNORE_INDEX for label in row[1])]


def pad(examples: list[tuple[list[int], list[int]]], length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors: padding has attention 0 and label -100."""
    n = len(examples)
    input_ids = torch.full((n, length), pad_id, dtype=torch.long)
    labels = torch.full((n, length), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((n, length), dtype=torch.long)
    for row, (ids, example_labels) in enumerate(examples):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        labels[row, :len(ids)] = torch.tensor(example_labels)
        attention[row, :len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def prepare_tokenizer(tokenizer) -> None:
    """Causal-LM tokenizers often lack a pad token: pad with EOS (padding is masked out anyway)."""
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
