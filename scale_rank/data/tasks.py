"""Tasks as tokenized tensors plus their metric (classification, or causal-LM chat data), and the
deterministic batch order."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from ..config import ConfigError, DataConfig
from . import chat, glue, synthetic, synthetic_chat

CHAT_TASKS = ("chat", "synthetic_chat")


@dataclass
class TaskData:
    name: str
    train: dict[str, torch.Tensor]
    eval: dict[str, torch.Tensor]
    num_labels: int
    metric_name: str
    metric: Callable[[torch.Tensor, torch.Tensor], dict[str, float]]
    regression: bool = False  # num_labels 1, float labels; predictions are the squeezed logits, not argmax
    kind: str = "classification"  # or "causal_lm": token labels (-100 = ignored), metric from the eval loss
    greater_is_better: bool = True  # direction of metric_name for best-checkpoint selection

    @property
    def train_size(self) -> int:
        return len(self.train["labels"])


def accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    return {"accuracy": float((predictions == labels).float().mean())}


def tokenize(tokenizer, texts: list[str], labels: list[int], max_length: int) -> dict[str, torch.Tensor]:
    encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length,
                        return_tensors="pt")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"],
            "labels": torch.tensor(labels, dtype=torch.long)}


def build_task(cfg: DataConfig, tokenizer, seed: int) -> TaskData:
    if cfg.task == "synthetic":
        train, dev = synthetic.splits(cfg.train_size, cfg.eval_size, seed)
        return TaskData(
            "synthetic",
            tokenize(tokenizer, [e.text for e in train], [e.label for e in train], cfg.max_length),
            tokenize(tokenizer, [e.text for e in dev], [e.label for e in dev], cfg.max_length),
            num_labels=2, metric_name="accuracy", metric=accuracy)
    if glue.is_glue_task(cfg.task):
        return build_glue_task(cfg, tokenizer)
    if cfg.task in CHAT_TASKS:
        return build_chat_task(cfg, tokenizer, seed)
    raise ConfigError(f"unknown task {cfg.task!r}; available: 'synthetic', the GLUE tasks "
                      f"{sorted(glue.TASKS)}, 'chat' (instruction data from data.dataset) and 'synthetic_chat'")


def task_kind(cfg: DataConfig) -> str:
    """"causal_lm" for instruction / chat data, else "classification" (decides the model head)."""
    return "causal_lm" if cfg.task in CHAT_TASKS else "classification"


def build_chat_task(cfg: DataConfig, tokenizer, seed: int) -> TaskData:
    """Causal-LM data: loss on response tokens; evaluation reports loss and perplexity (lower is better)."""
    if cfg.task == "synthetic_chat":
        train, evals = synthetic_chat.splits(cfg.train_size, cfg.eval_size, seed)
    else:
        train, evals = chat.load_splits(cfg, seed)
    chat.prepare_tokenizer(tokenizer)
    return TaskData(cfg.task, chat.tokenize_records(tokenizer, train, cfg, "train"),
                    chat.tokenize_records(tokenizer, evals, cfg, "eval"), num_labels=0,
                    metric_name="eval_loss", metric=perplexity, kind="causal_lm", greater_is_better=False)


def perplexity(loss_sum: torch.Tensor, tokens: torch.Tensor) -> dict[str, float]:
    """Token-averaged evaluation loss and its exponential, from summed token losses and token counts."""
    loss = float(loss_sum / tokens.clamp(min=1))
    return {"eval_loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def build_glue_task(cfg: DataConfig, tokenizer) -> TaskData:
    """A GLUE task from `cfg.data_dir` (glue_data layout) or, without one, the nyu-mll/glue hub dataset."""
    spec = glue.get_spec(cfg.task)
    train, evals = glue.load_local(spec, cfg.data_dir) if cfg.data_dir else glue.load_hub(spec)
    eval_examples = [example for split in evals for example in split]
    return TaskData(
        spec.name,
        glue.tokenize_examples(tokenizer, train, cfg.max_length, spec.regression),
        glue.tokenize_examples(tokenizer, eval_examples, cfg.max_length, spec.regression),
        num_labels=spec.num_labels, metric_name=spec.metric_name,
        metric=glue.make_metric(spec, [len(split) for split in evals]), regression=spec.regression)


def batch_indices(step: int, n_examples: int, global_batch: int, seed: int) -> torch.Tensor:
    """Example indices of optimizer step `step` (0-based): a fresh seeded permutation every epoch.

    A pure function of the step, so a resumed run sees exactly the batches it would have seen.
    """
    per_epoch = n_examples // global_batch
    if per_epoch == 0:
        raise ConfigError(f"train.batch_size ({global_batch}) exceeds the {n_examples} training examples")
    epoch, position = divmod(step, per_epoch)
    order = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return order[position * global_batch:(position + 1) * global_batch]


def padded_length(data: dict[str, torch.Tensor], indices: torch.Tensor) -> int:
    """The longest sequence among `indices`: batches are trimmed to it (the same on every rank)."""
    return int(data["attention_mask"][indices].sum(1).max())


def select(data: dict[str, torch.Tensor], indices: torch.Tensor, length: int,
           labels: bool = True) -> dict[str, torch.Tensor]:
    """Rows `indices` of a tokenised split, sequence columns (token labels too) trimmed to `length`."""
    return {k: (v[indices, :length] if v.dim() > 1 else v[indices])
            for k, v in data.items() if labels or k != "labels"}


def micro_batches(indices: torch.Tensor, grad_accum: int, rank: int, world_size: int) -> list[torch.Tensor]:
    """This rank's share of each of the `grad_accum` micro-batches of one global batch."""
    chunks = indices.chunk(grad_accum)
    return [chunk.chunk(world_size)[rank] for chunk in chunks]


def loss_normaliser(task: TaskData, indices: torch.Tensor, world_size: int, grad_accum: int) -> torch.Tensor | None:
    """Causal LM: the `num_items_in_batch` to pass with every micro-batch of global batch `indices`.

    A micro-batch's loss is then (its summed token losses) * world_size * grad_accum / (response tokens of
    the whole global batch); after the engines' mean over ranks and micro-batches, the gradient is that of
    the mean over all response tokens of the global batch, as in one process. None for classification
    (one label per example: the means already agree).
    """
    if task.kind != "causal_lm":
        return None
    tokens = int((task.train["labels"][indices, 1:] != -100).sum())
    return torch.tensor(max(tokens, 1) / (world_size * grad_accum))
