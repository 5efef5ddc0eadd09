"""GLUE dev quality of scale_rank's five methods against PEFT's LoRA and AdaLoRA, at matched budgets.

    python bench/glue_quality.py --profile quick --json glue_quality.json   # SST-2 + MRPC, 3 seeds, 2 CPU cores
    python bench/glue_quality.py --profile separate --workers 2 --json separate.json   # the README's tables
    python bench/glue_quality.py --profile long --workers 2 --json long.json   # SST-2 + MRPC, 3x as many steps
    python bench/glue_quality.py --profile full --device cuda --json glue_full.json   # all GLUE, 5 seeds
    python bench/glue_quality.py --tasks mrpc --seeds 0 --steps 10          # smoke run

Every method of one (task, seed) trains its own copy of the same base model (pretrained MiniLM-L6, the
offline alias `minilm`; the randomly initialised classifier head is drawn once per seed and copied; the head
reads the masked mean of the last hidden states, MiniLM's own sentence vector, in the separate and full
profiles, and the CLS pooler in quick; --pooling, bench/mean_pooling.py) on the
same batches (scale_rank.data.tasks.batch_indices), with the same dropout masks (the RNG is reseeded
before every step), the same AdamW, learning rate and linear warmup/decay schedule, adapters on the same
modules (every linear layer scale_rank targets by default: for BERT the six matrices of every layer) and
the classifier head trained in full. scale_rank's LoRA and AdaLoRA start from the very adapter weights PEFT
draws for the same seed (copied in), so scale_rank LoRA and PEFT LoRA follow the same loss trajectory.

Budgets, base rank r (--rank, default 8): LoRA r; AdaLoRA r_init = 1.5r -> r_target = r (the AdaLoRA
paper's matching of final budgets), with identical settings for PEFT's AdaLoRA (init_r, target_r, tinit,
tfinal, deltaT, beta1/beta2, orth_reg_weight = gamma, lora_alpha); SoRA r_max = r; IncreLoRA r_target = r
(capacity r_max = 1.5r per module, AdaLoRA's); PRILoRA ranks r/2 .. 3r/2 over depth (r on average).

All methods of a seed run in lockstep: step s of every method, in an order that rotates every step, then
step s + 1. Only the training step is timed (forward, backward, observe, optimizer step, apply or PEFT's
update_and_allocate, zero_grad), and each method's time is compared with PEFT LoRA's on the same batch.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import multiprocessing
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, "..")]

import scale_rank as sr  # noqa: E402
from controller_overhead import sync  # noqa: E402
from mean_pooling import use_mean_pooling  # noqa: E402
from scale_rank.config import DataConfig, MethodConfig, load_config  # noqa: E402
from scale_rank.data import glue  # noqa: E402
from scale_rank.data.tasks import TaskData, batch_indices, build_task, padded_length, select  # noqa: E402
from scale_rank.engine import lr_schedule  # noqa: E402
from scale_rank.inject import adapter_layers, default_targets, exact_names_regex  # noqa: E402
from scale_rank.model import load_classifier, resolve_model_path  # noqa: E402
from scale_rank.train import resolve_total_steps  # noqa: E402

SCALE_RANK_METHODS = ("lora", "adalora", "sora", "increlora", "prilora")
PEFT_METHODS = ("peft_lora", "peft_adalora")
# the scale_rank settings each PEFT run takes: PEFT's AdaLoRA is the papers' (Gaussian start, lam 0, gamma 0.1)
PEFT_SETTINGS = {"peft_lora": "lora", "peft_adalora": "adalora@init=paper"}
ALL_METHODS = SCALE_RANK_METHODS + PEFT_METHODS
LABELS = {"lora": "LoRA", "adalora": "AdaLoRA", "sora": "SoRA", "increlora": "IncreLoRA", "prilora": "PRILoRA",
          "peft_lora": "PEFT LoRA", "peft_adalora": "PEFT AdaLoRA"}
RECIPES = Path(HERE).parent / "configs" / "glue"
DATA_DIR = os.environ.get("SCALE_RANK_GLUE_DIR")  # a glue_data folder (--data-dir); without one: the hub
EVAL_BATCH = 64
PEFT_ADAPTER = "default"


@dataclass(frozen=True)
class ShortShape:
    """A short profile's run of one task (schedules are fixed fractions of `steps`)."""

    steps: int
    batch_size: int
    max_length: int
    lr: float | None = None  # None: the recipe's (the AdaLoRA paper's) learning rate
    length_groups: int = 1  # batches pooled and re-cut by length (length_grouped_indices); 1: as drawn


