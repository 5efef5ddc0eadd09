"""Aten operations dispatched per optimizer step, per method, at two depths: the per-module cost of each method.

    python bench/op_count.py                 # 4 and 8 layers (24 / 48 adapted modules), every method
    python bench/op_count.py --autocast bf16 # the forward under bf16 autocast, as a GPU run computes
    python bench/op_count.py --json ops.json

A random BERT (hidden 128, 4 heads, intermediate 512; no download), adapters on the six matrices of every
layer, batch 8 x 32 tokens, one process, AdamW with foreach=True (torch's choice on a GPU; on the CPU its default
loops over the parameters, 9 ops each, which would charge AdaLoRA's lam, a third parameter per module, 9 ops per
module that a GPU run does not launch); the classifier head trains in the adapters' optimizer group, so that
plain LoRA's optimizer is one group, like PEFT's (a foreach AdamW launches its ops once per group). One optimizer step = forward, backward, observe, optimizer
step, apply, zero_grad (PEFT: update_and_allocate instead of observe/apply). Counted with a TorchDispatchMode
(every `__torch_dispatch__` call), over `--steps` consecutive steps after `--warmup` uncounted ones, with
settings that make every adaptive method decide on some of the counted steps; the table gives the mean per
step. Deterministic: the same numbers on every machine with the same torch and transformers.

"launches" counts only the operations that run a kernel on a GPU: every dispatched operation except views,
allocations, detach and scalar reads. On a GPU whose step is bound by the host issuing kernels (a large frozen
base, bench/gpu_step_profile.py), launches per module are what a method's step costs; `--autocast bf16` runs the
forward under bf16 autocast, so that the casts a 16-bit GPU run makes are counted too.

"extra ops per module" = (ops at 48 modules - ops at 24) / 24 - the same for our LoRA (PEFT AdaLoRA: minus
PEFT LoRA's), the cost a method adds per adapted module. "host reads" counts `_local_scalar_dense` (a device
sync each on a GPU) inside observe + apply, on steps without and with a decision.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import scale_rank as sr  # noqa: E402
from scale_rank.inject import exact_names_regex  # noqa: E402

SCALE_RANK = ("lora", "adalora", "sora", "increlora", "prilora")
PEFT = ("peft_lora", "peft_adalora")
HIDDEN, HEADS, INTERMEDIATE, VOCAB, BATCH, TOKENS, RANK = 128, 4, 512, 1000, 8, 32, 8


NO_LAUNCH = frozenset({"detach", "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
                       "lift_fresh", "alias", "set_", "resize_", "_local_scalar_dense"})


def launches(func) -> bool:
    """Whether an aten operation runs a kernel on a GPU (views, allocations and scalar reads do not)."""
    return not func.is_view and func.overloadpacket.__name__ not in NO_LAUNCH


class OpCounter(TorchDispatchMode):
    """Counts aten calls while active, by name, and the calls that launch a kernel."""

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()
        self.launches = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        self.launches += launches(func)
        return func(*args, **(kwargs or {}))


@dataclass
class Count:
    ops_per_step: float
    launches_per_step: float
    host_reads_plain: float | None  # mean per step in observe + apply, steps without a decision
    host_reads_deciding: float | None


def tiny_bert(layers: int):
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=layers, num_attention_heads=HEADS,
                        intermediate_size=INTERMEDIATE, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        num_labels=2)
    return BertForSequenceClassification(config)


def method_options(name: str, total_steps: int) -> dict:
    """Settings under which the method decides on some of the counted steps (capacity 8 per module)."""
    return {"lora": {"r": RANK},
            "adalora": {"r_init": RANK, "r_target": RANK // 2, "t_init": 1, "t_final": 1, "delta_t": 2},
            "sora": {"r_max": RANK},
            "increlora": {"r_max": RANK, "r_target": RANK // 2, "t_init": 1, "incre_interval": 2},
            "prilora": {"r_first": RANK // 2, "r_last": RANK + RANK // 2, "prune_interval": 2}}[name]


def batch() -> dict:
    gen = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(0, VOCAB, (BATCH, TOKENS), generator=gen),
            "labels": torch.randint(0, 2, (BATCH,), generator=gen)}


def loss_backward(model, data: dict[str, torch.Tensor], autocast: torch.dtype | None) -> None:
    """Forward (under CPU autocast to `autocast`, if given) and backward of one batch."""
    with torch.autocast("cpu", dtype=autocast) if autocast is not None else nullcontext():
        loss = model(**data).loss
    loss.backward()


def count_scale_rank(name: str, layers: int, warmup: int, steps: int, autocast: torch.dtype | None = None) -> Count:
    model = tiny_bert(layers)
    total = warmup + steps + 2
    method = sr.adapt(model, name, total_steps=total, **method_options(name, total))
    controller = sr.RankController(model, method)
    groups = method.optimizer_groups(controller.layers, 1e-3, 0.01)  # AdamW's default weight decay, as PEFT's run
    groups[0]["params"] = groups[0]["params"] + [p for n, p in model.named_parameters()
                                                 if p.requires_grad and "lora_" not in n]  # PEFT's one group
    optimizer = torch.optim.AdamW(groups, lr=1e-3, foreach=True)
    method.track_optimizer(optimizer)
    data = batch()
    counter, reads = OpCounter(), {True: [], False: []}
    for step in range(1, warmup + steps + 1):
        counting = step > warmup
        controller_ops = OpCounter()  # observe and apply only (nested: the step's counter sees them too)
        with counter if counting else nullcontext():
            loss_backward(model, data, autocast)
            deciding = method.decides_at(step)
            with controller_ops:
                controller.observe()
            optimizer.step()
            with controller_ops:
                controller.apply()
            optimizer.zero_grad(set_to_none=True)
        if counting:
            reads[deciding].append(controller_ops.ops["_local_scalar_dense"])
    return Count(sum(counter.ops.values()) / steps, counter.launches / steps, _mean(reads[False]), _mean(reads[True]))


def count_peft(name: str, layers: int, warmup: int, steps: int, autocast: torch.dtype | None = None) -> Count:
    from peft import AdaLoraConfig, LoraConfig, get_peft_model
    model = tiny_bert(layers)
    targets = exact_names_regex(model)
    total = warmup + steps + 2
    if name == "peft_lora":
        config = LoraConfig(task_type="SEQ_CLS", r=RANK, lora_alpha=16, target_modules=targets)
    else:
        config = AdaLoraConfig(task_type="SEQ_CLS", init_r=RANK, target_r=RANK // 2, tinit=1, tfinal=1, deltaT=2,
                               total_step=total, lora_alpha=32, target_modules=targets)
    model = get_peft_model(model, config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, foreach=True)
    data = batch()
    counter = OpCounter()
    for step in range(1, warmup + steps + 1):
        with counter if step > warmup else nullcontext():
            loss_backward(model, data, autocast)
            optimizer.step()
            if name == "peft_adalora":
                model.base_model.update_and_allocate(step)
            optimizer.zero_grad(set_to_none=True)
    return Count(sum(counter.ops.values()) / steps, counter.launches / steps, None, None)


def _fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def measure(depths: tuple[int, int], warmup: int, steps: int, methods: list[str],
            autocast: torch.dtype | None = None) -> dict[str, dict[int, Count]]:
    """Counts per method and depth; `autocast` (e.g. torch.bfloat16): the forward under CPU autocast."""
    out = {}
    for name in methods:
        count = count_peft if name in PEFT else count_scale_rank
        out[name] = {layers: count(name, layers, warmup, steps, autocast) for layers in depths}
    return out


def table(counts: dict[str, dict[int, Count]], depths: tuple[int, int]) -> tuple[str, dict]:
    """The markdown table and a summary: per method, ops and launches per step and per module, and the extra per
    module over the baseline (our LoRA; PEFT AdaLoRA: PEFT LoRA)."""
    shallow, deep = depths
    modules = {d: 6 * d for d in depths}

    def per_module(field: str) -> dict[str, float]:
        return {name: (getattr(c[deep], field) - getattr(c[shallow], field)) / (modules[deep] - modules[shallow])
                for name, c in counts.items()}
    ops, launched = per_module("ops_per_step"), per_module("launches_per_step")
    rows, summary = [], {}
    header = (f"| method | ops/step, {modules[shallow]} modules | ops/step, {modules[deep]} modules | ops per module "
              "| extra ops per module vs LoRA | launches per module | extra launches per module vs LoRA "
              "| host reads in observe+apply (no decision / deciding) |")
    rows += [header, "|---|---:|---:|---:|---:|---:|---:|---|"]
    for name, c in counts.items():
        baseline = "peft_lora" if name == "peft_adalora" else ("lora" if name in SCALE_RANK else None)
        has_baseline = baseline in counts and name != baseline
        extra = ops[name] - ops[baseline] if has_baseline else None
        extra_launches = launched[name] - launched[baseline] if has_baseline else None
        reads = "-" if name in PEFT else f"{_fmt(c[deep].host_reads_plain)} / {_fmt(c[deep].host_reads_deciding)}"
        rows.append(f"| {name} | {c[shallow].ops_per_step:,.0f} | {c[deep].ops_per_step:,.0f} | {ops[name]:.1f} | "
                    f"{_fmt(extra, 1)} | {launched[name]:.1f} | {_fmt(extra_launches, 1)} | {reads} |")
        summary[name] = {"ops_per_step": {modules[d]: c[d].ops_per_step for d in depths},
                         "ops_per_module": ops[name], "extra_ops_per_module": extra,
                         "launches_per_step": {modules[d]: c[d].launches_per_step for d in depths},
                         "launches_per_module": launched[name], "extra_launches_per_module": extra_launches,
                         "host_reads": {modules[d]: [c[d].host_reads_plain, c[d].host_reads_deciding]
                                        for d in depths}}
    return "\n".join(rows), summary


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depths", default="4,8", help="two layer counts (6 adapted modules per layer)")
    parser.add_argument("--methods", default=",".join(SCALE_RANK + PEFT))
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--autocast", choices=("none", "bf16"), default="none",
                        help="run the forward under CPU autocast in this dtype (a 16-bit GPU run's casts)")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    depths = tuple(int(d) for d in args.depths.split(","))
    autocast = torch.bfloat16 if args.autocast == "bf16" else None
    counts = measure(depths, args.warmup, args.steps, args.methods.split(","), autocast)
    text, summary = table(counts, depths)
    print(text)
    if args.json:
        with open(args.json, "w") as out:
            json.dump(summary, out, indent=1)


if __name__ == "__main__":
    main()
