"""Shared by the 2-process workers and the pytest side: the tiny model, the batch, the reference."""
from __future__ import annotations

import functools

import torch

SEED = 1234
GLOBAL_BATCH = 8
SEQ_LEN = 10
KINDS = ("A", "B", "lam")


def build_model():
    """Tiny BERT classifier with AdaLoRA adapters; lam is given random values so A and B get gradients."""
    from transformers import BertConfig, BertForSequenceClassification

    from scale_rank import adapt

    torch.manual_seed(SEED)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, num_labels=2,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertForSequenceClassification(config)
    method = adapt(model, "adalora", total_steps=20)
    generator = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for layer in adapter_layers(model):
            z = torch.randn(layer.r_max, generator=generator)
            layer.lora_lam.copy_(z.sign() * (0.5 + z.abs()))  # |lam| >= 0.5: a zeroed entry stands out
    model.eval()  # no dropout anywhere: engines and the reference see the same function
    return model, method


def adapter_layers(model):
    from scale_rank.inject import adapter_layers as layers
    return layers(model)


def adapter_params(model) -> dict[str, torch.nn.Parameter]:
    """'site.A' / 'site.B' / 'site.lam' -> parameter, in model order."""
    out = {}
    for layer in adapter_layers(model):
        for kind, param in zip(KINDS, (layer.lora_A, layer.lora_B, layer.lora_lam)):
            out[f"{layer.site}.{kind}"] = param
    return out


def global_batch():
    generator = torch.Generator().manual_seed(SEED + 2)
    input_ids = torch.randint(0, 100, (GLOBAL_BATCH, SEQ_LEN), generator=generator)
    labels = torch.randint(0, 2, (GLOBAL_BATCH,), generator=generator)
    return input_ids, labels


def rank_batch(rank: int, world_size: int):
    input_ids, labels = global_batch()
    per = GLOBAL_BATCH // world_size
    return input_ids[rank * per:(rank + 1) * per], labels[rank * per:(rank + 1) * per]


def forward(model, input_ids, labels):
    """(loss, logits): mean cross-entropy over the batch, so DP averaging gives the full-batch gradient."""
    logits = model(input_ids=input_ids).logits
    return torch.nn.functional.cross_entropy(logits.float(), labels), logits


@functools.lru_cache(maxsize=1)
def trainable_names() -> frozenset[str]:
    """Names of the trainable parameters (adapters and the classifier head) of the unwrapped model."""
    model, _ = build_model()
    return frozenset(name for name, p in model.named_parameters() if p.requires_grad)


LR = 1e-2
BETAS = (0.9, 0.999)
EPS = 1e-8


def zero_range(lo: int, hi: int):
    """An edit that zeroes flat elements [lo, hi) of a parameter, wherever this rank's slice holds them."""
    def edit(local):
        a, b = max(lo, local.start), min(hi, local.end)
        if b > a:
            local.values[a - local.start:b - local.start] = 0
    return edit


def write_zeros(access, layers) -> None:
    """The decision applied in the tests: lam[0] = 0 and A[1, :] = 0 in every module."""
    from scale_rank.methods.base import edit_local

    for layer in layers:
        edit_local(access, layer.lora_lam, zero_range(0, 1))
        edit_local(access, layer.lora_A, zero_range(layer.d_in, 2 * layer.d_in))


def zero_grad_range(lo: int, hi: int):
    """An edit that zeroes the gradient of flat elements [lo, hi), wherever this rank's slice holds them."""
    def edit(local):
        a, b = max(lo, local.start), min(hi, local.end)
        if b > a:
            assert local.grad is not None, "no gradient to edit before the optimizer step"
            local.grad[a - local.start:b - local.start] = 0
    return edit


def write_grad_zeros(access, layers) -> None:
    """A gradient edit before the optimizer step (as SoRA's): grad lam[1] = 0, so lam[1] keeps its value."""
    from scale_rank.methods.base import edit_local

    for layer in layers:
        edit_local(access, layer.lora_lam, zero_grad_range(1, 2))


def tracker_sums(method, layers, access) -> torch.Tensor:
    """One SensitivityTracker update on the current gradients; this rank's float64 partial sums."""
    from scale_rank.components import ComponentLayout
    from scale_rank.importance import SensitivityTracker

    tracker = SensitivityTracker(layers, ComponentLayout(layers), access, method.config.beta1,
                                 method.config.beta2)
    tracker.update()
    return tracker.partial_sums()


def reference() -> dict:
    """The same sequence in one process on the full batch: what every engine must reproduce."""
    from scale_rank.shards import WholeTensorAccess

    model, method = build_model()
    layers = adapter_layers(model)
    access = WholeTensorAccess()
    init = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, betas=BETAS,
                                  eps=EPS, weight_decay=0.0)
    input_ids, labels = global_batch()
    forward(model, input_ids, labels)[0].backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    sums = tracker_sums(method, layers, access)
    write_grad_zeros(access, layers)
    optimizer.step()
    optimizer.zero_grad()
    write_zeros(access, layers)
    written = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    loss, logits = forward(model, input_ids, labels)
    loss.backward()
    optimizer.step()
    stepped = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return {"init": init, "grads": grads, "sums": sums, "written": written, "logits": logits.detach(),
            "stepped": stepped}


def logits_with(params: dict[str, torch.Tensor]) -> torch.Tensor:
    """Full-batch logits of the tiny model with the given trainable parameters."""
    model, _ = build_model()
    state = model.state_dict()
    state.update(params)
    model.load_state_dict(state)
    with torch.no_grad():
        return model(input_ids=global_batch()[0]).logits