# quick: about 50 minutes for 2 tasks x 7 methods x 3 seeds on 2 idle CPU cores (bench/README.md); too short for
# MRPC to leave the majority class. separate: the profile the README's quality tables come from, long enough that
# LoRA is clearly above the majority class on both tasks (MRPC at the recipe's lr 1e-3, LoRA over seeds 0, 1, 2:
# 77.27 / 77.60 / 69.60, majority 66.67; bench/README.md), 8 configurations x 2 tasks x 3 seeds in 90 minutes on
# 2 cores with --workers 2, thanks to batches grouped by length (a quarter to a half less padding).
SHORT_PROFILES = {
    "quick": {"sst2": ShortShape(steps=220, batch_size=16, max_length=64),
              "mrpc": ShortShape(steps=110, batch_size=16, max_length=128)},
    "separate": {"sst2": ShortShape(steps=300, batch_size=16, max_length=64, length_groups=8),
                 "mrpc": ShortShape(steps=300, batch_size=16, max_length=96, length_groups=8)},
    "long": {"sst2": ShortShape(steps=900, batch_size=16, max_length=64, length_groups=8),
             "mrpc": ShortShape(steps=900, batch_size=16, max_length=96, length_groups=8)},
}
PAPER_VARIANTS = ("adalora@init=paper", "increlora@init=paper")
# pooling: the sentence vector the classifier head reads, "cls" (the model's pooler on the CLS token) or "mean"
# (the masked mean of the last hidden states, MiniLM's own pooling; bench/mean_pooling.py)
PROFILES = {"quick": {"tasks": ("sst2", "mrpc"), "seeds": (0, 1, 2), "methods": ALL_METHODS, "pooling": "cls"},
            "separate": {"tasks": ("sst2", "mrpc"), "seeds": (0, 1, 2), "methods": ALL_METHODS + PAPER_VARIANTS[:1],
                         "pooling": "mean"},  # fits 90 min
            # long: separate's shapes run three times as long, no PEFT AdaLoRA (its row is separate's):
            # 6 configurations x 2 tasks x 3 seeds, about 2 hours on 2 cores (SST-2 57 min shared with a test run)
            "long": {"tasks": ("sst2", "mrpc"), "seeds": (0, 1, 2), "methods": SCALE_RANK_METHODS + PEFT_METHODS[:1],
                     "pooling": "mean"},
            "full": {"tasks": tuple(glue.TASKS), "seeds": (0, 1, 2, 3, 4), "methods": ALL_METHODS + PAPER_VARIANTS,
                     "pooling": "mean"}}
POOLINGS = ("cls", "mean")
STEP_FIELDS = ("t_init", "t_final", "delta_t", "incre_interval", "restart_warmup", "prune_interval")
AT_LEAST_ONE = ("delta_t", "incre_interval", "prune_interval")


@dataclass
class Options:
    """What to run; None means the profile's value."""

    profile: str = "quick"
    tasks: list[str] | None = None
    methods: list[str] | None = None  # method specs, e.g. "adalora@init=paper"
    seeds: list[int] | None = None
    steps: int | None = None
    batch_size: int | None = None
    max_length: int | None = None
    lr: float | None = None
    eval_every: int | None = None  # 0: evaluate at the end only
    rank: int = 8
    model: str = "minilm"
    data_dir: str | None = DATA_DIR  # None or a folder without the task: the hub
    device: str = "cpu"
    workers: int = 1  # processes that run (task, seed) jobs side by side
    pooling: str | None = None  # "cls" or "mean" (PROFILES)

    def resolved_pooling(self) -> str:
        return self.pooling or PROFILES[self.profile]["pooling"]


@dataclass
class TaskPlan:
    """The settings every method and seed of one task shares."""

    task: str
    source: str  # the local glue_data folder, or "hub"
    steps: int
    batch_size: int
    max_length: int
    lr: float
    weight_decay: float
    warmup: int
    eval_every: int
    schedule: dict[str, dict]  # per scale_rank method: step-valued settings that replace the recipe's
    length_groups: int = 1


@dataclass
class Run:
    """One method's model in training, and what it records."""

    method: str
    seed: int
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    controller: sr.RankController | None = None  # scale_rank methods
    allocate: Callable[[int], None] | None = None  # PEFT AdaLoRA's update_and_allocate
    losses: list[float] = field(default_factory=list)
    step_s: list[float] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------ plans

def recipe(task: str, method: str = "lora"):
    """The repository's GLUE recipe (the AdaLoRA paper's settings) of `task` for `method`."""
    return load_config(RECIPES / f"{task}_{method}.yaml")


def data_source(task: str, data_dir: str | None) -> str:
    """The local glue_data folder if it holds the task, else "hub" (nyu-mll/glue)."""
    if data_dir and (Path(data_dir) / glue.get_spec(task).folder).is_dir():
        return data_dir
    return "hub"


def max_length_of(task: str, opts: Options) -> int:
    if opts.max_length:
        return opts.max_length
    if opts.profile in SHORT_PROFILES:
        return short_shape(task, opts.profile).max_length
    return recipe(task).data.max_length


def short_shape(task: str, profile: str) -> ShortShape:
    """The short profile's shape of `task` (tasks it does not name run like its MRPC)."""
    shapes = SHORT_PROFILES[profile]
    return shapes.get(task, shapes["mrpc"])


