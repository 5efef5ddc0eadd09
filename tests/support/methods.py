"""Helpers for the method tests: a tiny randomly initialised BERT, fixed data, a training loop, references.

Everything here is deterministic: the model comes from a config with a fixed seed (no download), the data
is a fixed list of batches, dropout is off. Two runs with the same arguments give bit-identical results.
"""
from __future__ import annotations

from typing import Callable

import torch
from transformers import BertConfig, BertForSequenceClassification

import scale_rank as sr
from scale_rank.inject import adapter_layers


VOCAB, HIDDEN, LAYERS, HEADS, INTERMEDIATE, LABELS = 100, 32, 2, 2, 64, 2
SEQ_LEN = 12


def tiny_bert(seed: int = 0, num_layers: int = LAYERS) -> BertForSequenceClassification:
    """BertForSequenceClassification: vocab 100, hidden 32, 2 layers, 2 heads, intermediate 64, 2 labels."""
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=num_layers,
                        num_attention_heads=HEADS, intermediate_size=INTERMEDIATE, num_labels=LABELS,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        max_position_embeddings=32)
    return BertForSequenceClassification(config)


def fixed_batches(n_batches: int = 4, batch_size: int = 8, seed: int = 123) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A small fixed dataset: label 1 when the first token (the pooled position) has an id below 50."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_batches):
        ids = torch.randint(1, VOCAB, (batch_size, SEQ_LEN), generator=gen)
        labels = (ids[:, 0] < 50).long()
        batches.append((ids, labels))
    return batches


def make_optimizer(model: torch.nn.Module, method, lr: float = 1e-2, weight_decay: float = 0.0,
                   kind: str = "adamw") -> torch.optim.Optimizer:
    """The method's adapter groups plus one group for the task head (whatever else is trainable)."""
    groups = method.optimizer_groups(adapter_layers(model), lr, weight_decay)
    seen = {id(p) for g in groups for p in g["params"]}
    heads = [p for p in model.parameters() if p.requires_grad and id(p) not in seen]
    if heads:
        groups.append({"name": "heads", "params": heads, "lr": lr, "weight_decay": weight_decay})
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lr)
    return torch.optim.AdamW(groups, lr=lr)


class Run:
    """A model with adapters, its method, controller and optimizer."""

    def __init__(self, method_name: str, total_steps: int | None = None, seed: int = 0, lr: float = 1e-2,
                 optimizer: str = "adamw", targets=None, trainable=None, num_layers: int = LAYERS,
                 **options):
        self.model = tiny_bert(seed, num_layers)
        torch.manual_seed(seed + 1)
        self.method = sr.adapt(self.model, method_name, total_steps=total_steps, targets=targets,
                               trainable=trainable, **options)
        self.controller = sr.RankController(self.model, self.method)
        self.layers = self.controller.layers
        self.optimizer = make_optimizer(self.model, self.method, lr, kind=optimizer)
        self.step = 0  # optimizer steps done

    def train(self, batches, n_steps: int, before_observe: Callable | None = None,
              after_optimizer: Callable | None = None, after_apply: Callable | None = None,
              loss_fn: Callable | None = None) -> None:
        """`n_steps` optimizer steps on batches[step % len]; callbacks get the 1-based step number."""
        self.model.train()
        for _ in range(n_steps):
            step = self.step + 1
            ids, labels = batches[self.step % len(batches)]
            out = self.model(input_ids=ids, labels=labels)
            loss = out.loss if loss_fn is None else loss_fn(out)
            loss.backward()
            if before_observe:
                before_observe(step)
            self.controller.observe()
            self.optimizer.step()
            if after_optimizer:
                after_optimizer(step)
            self.controller.apply()
            if after_apply:
                after_apply(step)
            self.optimizer.zero_grad()
            self.step = step

    def loss(self, batches) -> float:
        self.model.eval()
        with torch.no_grad():
            value = sum(float(self.model(input_ids=i, labels=l).loss) for i, l in batches) / len(batches)
        self.model.train()
        return value

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    def ranks(x):
        x = x.double()
        order = torch.argsort(x)
        r = torch.empty_like(x)
        r[order] = torch.arange(len(x), dtype=torch.double)
        for v in torch.unique(x):  # average ranks over ties
            tied = x == v
            r[tied] = r[tied].mean()
        return r
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


class ReferenceScores:
    """I, I_bar, U_bar per entry of every A, B, lam, updated from captured weights and gradients."""

    def __init__(self, beta1: float, beta2: float):
        self.b1, self.b2 = beta1, beta2
        self.i_bar: dict = {}
        self.u_bar: dict = {}

    def update(self, layers) -> None:
        for k, layer in enumerate(layers):
            for kind, p in (("A", layer.lora_A), ("B", layer.lora_B), ("lam", layer.lora_lam)):
                w = p.detach().double()
                g = p.grad.detach().double() if p.grad is not None else torch.zeros_like(w)
                I = (w * g).abs()
                key = (k, kind)
                i_bar = self.i_bar.get(key, torch.zeros_like(w))
                u_bar = self.u_bar.get(key, torch.zeros_like(w))
                i_bar = self.b1 * i_bar + (1 - self.b1) * I
                u_bar = self.b2 * u_bar + (1 - self.b2) * (I - i_bar).abs()  # with the updated I_bar
                self.i_bar[key], self.u_bar[key] = i_bar, u_bar

    def component_scores(self, layers) -> torch.Tensor:
        scores = []
        for k, layer in enumerate(layers):
            s = {kind: self.i_bar[(k, kind)] * self.u_bar[(k, kind)] for kind in ("A", "B", "lam")}
            for i in range(layer.r_max):
                s_lam = s["lam"][i]
                s_a = sum(s["A"][i, j] for j in range(layer.d_in)) / layer.d_in
                s_b = sum(s["B"][j, i] for j in range(layer.d_out)) / layer.d_out
                scores.append(float(s_lam + s_a + s_b))
        return torch.tensor(scores, dtype=torch.float64)
