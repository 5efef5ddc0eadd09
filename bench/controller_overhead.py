"""Step time of every adaptive method against plain LoRA at the same capacity, and the controller's share.

    python bench/controller_overhead.py                       # defaults: about 3 minutes on 2 idle CPU cores
    python bench/controller_overhead.py --steps 3 --repeats 8 --no-peft
    python bench/controller_overhead.py --device cuda --steps 20 --repeats 5 --warmup 5

Task: all-MiniLM-L6-v2 (offline, scale_rank.model.load_classifier("minilm")) on the synthetic sentiment task,
batch 32, padded to max_length 64, AdamW, adapters on all six matrices of the six layers (36 modules).
Capacity is 8 components per module for every method (LoRA r=8, AdaLoRA r_init=8, SoRA r_max=8,
IncreLoRA r_max=8, PRILoRA 4..12 over depth, which is 8 on average: the same number of adapter parameters).
Decision intervals are at their most frequent: AdaLoRA re-masks every step (delta_t=1, as in the paper's
RTE/MRPC recipes), IncreLoRA grows every step, SoRA thresholds every step, PRILoRA prunes every
--prune-interval steps (default 10; the method's default is 100). Sensitivity EMAs and input statistics are
updated every step in every real run anyway.

Every configuration trains its own model; configurations run round-robin (the order rotates each repeat) in
blocks of --steps optimizer steps after --warmup untimed steps, so slow drifts of a shared machine hit all of
them alike. Reported: median over repeats of each block's mean ms/step, the median over repeats of the
block's ratio to the LoRA block of the same repeat, and the controller's own time (observe and apply timed
separately) as a share of the step. PEFT's AdaLoRA (update_and_allocate, orthogonal regularizer in forward)
is timed against PEFT's LoRA in the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import scale_rank as sr  # noqa: E402
from scale_rank.data.synthetic import splits  # noqa: E402
from scale_rank.inject import adapter_layers  # noqa: E402
from scale_rank.model import load_classifier, resolve_model_path  # noqa: E402

CAPACITY = 8
PEFT_TARGETS = r".*(attention\.self\.(query|key|value)|output\.dense|intermediate\.dense)$"


def method_options(name: str, total_steps: int, prune_interval: int) -> dict:
    return {
        "lora": dict(r=CAPACITY),
        "adalora": dict(r_init=CAPACITY, r_target=4, t_init=1, t_final=1, delta_t=1),
        "sora": dict(r_max=CAPACITY),
        "increlora": dict(r_max=CAPACITY, r_target=4, t_init=1, incre_interval=1),
        "prilora": dict(r_first=4, r_last=12, prune_interval=prune_interval),
    }[name]


@dataclass
class Config:
    label: str
    impl: str  # "scale_rank" or "peft"
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    controller: sr.RankController | None = None
    peft_adalora: bool = False
    step: int = 0
    blocks: list[float] = field(default_factory=list)  # mean s/step of each timed block
    observe: list[float] = field(default_factory=list)  # s per timed step
    apply: list[float] = field(default_factory=list)


def base_model(args) -> torch.nn.Module:
    """The pretrained encoder, or (--random-init) the same architecture with random weights: same FLOPs."""
    torch.manual_seed(args.seed)
    if not args.random_init:
        return load_classifier(args.model, num_labels=2)[0]
    from transformers import AutoConfig, AutoModelForSequenceClassification
    config = AutoConfig.from_pretrained(resolve_model_path(args.model), num_labels=2)
    return AutoModelForSequenceClassification.from_config(config)


def tokenizer_of(args):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(resolve_model_path(args.model))


def build_scale_rank(name: str, total_steps: int, args) -> Config:
    model = base_model(args)
    method = sr.adapt(model, name, total_steps=total_steps, **method_options(name, total_steps, args.prune_interval))
    model.to(args.device)
    controller = sr.RankController(model, method)
    groups = method.optimizer_groups(adapter_layers(model), args.lr, 0.0)
    seen = {id(p) for g in groups for p in g["params"]}
    heads = [p for p in model.parameters() if p.requires_grad and id(p) not in seen]
    groups.append({"name": "heads", "params": heads, "lr": args.lr, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups, lr=args.lr)
    if hasattr(method, "track_optimizer"):
        method.track_optimizer(optimizer)
    controller.guard(optimizer)
    return Config(name, "scale_rank", model, optimizer, controller)


def build_peft(name: str, total_steps: int, args) -> Config:
    from peft import AdaLoraConfig, LoraConfig, get_peft_model
    model = base_model(args)
    if name == "lora":
        config = LoraConfig(task_type="SEQ_CLS", r=CAPACITY, lora_alpha=16, target_modules=PEFT_TARGETS)
    else:
        config = AdaLoraConfig(task_type="SEQ_CLS", init_r=CAPACITY, target_r=4, lora_alpha=32,
                               target_modules=PEFT_TARGETS, tinit=1, tfinal=1, deltaT=1, total_step=total_steps)
    model = get_peft_model(model, config).to(args.device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    return Config(f"peft-{name}", "peft", model, optimizer, peft_adalora=name == "adalora")


def batches(args, tokenizer) -> list[dict[str, torch.Tensor]]:
    train, _ = splits(args.batch_size * args.n_batches, 8, seed=args.seed)
    out = []
    for i in range(args.n_batches):
        chunk = train[i * args.batch_size:(i + 1) * args.batch_size]
        enc = tokenizer([e.text for e in chunk], padding="max_length", truncation=True,
                        max_length=args.max_length, return_tensors="pt")
        enc = {k: v.to(args.device) for k, v in enc.items()}
        enc["labels"] = torch.tensor([e.label for e in chunk], device=args.device)
        out.append(enc)
    return out


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def train_steps(cfg: Config, data, n: int, device: str, timed: bool) -> None:
    cfg.model.train()
    start = time.perf_counter()
    for _ in range(n):
        batch = data[cfg.step % len(data)]
        loss = cfg.model(**batch).loss
        loss.backward()
        if cfg.controller is not None:
            sync(device)
            t0 = time.perf_counter()
            cfg.controller.observe()
            sync(device)
            t1 = time.perf_counter()
            cfg.optimizer.step()
            sync(device)
            t2 = time.perf_counter()
            cfg.controller.apply()
            sync(device)
            t3 = time.perf_counter()
        else:
            t0 = t1 = time.perf_counter()
            cfg.optimizer.step()
            sync(device)
            t2 = time.perf_counter()
            if cfg.peft_adalora:  # PEFT's allocator: after the optimizer step, before zero_grad
                cfg.model.base_model.update_and_allocate(cfg.step + 1)
            sync(device)
            t3 = time.perf_counter()
        cfg.optimizer.zero_grad(set_to_none=True)
        cfg.step += 1
        if timed:
            cfg.observe.append(t1 - t0)
            cfg.apply.append(t3 - t2)
    sync(device)
    if timed:
        cfg.blocks.append((time.perf_counter() - start) / n)


def report(configs: list[Config], args) -> str:
    base = {"scale_rank": next((c for c in configs if c.label == "lora"), None),
            "peft": next((c for c in configs if c.label == "peft-lora"), None)}
    lines = [f"MiniLM-L6 synthetic task, batch {args.batch_size}, max_length {args.max_length}, AdamW, "
             f"device {args.device}, {torch.get_num_threads()} threads, torch {torch.__version__}; {args.repeats} repeats x {args.steps} "
             f"steps after {args.warmup} warmup steps, capacity {CAPACITY} per module",
             "",
             "| method | ms/step (median) | ms/step (best block) | vs LoRA (median ratio) | ratio range | "
             "observe ms | apply ms | controller % of step |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    results = []
    for cfg in configs:
        ref = base[cfg.impl]
        ratios = [b / r for b, r in zip(cfg.blocks, ref.blocks)] if ref is not None else []
        step_ms = statistics.median(cfg.blocks) * 1e3
        observe_ms = statistics.mean(cfg.observe) * 1e3
        apply_ms = statistics.mean(cfg.apply) * 1e3
        share = (observe_ms + apply_ms) / (statistics.mean(cfg.blocks) * 1e3) * 100
        ratio = statistics.median(ratios) if ratios else float("nan")
        spread = f"{min(ratios):.3f}-{max(ratios):.3f}" if ratios else "-"
        obs = f"{observe_ms:.2f}" if cfg.impl == "scale_rank" else "-"
        best_ms = min(cfg.blocks) * 1e3
        lines.append(f"| {cfg.label} | {step_ms:.1f} | {best_ms:.1f} | {ratio:.3f} | {spread} | {obs} | "
                     f"{apply_ms:.2f} | {share:.2f} |")
        results.append({"method": cfg.label, "impl": cfg.impl, "blocks_s": cfg.blocks, "ratios": ratios,
                        "ms_per_step": step_ms, "best_block_ms": best_ms, "ratio": ratio, "observe_ms": observe_ms,
                        "apply_ms": apply_ms, "controller_pct": share})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps per block")
    parser.add_argument("--repeats", type=int, default=7, help="round-robin repeats (blocks per method)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per method before timing")
    parser.add_argument("--methods", default="lora,adalora,sora,increlora,prilora")
    parser.add_argument("--no-peft", dest="peft", action="store_false", help="skip PEFT LoRA / AdaLoRA")
    parser.add_argument("--prune-interval", type=int, default=10,
                        help="PRILoRA pruning interval in steps (the method's default is 100)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--n-batches", type=int, default=4, help="distinct batches, cycled")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="minilm", help="'minilm' (offline package) or a model directory")
    parser.add_argument("--random-init", action="store_true",
                        help="read only the config and tokenizer (weights random; timing is the same)")
    parser.add_argument("--json", default=None, help="also write raw numbers here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    total = args.warmup + args.repeats * args.steps + 2  # schedules end after the timed window
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    if "lora" not in names:
        names.insert(0, "lora")
    configs = [build_scale_rank(name, total, args) for name in names]
    if args.peft:
        try:
            configs += [build_peft("lora", total, args), build_peft("adalora", total, args)]
        except Exception as error:  # an older or newer PEFT without this API: time ours only
            print(f"PEFT comparison skipped: {type(error).__name__}: {error}", file=sys.stderr)
    data = batches(args, tokenizer_of(args))

    t_start = time.perf_counter()
    for cfg in configs:
        train_steps(cfg, data, args.warmup, args.device, timed=False)
    for r in range(args.repeats):
        order = configs[r % len(configs):] + configs[:r % len(configs)]
        for cfg in order:
            train_steps(cfg, data, args.steps, args.device, timed=True)
        print(f"repeat {r + 1}/{args.repeats} done ({time.perf_counter() - t_start:.0f} s)", file=sys.stderr)
    for cfg in configs:
        if cfg.controller is not None:
            ranks = cfg.controller.method.ranks()
            print(f"{cfg.label}: total rank {int(ranks.sum())} over {len(ranks)} modules after {cfg.step} steps",
                  file=sys.stderr)
    print(report(configs, args))


if __name__ == "__main__":
    main()