def make_plan(task: str, opts: Options, train_size: int) -> TaskPlan:
    """Short profiles: fixed fractions of a short run. Full: the recipe, its step counts scaled to --steps."""
    base = recipe(task)
    common = dict(task=task, source=data_source(task, opts.data_dir), max_length=max_length_of(task, opts),
                  weight_decay=base.train.weight_decay)
    if opts.profile in SHORT_PROFILES:
        shape = short_shape(task, opts.profile)
        common["lr"] = opts.lr or shape.lr or base.train.lr
        steps = opts.steps or shape.steps
        tenth = round(0.1 * steps)
        schedule = {"adalora": {"t_init": tenth, "t_final": round(0.3 * steps), "delta_t": 1},
                    "increlora": {"t_init": tenth, "incre_interval": None, "restart_warmup": None},
                    "prilora": {"prune_interval": max(1, round(steps / 30))}}
        return TaskPlan(**common, steps=steps, batch_size=opts.batch_size or shape.batch_size,
                        warmup=round(0.06 * steps), eval_every=opts.eval_every or 0, schedule=schedule,
                        length_groups=shape.length_groups)
    base.train.batch_size = opts.batch_size or base.train.batch_size
    recipe_steps = resolve_total_steps(base, train_size)
    steps = opts.steps or recipe_steps
    factor = steps / recipe_steps
    schedule = {}
    for name in SCALE_RANK_METHODS:
        method = recipe(task, name).method
        schedule[name] = {key: _scaled(getattr(method, key), factor, key in AT_LEAST_ONE)
                          for key in STEP_FIELDS if getattr(method, key, None) is not None}
    eval_every = opts.eval_every if opts.eval_every is not None else _scaled(base.train.eval_every, factor, True)
    return TaskPlan(**common, lr=opts.lr or base.train.lr, steps=steps, batch_size=base.train.batch_size,
                    warmup=_scaled(base.train.warmup_steps, factor, False), eval_every=eval_every,
                    schedule=schedule)


def _scaled(value: int, factor: float, at_least_one: bool) -> int:
    """A recipe's step count scaled to the run's length; a positive interval stays positive."""
    scaled = round(value * factor)
    return max(1, scaled) if at_least_one and value > 0 else scaled


def budget_options(name: str, rank: int) -> dict:
    """The matched-budget fields of scale_rank method `name` for base rank `rank`."""
    wide = max(rank + 1, round(1.5 * rank))
    return {"lora": {"r": rank},
            "adalora": {"r_init": wide, "r_target": rank},
            "sora": {"r_max": rank},
            "increlora": {"r_target": rank, "r_max": wide},  # incre_rank r // 2: fits 1.5 r
            "prilora": {"r_first": rank - rank // 2, "r_last": rank + rank // 2}}[name]


def split_spec(spec: str) -> tuple[str, dict[str, str]]:
    """'adalora@init=paper+gamma=0' -> ('adalora', {'init': 'paper', 'gamma': '0'}): a method and overrides."""
    name, _, variant = spec.partition("@")
    overrides = dict(item.split("=", 1) for item in variant.split("+") if item)
    return name, overrides


def label(spec: str) -> str:
    name, overrides = split_spec(spec)
    extra = ", ".join(f"{key}={value}" for key, value in overrides.items())
    return LABELS[name] + (f" ({extra})" if extra else "")


def method_settings(spec: str, plan: TaskPlan, rank: int) -> MethodConfig:
    """The recipe's method config (paper constants) with the matched budget and the plan's schedule, under the
    spec's overrides (`name@key=value+key=value`), which win over both."""
    name, overrides = split_spec(spec)
    base = load_config(RECIPES / f"{plan.task}_{name}.yaml", [f"method.{k}={v}" for k, v in overrides.items()]).method
    planned = {**budget_options(name, rank), **plan.schedule.get(name, {})}
    cfg = dataclasses.replace(base, **{key: value for key, value in planned.items() if key not in overrides})
    cfg.validate(plan.steps)
    return cfg


def budget_text(rank: int) -> str:
    o = {name: budget_options(name, rank) for name in SCALE_RANK_METHODS}
    return (f"LoRA and PEFT LoRA r={rank}; AdaLoRA and PEFT AdaLoRA r_init={o['adalora']['r_init']} -> "
            f"r_target={rank} (final total rank = LoRA's); SoRA r_max={rank}; IncreLoRA r_target={rank} "
            f"(r_max={o['increlora']['r_max']}); PRILoRA r={o['prilora']['r_first']}..{o['prilora']['r_last']} "
            f"over depth ({rank} on average, LoRA's parameter count)")


def plan_text(plan: TaskPlan, rank: int) -> str:
    ada = method_settings("adalora", plan, rank)
    t_init, t_final = ada.resolved_phases(plan.steps)
    inc = method_settings("increlora", plan, rank)
    pri = method_settings("prilora", plan, rank)
    evaluation = f"every {plan.eval_every} steps and at the end (best reported)" if plan.eval_every else \
        "at the end only"
    grouping = f" (grouped by length over {plan.length_groups} batches)" if plan.length_groups > 1 else ""
    return (f"{plan.task}: {plan.steps} steps, batch {plan.batch_size}{grouping}, max_length {plan.max_length}, "
            f"lr {plan.lr:g}, warmup {plan.warmup}, dev eval {evaluation}, data {plan.source}; AdaLoRA t_init "
            f"{t_init} t_final {t_final} delta_t {ada.delta_t} gamma {ada.resolved_gamma():g}; IncreLoRA t_init "
            f"{inc.t_init if inc.t_init is not None else 'auto'} interval {inc.incre_interval or 'auto'}; "
            f"PRILoRA prune every {pri.prune_interval}")


# ------------------------------------------------------------------------------------------------ models

def peft_config(name: str, cfg: MethodConfig, steps: int, targets: str):
    """PEFT's config with the same settings as scale_rank's `cfg` (LoRA or AdaLoRA)."""
    from peft import AdaLoraConfig, LoraConfig
    if name == "peft_lora":
        return LoraConfig(task_type="SEQ_CLS", r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                          target_modules=targets)
    t_init, t_final = cfg.resolved_phases(steps)
    return AdaLoraConfig(task_type="SEQ_CLS", init_r=cfg.r_init, target_r=cfg.r_target, lora_alpha=cfg.alpha,
                         lora_dropout=cfg.dropout, tinit=t_init, tfinal=t_final, deltaT=cfg.delta_t,
                         beta1=cfg.beta1, beta2=cfg.beta2, orth_reg_weight=cfg.resolved_gamma(), total_step=steps,
                         target_modules=targets)


def peft_factors(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A (r x d_in), B (d_out x r) and AdaLoRA's E (r) of a PEFT layer (E None for LoRA)."""
    A, B = module.lora_A[PEFT_ADAPTER], module.lora_B[PEFT_ADAPTER]
    if isinstance(A, nn.Linear):
        return A.weight, B.weight, None
    return A, B, module.lora_E[PEFT_ADAPTER].flatten()


def peft_layers(model: nn.Module) -> list[nn.Module]:
    from peft.tuners.lora import LoraLayer
    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def copy_peft_init(model: nn.Module, peft_model: nn.Module) -> None:
    """Give scale_rank's adapters the initial A and B (and AdaLoRA's E as lam) PEFT drew."""
    peft_base = peft_model.get_base_model()
    with torch.no_grad():
        for layer in adapter_layers(model):
            A, B, E = peft_factors(peft_base.get_submodule(layer.site))
            layer.lora_A.copy_(A)
            layer.lora_B.copy_(B)
            if E is not None:
                layer.lora_lam.copy_(E)


def optimizer_and_schedule(groups: list[dict], plan: TaskPlan):
    optimizer = torch.optim.AdamW(groups, lr=plan.lr, weight_decay=plan.weight_decay)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule("linear", plan.warmup, plan.steps))


def build_peft_run(name: str, base: nn.Module, plan: TaskPlan, rank: int, seed: int, device: str) -> Run:
    from peft import get_peft_model
    cfg = method_settings(PEFT_SETTINGS[name], plan, rank)
    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(base), peft_config(name, cfg, plan.steps, exact_names_regex(base)))
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = optimizer_and_schedule([{"params": params, "weight_decay": plan.weight_decay}], plan)
    allocate = model.base_model.update_and_allocate if name == "peft_adalora" else None
    return Run(name, seed, model, optimizer, scheduler, allocate=allocate)


def build_scale_rank_run(spec: str, base: nn.Module, plan: TaskPlan, rank: int, seed: int, device: str,
                         peft_init: nn.Module | None) -> Run:
    model = copy.deepcopy(base)
    torch.manual_seed(seed)
    method = sr.adapt(model, method_settings(spec, plan, rank), plan.steps, default_targets(model))
    if peft_init is not None:
        copy_peft_init(model, peft_init)
    model.to(device)
    controller = sr.RankController(model, method)
    groups = method.optimizer_groups(controller.layers, plan.lr, plan.weight_decay)
    adapter_ids = {id(p) for g in groups for p in g["params"]}
    heads = [p for p in model.parameters() if p.requires_grad and id(p) not in adapter_ids]
    groups.append({"name": "heads", "params": heads, "lr": plan.lr, "weight_decay": plan.weight_decay})
    optimizer, scheduler = optimizer_and_schedule(groups, plan)
    method.track_optimizer(optimizer)
    return Run(spec, seed, model, optimizer, scheduler, controller=controller)


def build_runs(methods: list[str], base: nn.Module, plan: TaskPlan, rank: int, seed: int, device: str) -> list[Run]:
    """One Run per method spec. scale_rank LoRA, and AdaLoRA with the papers' start (init=paper), copy the
    initial adapters of PEFT's run of this seed (the same distributions, so the same draw)."""
    runs = {name: build_peft_run(name, base, plan, rank, seed, device) for name in methods if name in PEFT_METHODS}
    for spec in methods:
        name, _ = split_spec(spec)
        if name in SCALE_RANK_METHODS:
            twin = f"peft_{name}"
            peft_init = None
            if twin in PEFT_METHODS and getattr(method_settings(spec, plan, rank), "init", "paper") == "paper":
                twin_run = runs.get(twin) or build_peft_run(twin, base, plan, rank, seed, "cpu")
                peft_init = twin_run.model
            runs[spec] = build_scale_rank_run(spec, base, plan, rank, seed, device, peft_init)
    return [runs[spec] for spec in methods]


# ------------------------------------------------------------------------------------------------ training

def to_device(batch: dict[str, torch.Tensor], device: str) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def task_loss(logits: torch.Tensor, labels: torch.Tensor, regression: bool) -> float:
    """The task loss alone (PEFT AdaLoRA's model loss also holds its regularizer)."""
    if regression:
        return float(F.mse_loss(logits.squeeze(-1).float(), labels.float()))
    return float(F.cross_entropy(logits.float(), labels))


def train_step(run: Run, batch: dict[str, torch.Tensor], step: int, device: str, regression: bool) -> None:
    """One optimizer step; only forward .. zero_grad is timed."""
    sync(device)
    start = time.perf_counter()
    out = run.model(**batch)
    out.loss.backward()
    if run.controller is not None:
        run.controller.observe()
    run.optimizer.step()
    if run.controller is not None:
        run.controller.apply()
    if run.allocate is not None:
        run.allocate(step + 1)
    run.optimizer.zero_grad(set_to_none=True)
    sync(device)
    run.step_s.append(time.perf_counter() - start)
    run.scheduler.step()
    run.losses.append(task_loss(out.logits.detach(), batch["labels"], regression))


@torch.no_grad()
def evaluate(model: nn.Module, task: TaskData, device: str) -> dict[str, float]:
    """The task metric on the whole dev set, in length-sorted batches each padded to its own longest row."""
    model.eval()
    n = len(task.eval["labels"])
    order = torch.argsort(task.eval["attention_mask"].sum(1), stable=True)
    predictions = torch.empty(n, dtype=torch.float32 if task.regression else torch.long)
    for chunk in order.split(EVAL_BATCH):
        batch = to_device(select(task.eval, chunk, padded_length(task.eval, chunk), labels=False), device)
        logits = model(**batch).logits.float().cpu()
        predictions[chunk] = logits.squeeze(-1) if task.regression else logits.argmax(-1)
    model.train()
    return task.metric(predictions, task.eval["labels"])


def length_grouped_indices(step: int, lengths: torch.Tensor, batch_size: int, seed: int, groups: int) -> torch.Tensor:
    """The batch of `step` when every `groups` consecutive batches of batch_indices' order are pooled, sorted
    by length and cut again, the cuts in a seeded order: the same examples per epoch with less padding (the
    bench pads each batch to its longest row)."""
    if groups == 1:
        return batch_indices(step, len(lengths), batch_size, seed)
    first = step - step % groups
    pool = torch.cat([batch_indices(s, len(lengths), batch_size, seed) for s in range(first, first + groups)])
    cuts = pool[torch.argsort(lengths[pool], stable=True)].view(groups, batch_size)
    order = torch.randperm(groups, generator=torch.Generator().manual_seed(seed * 1_000_033 + first))
    return cuts[order[step % groups]]


def dropout_seed(seed: int, step: int) -> int:
    return seed * 1_000_003 + step


def train_seed(task: TaskData, plan: TaskPlan, runs: list[Run], seed: int, device: str) -> None:
    """All runs in lockstep: step s of every run (order rotating each step), then step s + 1."""
    start = time.perf_counter()
    report_every = max(1, plan.steps // 10)
    for run in runs:
        run.model.train()
    lengths = task.train["attention_mask"].sum(1)
    for step in range(plan.steps):
        indices = length_grouped_indices(step, lengths, plan.batch_size, seed, plan.length_groups)
        batch = to_device(select(task.train, indices, padded_length(task.train, indices)), device)
        shift = step % len(runs)
        for run in runs[shift:] + runs[:shift]:
            torch.manual_seed(dropout_seed(seed, step))  # the same dropout masks for every method
            train_step(run, batch, step, device, task.regression)
        done = step + 1
        if done == plan.steps or (plan.eval_every and done % plan.eval_every == 0):
            for run in runs:
                run.evals.append({"step": done, **evaluate(run.model, task, device)})
        if done % report_every == 0 or done == plan.steps:
            print(f"[{plan.task} seed {seed}] step {done}/{plan.steps} ({time.perf_counter() - start:.0f} s)",
                  file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ budgets

def final_ranks(run: Run) -> list[tuple[int, int, int]]:
    """(rank, d_in, d_out) of every adapted module at the end of training."""
    if run.controller is not None:
        ranks = run.controller.method.ranks().tolist()
        return [(int(r), layer.d_in, layer.d_out) for r, layer in zip(ranks, run.controller.layers)]
    out = []
    for module in peft_layers(run.model):
        A, B, E = peft_factors(module)
        rank = A.shape[0] if E is None else int(E.count_nonzero())
        out.append((rank, A.shape[1], B.shape[0]))
    return out


def orthogonality(run: Run) -> float | None:
    """How far the final factors are from orthonormal: the mean over all A and B of ||A A^T - I||_F / sqrt(r)
    and ||B^T B - I||_F / sqrt(r) over the components in use (0: orthonormal; 1: e.g. B = 0). None for LoRA."""
    if run.controller is not None:
        if split_spec(run.method)[0] == "lora":
            return None
        factors = []
        for layer in run.controller.layers:
            keep = layer.active.bool()
            factors.append((layer.lora_A.detach()[keep], layer.lora_B.detach()[:, keep]))
    else:
        factors = [(A.detach(), B.detach()) for A, B, E in map(peft_factors, peft_layers(run.model)) if E is not None]
        if not factors:
            return None
    values = []
    for A, B in factors:
        eye = torch.eye(A.shape[0], device=A.device)
        for gram in (A.float() @ A.float().t(), B.float().t() @ B.float()):
            values.append(float(torch.linalg.matrix_norm(gram - eye)) / max(1.0, A.shape[0]) ** 0.5)
    return statistics.mean(values) if values else None


def budget(run: Run) -> dict:
    """Final total rank, final adapter parameters (rank x (d_in + d_out), summed: a plain LoRA export of the
    final ranks), adapter parameters trained (the full capacity) and trained head parameters."""
    ranks = final_ranks(run)
    trainable = [(name, p.numel()) for name, p in run.model.named_parameters() if p.requires_grad]
    return {"ranks": [r for r, _, _ in ranks], "modules": len(ranks), "total_rank": sum(r for r, _, _ in ranks),
            "adapter_params": sum(r * (d_in + d_out) for r, d_in, d_out in ranks),
            "trained_adapter_params": sum(n for name, n in trainable if "lora_" in name),
            "head_params": sum(n for name, n in trainable if "lora_" not in name)}


# ------------------------------------------------------------------------------------------------ results

def primary_eval(evals: list[dict], metric: str) -> dict:
    """The evaluation with the best primary metric (the final one when evaluating only at the end)."""
    return max(reversed(evals), key=lambda e: e[metric])


def paired_vs_lora(runs: list[dict], lora: dict[int, float], metric: str) -> dict | None:
    """The primary metric minus scale_rank LoRA's on the same seed (same batches, dropout masks and head), x100:
    mean and std of those differences, how many are > 0, and issue 9's two lines (at least LoRA - 0.5; ahead by
    more than LoRA's own standard deviation over these seeds). None without LoRA."""
    pairs = [(100 * r["reported"][metric], lora[r["seed"]]) for r in runs if r["seed"] in lora]
    if not pairs or runs[0]["method"] == "lora":
        return None
    diffs = [ours - theirs for ours, theirs in pairs]
    theirs = [t for _, t in pairs]
    lora_std = statistics.stdev(theirs) if len(theirs) > 1 else 0.0
    mean = statistics.mean(diffs)
    return {"seeds": len(diffs), "mean": mean, "std": statistics.stdev(diffs) if len(diffs) > 1 else 0.0,
            "wins": sum(d > 0 for d in diffs), "within_half_point": mean >= -0.5,
            "ahead_by_lora_std": len(diffs) > 1 and mean > lora_std, "lora_std": lora_std}


def summarize(records: list[dict], metric_names: dict[str, str]) -> list[dict]:
    """One row per (task, method): metric mean/std over seeds, the paired difference from LoRA, budgets, step
    time against PEFT LoRA."""
    rows = []
    for task in dict.fromkeys(r["task"] for r in records):
        reference = {r["seed"]: r["step_s"] for r in records if r["task"] == task and r["method"] == "peft_lora"}
        lora = {r["seed"]: 100 * r["reported"][metric_names[task]] for r in records
                if r["task"] == task and r["method"] == "lora"}
        for method in dict.fromkeys(r["method"] for r in records if r["task"] == task):
            runs = [r for r in records if r["task"] == task and r["method"] == method]
            keys = [k for k in runs[0]["reported"] if k != "step"]
            values = {k: [100 * r["reported"][k] for r in runs] for k in keys}
            ratios = [t / ref for r in runs if r["seed"] in reference
                      for t, ref in zip(r["step_s"], reference[r["seed"]])]
            rows.append({
                "task": task, "method": method, "seeds": [r["seed"] for r in runs],
                "primary": metric_names[task],
                "metrics": {k: {"mean": statistics.mean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0}
                            for k, v in values.items()},
                "vs_lora": paired_vs_lora(runs, lora, metric_names[task]),
                **{key: statistics.mean(r["budget"][key] for r in runs)
                   for key in ("total_rank", "adapter_params", "trained_adapter_params")},
                "orthogonality": (statistics.mean(r["orthogonality"] for r in runs)
                                  if runs[0].get("orthogonality") is not None else None),
                "ms_per_step": 1e3 * statistics.median(t for r in runs for t in r["step_s"]),
                "vs_peft_lora": statistics.median(ratios) if ratios else None})
    return rows


def _number(value: float) -> str:
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.1f}"


def _paired(vs_lora: dict | None) -> str:
    """'+0.65 ± 0.70 (2/3)': mean ± std of the per-seed differences from LoRA, seeds ahead of it; a '*' marks a
    mean ahead by more than LoRA's standard deviation, a '!' one below LoRA - 0.5 (issue 9's lines)."""
    if vs_lora is None:
        return "-"
    mark = "*" if vs_lora["ahead_by_lora_std"] else "" if vs_lora["within_half_point"] else "!"
    return f"{vs_lora['mean']:+.2f} ± {vs_lora['std']:.2f} ({vs_lora['wins']}/{vs_lora['seeds']}){mark}"


def format_table(rows: list[dict]) -> str:
    lines = []
    for task in dict.fromkeys(row["task"] for row in rows):
        task_rows = [row for row in rows if row["task"] == task]
        keys = list(task_rows[0]["metrics"])
        header = [f"{k} (primary)" if k == task_rows[0]["primary"] else k for k in keys]
        lines += ["", f"| {task} | " + " | ".join(header) + " | vs LoRA, paired (wins) | final total rank | "
                  "final adapter params | trained adapter params | orthogonality | ms/step (median) | "
                  "step time vs PEFT LoRA (median) |",
                  "|---|" + "---:|" * (len(keys) + 7)]
        for row in task_rows:
            metrics = " | ".join(f"{row['metrics'][k]['mean']:.2f} ± {row['metrics'][k]['std']:.2f}" for k in keys)
            ratio = f"{row['vs_peft_lora']:.3f}" if row["vs_peft_lora"] is not None else "-"
            orth = f"{row['orthogonality']:.3f}" if row.get("orthogonality") is not None else "-"
            lines.append(f"| {label(row['method'])} | {metrics} | {_paired(row.get('vs_lora'))} | "
                         f"{_number(row['total_rank'])} | "
                         f"{_number(row['adapter_params'])} | {_number(row['trained_adapter_params'])} | {orth} | "
                         f"{row['ms_per_step']:.0f} | {ratio} |")
    return "\n".join(lines)


def lora_gap(records: list[dict]) -> str:
    """Largest |loss difference| between scale_rank LoRA and PEFT LoRA per task (same initial adapters)."""
    gaps = {}
    for ours in (r for r in records if r["method"] == "lora"):
        for peft in (r for r in records if r["method"] == "peft_lora"
                     and (r["task"], r["seed"]) == (ours["task"], ours["seed"])):
            gap = max(abs(a - b) for a, b in zip(ours["losses"], peft["losses"]))
            gaps[ours["task"]] = max(gap, gaps.get(ours["task"], 0.0))
    if not gaps:
        return ""
    return ("Training loss, scale_rank LoRA vs PEFT LoRA from the same initial adapters, largest |difference| "
            "over all steps and seeds: " + ", ".join(f"{task} {gap:.1e}" for task, gap in gaps.items()))


def record(run: Run, task: TaskData) -> dict:
    return {"task": task.name, "method": run.method, "seed": run.seed, "evals": run.evals,
            "reported": primary_eval(run.evals, task.metric_name), "losses": run.losses, "step_s": run.step_s,
            "budget": budget(run), "orthogonality": orthogonality(run)}


# ------------------------------------------------------------------------------------------------ main

def benchmark(opts: Options) -> dict:
    """Train every method on every task and seed; return plans, per-run records, summary rows and the table.

    With `opts.workers` > 1 the (task, seed) jobs run in that many processes, each with an equal share of
    this process's threads (every method of one job still trains in lockstep in one process)."""
    methods = list(opts.methods or PROFILES[opts.profile]["methods"])
    unknown = {split_spec(spec)[0] for spec in methods} - set(ALL_METHODS)
    if unknown:
        raise ValueError(f"unknown method(s) {sorted(unknown)}; choose from {list(ALL_METHODS)}")
    if opts.resolved_pooling() not in POOLINGS:
        raise ValueError(f"unknown pooling {opts.pooling!r}; choose from {list(POOLINGS)}")
    tasks = [glue.get_spec(t).name for t in (opts.tasks or PROFILES[opts.profile]["tasks"])]
    seeds = opts.seeds if opts.seeds is not None else list(PROFILES[opts.profile]["seeds"])
    _TASKS.clear()  # another call's options may differ
    plans = {name: prepared_task(opts, name)[1] for name in tasks}
    for plan in plans.values():
        print(plan_text(plan, opts.rank), file=sys.stderr, flush=True)
    jobs = [(opts, methods, name, seed) for name in tasks for seed in seeds]
    threads = torch.get_num_threads()
    if opts.workers > 1:
        longest_first = sorted(jobs, key=lambda job: -plans[job[2]].steps * plans[job[2]].max_length)
        context = multiprocessing.get_context("spawn")
        with context.Pool(opts.workers, _start_worker, (max(1, threads // opts.workers),)) as pool:
            done = pool.starmap(run_seed, longest_first, chunksize=1)
        by_job = {(job[2], job[3]): records for job, records in zip(longest_first, done)}
        records = [r for name in tasks for seed in seeds for r in by_job[name, seed]]
    else:
        records = [r for job in jobs for r in run_seed(*job)]
    metric_names = {name: prepared_task(opts, name)[0].metric_name for name in tasks}
    rows = summarize(records, metric_names)
    header = [f"GLUE dev quality vs PEFT: model {opts.model} ({opts.resolved_pooling()} pooling), {opts.profile} "
              f"profile, seeds "
              f"{','.join(map(str, seeds))}, device {opts.device}, {threads} threads"
              f"{f' in {opts.workers} processes' if opts.workers > 1 else ''}, "
              f"torch {torch.__version__}, peft {_version('peft')}, transformers {_version('transformers')}",
              f"Budgets (base rank {opts.rank}): {budget_text(opts.rank)}",
              *(plan_text(plan, opts.rank) for plan in plans.values()),
              "Metrics x100, mean ± std over seeds; vs LoRA, paired = the primary metric minus scale_rank LoRA's on "
              "the same seed, mean ± std over seeds (seeds ahead of LoRA; * ahead by more than LoRA's std, ! below "
              "LoRA - 0.5); final adapter params = sum of rank x (d_in + d_out) over the adapted modules; trained "
              "adapter params = the capacity that trains (all of A, B, lam/E)."]
    table = "\n".join(header) + "\n" + format_table(rows) + "\n\n" + lora_gap(records)
    return {"plans": [dataclasses.asdict(p) for p in plans.values()], "records": records, "rows": rows,
            "table": table.rstrip()}


_TASKS: dict[str, tuple[TaskData, TaskPlan]] = {}  # per process: tokenised once, shared by the task's seeds


def prepared_task(opts: Options, name: str) -> tuple[TaskData, TaskPlan]:
    """Task `name` tokenised for the model, and its plan."""
    if name not in _TASKS:
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(opts.model))
        source = data_source(name, opts.data_dir)
        data_cfg = DataConfig(task=name, data_dir=None if source == "hub" else source,
                              max_length=max_length_of(name, opts))
        task = build_task(data_cfg, tokenizer, seed=0)
        _TASKS[name] = task, make_plan(name, opts, task.train_size)
    return _TASKS[name]


def run_seed(opts: Options, methods: list[str], name: str, seed: int) -> list[dict]:
    """One (task, seed): every method in lockstep from the same base and head; their records."""
    task, plan = prepared_task(opts, name)
    torch.manual_seed(seed)  # the classifier head is drawn here, once per seed
    base, _ = load_classifier(opts.model, task.num_labels)
    if opts.resolved_pooling() == "mean":
        use_mean_pooling(base)
    runs = build_runs(methods, base, plan, opts.rank, seed, opts.device)
    train_seed(task, plan, runs, seed, opts.device)
    return [record(run, task) for run in runs]


def _start_worker(threads: int) -> None:
    torch.set_num_threads(threads)
    _quiet_transformers()


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _version(package: str) -> str:
    return __import__(package).__version__


def _split(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def parse_args(argv=None) -> tuple[Options, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    parser.add_argument("--tasks", help="comma-separated GLUE tasks (default: the profile's)")
    parser.add_argument("--methods", help=f"comma-separated specs, from {ALL_METHODS}, each optionally with "
                        "settings: adalora@init=paper+gamma=0 (default: the profile's)")
    parser.add_argument("--seeds", help="comma-separated (default: 0,1,2 quick; 0..4 full)")
    parser.add_argument("--steps", type=int, help="optimizer steps per run (default: the profile's)")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--max-length", type=int)
    parser.add_argument("--lr", type=float, help="peak learning rate (default: the profile's, else the recipe's)")
    parser.add_argument("--eval-every", type=int, help="0: dev evaluation at the end only (quick's default)")
    parser.add_argument("--rank", type=int, default=8, help="base rank r of the matched budgets")
    parser.add_argument("--model", default="minilm", help="'minilm' (offline package), hub name or directory")
    parser.add_argument("--data-dir", default=DATA_DIR,
                        help="glue_data folder (env SCALE_RANK_GLUE_DIR); tasks it lacks come from the hub")
    parser.add_argument("--pooling", choices=POOLINGS, help="sentence vector the head reads: the CLS pooler, or "
                        "the masked mean of the last hidden states (default: the profile's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads, in all")
    parser.add_argument("--workers", type=int, default=1,
                        help="processes running (task, seed) jobs side by side, each with threads / workers "
                        "threads (2 x 1 thread runs about 1.2x faster than 1 x 2 threads on 2 CPU cores)")
    parser.add_argument("--json", help="write plans, every run's raw record and the summary rows here")
    args = parser.parse_args(argv)
    opts = Options(profile=args.profile, tasks=_split(args.tasks) if args.tasks else None,
                   methods=_split(args.methods) if args.methods else None, seeds=[int(s) for s in _split(args.seeds)] if args.seeds else None,
                   steps=args.steps, batch_size=args.batch_size, max_length=args.max_length,
                   lr=args.lr, eval_every=args.eval_every, rank=args.rank, model=args.model, data_dir=args.data_dir or None,
                   device=args.device, workers=args.workers, pooling=args.pooling)
    return opts, args


def main(argv=None) -> None:
    opts, args = parse_args(argv)
    torch.set_num_threads(args.threads)
    _quiet_transformers()
    start = time.perf_counter()
    result = benchmark(opts)
    print(result["table"])
    print(f"\ntotal {time.perf_counter() - start:.0f} s", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"options": dataclasses.asdict(opts), **result}, out, indent=1)


if __name__ == "__main__":
    main()
