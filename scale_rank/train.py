"""One training loop for every engine: data order, micro-batches, the controller's two calls, evaluation,
atomic checkpoints, the final adapter state and its PEFT export.

Order in an optimizer step (docs/design.md): backward (all micro-batches) -> controller.observe() -> optimizer
step -> controller.apply() -> zero_grad. Under DeepSpeed the engine's step is that optimizer step.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import yaml

from . import run_dir as rd
from .checkpoint import load_checkpoint, save_checkpoint
from .comm import Collective, means_over_ranks
from .config import ConfigError, RunConfig, TrainConfig, TrainingDiverged
from .controller import RankController
from .data.tasks import (TaskData, batch_indices, build_task, loss_normaliser, micro_batches, padded_length,
                         select)
from .ds_config import micro_batch_size
from .engine import (ProcessInfo, adopt_launcher_precision, fsdp_shard_size, init_processes, refuse_unsupported,
                     resolve_engine)
from .engines import Engine, FSDPEngine, make_engine
from .inject import adapter_layers
from .methods import method_class
from .model import build_adapted_model, check_context, resolve_model_path
from .telemetry import Telemetry, TrainingMetrics

log = logging.getLogger(__name__)
# fault injection for tests: every process exits after this step / the last rank stops responding after it
_CRASH_AFTER = os.environ.get("SCALE_RANK_CRASH_AFTER_STEP")
_HANG_AFTER = os.environ.get("SCALE_RANK_HANG_AFTER_STEP")


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict[str, float]
    ranks: dict[str, int]
    adapter_dir: Path | None
    losses: list[float]
    history: list[dict]
    engine: Engine  # the trained, still wrapped model (e.g. to compare its outputs with an export)


def resolve_total_steps(cfg: RunConfig, train_size: int) -> int:
    if cfg.train.total_steps is not None:
        return cfg.train.total_steps
    if cfg.train.epochs is None:
        raise ConfigError("set train.total_steps or train.epochs")
    return max(1, math.floor(cfg.train.epochs * train_size / cfg.train.batch_size))


StepObserver = Callable[[int, RankController, float], None]


@dataclass(frozen=True)
class Job:
    """A resolved run: the validated config and what follows from it, fixed before the model loads."""

    cfg: RunConfig
    run: rd.RunDir
    proc: ProcessInfo
    engine_kind: str
    ds_config: str | None
    shard_size: int  # FSDP: ranks a parameter is sharded over (below the world size: hybrid sharding)
    task: TaskData
    micro_batch: int  # rows per forward on each process


@dataclass(frozen=True)
class Live:
    """What trains (the engine around the adapted model, the rank controller) and where scalars go."""

    engine: Engine
    controller: RankController
    report: TrainingMetrics


# train settings that change what a run computes: a resume must keep them (output, logging and saving may change)
RESUME_KEPT_TRAIN = ("lr", "weight_decay", "batch_size", "grad_accum", "total_steps", "warmup_steps",
                     "lr_schedule", "seed", "engine", "precision", "max_grad_norm", "fsdp_shard_size")


def check_resume_compatible(run: rd.RunDir, cfg: RunConfig) -> None:
    """A resume must continue the same run: same method, model, data and every train setting that changes
    the result; the first difference is named."""
    saved = yaml.safe_load(run.config.read_text())
    now = cfg.to_dict()
    for section in ("method", "model", "data"):
        if saved.get(section) != now[section]:
            raise ConfigError(f"cannot resume {run.path}: its {section} settings differ from this run's "
                              f"({saved.get(section)} vs {now[section]}); use a new train.output_dir")
    for key in RESUME_KEPT_TRAIN:
        before, after = saved.get("train", {}).get(key, getattr(TrainConfig, key)), now["train"][key]
        if before != after:
            raise ConfigError(f"cannot resume {run.path}: train.{key} was {before!r} and is now {after!r}, so the "
                              f"result would differ from an uninterrupted run; set train.{key}={before}")


def _main_decides(proc: ProcessInfo, decide: Callable[[], object]) -> object:
    """Run `decide` on the main process and give every process its result, or the ConfigError it raised."""
    outcome: list = [None, None]
    if proc.is_main:
        try:
            outcome[0] = decide()
        except ConfigError as error:
            outcome[1] = str(error)
    if dist.is_initialized() and proc.world_size > 1:
        dist.broadcast_object_list(outcome, src=0)
    if outcome[1] is not None:
        raise ConfigError(outcome[1])
    return outcome[0]


def _claim_run_dir(job: Job, resume: bool, overwrite: bool) -> Path | None:
    """Lock the run directory for this run; on resume return the newest verified checkpoint (its step's
    later decisions are cut from the event logs) and keep the saved config, else write the config."""
    if resume and overwrite:
        raise ConfigError("pass either --resume or --overwrite, not both")
    run, cfg, proc = job.run, job.cfg, job.proc

    def decide() -> str | None:
        rd.claim(run, "resume" if resume else "overwrite" if overwrite else "new")
        try:
            if not resume:
                run.config.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
                return None
            check_resume_compatible(run, cfg)
            checkpoint = rd.resume_checkpoint(run, proc.world_size)
            run.cut_event_logs(int(checkpoint.name.removeprefix("step_")))
            return str(checkpoint)
        except BaseException:
            rd.release_lock(run)
            raise
    checkpoint = _main_decides(proc, decide)
    return Path(checkpoint) if checkpoint is not None else None


def train(cfg: RunConfig, resume: bool = False, progress: bool = True,
          observer: StepObserver | None = None, overwrite: bool = False) -> RunResult:
    """Run one training job as `cfg` describes, on whatever processes the launcher started.

    The output directory must not hold another run unless `resume` (continue from its newest verified
    checkpoint) or `overwrite` (remove that run's files first).

    `observer(step, controller, loss)` is called after every optimizer step (tests record masks with it).
    """
    proc = init_processes(cfg.train.dist_timeout_minutes)
    job = resolve_job(cfg, proc)
    checkpoint = _claim_run_dir(job, resume, overwrite)
    try:
        return _run(job, checkpoint, progress, observer)
    except RuntimeError as error:
        if not any(word in str(error).lower() for word in ("timed out", "timeout")):
            raise
        raise TimeoutError(f"rank {proc.rank}: a collective waited longer than train.dist_timeout_minutes="
                           f"{cfg.train.dist_timeout_minutes:g}: another process stopped or died") from error
    finally:
        if proc.is_main:
            rd.release_lock(job.run)


def resolve_job(cfg: RunConfig, proc: ProcessInfo) -> Job:
    """Validate everything that can be checked before the model loads (engine, precision, the method against
    the world size, batch divisibility, context length), build the task, resolve the step count, validate
    the whole config, and fix the result in one Job."""
    kind, ds_path = resolve_engine(cfg.train, proc.world_size)
    adopt_launcher_precision(cfg.train)
    refuse_unsupported(kind, ds_path, cfg.model)
    shard_size = fsdp_shard_size(cfg.train, kind, proc.world_size)
    micro_batch = micro_batch_size(cfg.train, proc.world_size)
    cfg.data.validate()
    error = method_class(cfg.method.name).world_size_error(cfg.method, proc.world_size)
    if error:
        raise ConfigError(error)
    check_context(cfg)
    torch.manual_seed(cfg.train.seed)
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(cfg.model.name_or_path))
    task = build_task(cfg.data, tokenizer, cfg.train.seed)
    cfg.train.total_steps = resolve_total_steps(cfg, task.train_size)
    cfg.validate()
    return Job(cfg, rd.RunDir(cfg.train.output_dir), proc, kind, ds_path, shard_size, task, micro_batch)


def _run(job: Job, checkpoint: Path | None, progress: bool, observer: StepObserver | None) -> RunResult:
    cfg, proc, task = job.cfg, job.proc, job.task
    engine, controller = build_training(job)

    start = 0
    if checkpoint is not None:
        start = load_checkpoint(checkpoint, engine, controller, proc.rank)["step"]
        log.info("resumed from %s at step %d", checkpoint, start)

    telemetry = Telemetry(job.run.path, cfg.train.report_to, proc.is_main, cfg.to_dict())
    live = Live(engine, controller, TrainingMetrics(telemetry, cfg.train.log_every, cfg.train.batch_size))

    def on_step(step: int, controller: RankController, loss: torch.Tensor) -> None:
        telemetry.record(controller)  # after _record_decision: ranks.jsonl already has this step
        if observer is not None:
            observer(step, controller, _mean_over_ranks(loss))

    try:
        losses = _train_steps(job, live, start, progress, on_step)
        metrics = evaluate(engine, task, job.micro_batch, proc)
        live.report.evaluation(cfg.train.total_steps, metrics)
        keep_best(job, live, cfg.train.total_steps, metrics)
        adapter_dir = finish(job, live, metrics)
    finally:
        telemetry.close()  # pictures into run_dir, the W&B table artifact, wandb.finish()
    return RunResult(job.run.path, metrics, controller.ranks(), adapter_dir, losses, controller.history, engine)


def build_training(job: Job) -> tuple[Engine, RankController]:
    """The adapted model inside its engine (optimizer included) and the rank controller bound to its shards."""
    cfg, proc, task = job.cfg, job.proc, job.task
    model, _, method = build_adapted_model(cfg, cfg.model.num_labels or task.num_labels)
    layers = adapter_layers(model)
    groups = method.optimizer_groups(layers, cfg.train.lr, cfg.train.weight_decay)
    adapter_ids = {id(p) for g in groups for p in g["params"]}
    heads = [p for p in model.parameters() if p.requires_grad and id(p) not in adapter_ids]
    if heads:
        groups.append({"name": "heads", "params": heads, "lr": cfg.train.lr,
                       "weight_decay": cfg.train.weight_decay})
    engine = make_engine(job.engine_kind, model, groups, cfg.train, cfg.train.total_steps, proc, job.ds_config,
                         job.shard_size)
    controller = RankController(model, method, engine.access, Collective())
    controller.set_accumulation(cfg.train.grad_accum)
    method.track_optimizer(engine.optimizer)
    return engine, controller


def optimizer_step(job: Job, engine: Engine, controller: RankController,
                   step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Optimizer step `step` (from 0): every micro-batch's forward and backward, [clip], observe, the engine's
    step, apply, zero_grad (docs/design.md, section 6). Returns the step's loss on the device and the gradient
    norm before clipping (None without clipping)."""
    t, task, proc = job.cfg.train, job.task, job.proc
    indices = batch_indices(step, task.train_size, t.batch_size, t.seed)
    parts = micro_batches(indices, t.grad_accum, proc.rank, proc.world_size)
    length = padded_length(task.train, indices)
    normaliser = loss_normaliser(task, indices, proc.world_size, t.grad_accum)
    controller.set_grad_scale(engine.grad_scale() / t.grad_accum)
    step_loss = torch.zeros((), device=proc.device)
    for i, part in enumerate(parts):
        batch = select(task.train, part, length)
        if normaliser is not None:
            batch["num_items_in_batch"] = normaliser
        loss = engine.forward(batch).loss
        engine.backward(loss, t.grad_accum)
        step_loss += loss.detach().float() / t.grad_accum
        if i < len(parts) - 1:
            engine.micro_step()
    skipped = engine.prepare_step()
    grad_norm, pending = None, 1.0
    if t.max_grad_norm and not skipped:  # before observe: scores see the clipped gradients
        grad_norm, pending = engine.clip_gradients(t.max_grad_norm)
    controller.observe(skipped=skipped, grad_factor=pending)
    engine.step()
    controller.apply()
    engine.zero_grad()
    return step_loss, grad_norm


def _train_steps(job: Job, live: Live, start: int, progress: bool,
                 on_step: Callable[[int, RankController, torch.Tensor], None]) -> list[float]:
    """The optimizer steps from `start`. Losses stay on the device: the host reads them at log steps (and
    every step only when an observer asks for them), so a step does not wait for the device."""
    t, task, proc = job.cfg.train, job.task, job.proc
    engine, controller = live.engine, live.controller
    bar = _progress_bar(t.total_steps, start, progress and proc.is_main)
    losses: list[torch.Tensor] = []
    engine.train(True)
    for step in range(start, t.total_steps):
        step_loss, grad_norm = optimizer_step(job, engine, controller, step)
        losses.append(step_loss)
        _record_decision(job.run, controller, proc)
        logged = live.report.step(step + 1, step_loss, engine.lr(), grad_norm)
        if logged is not None and not math.isfinite(logged["train/loss"]):  # the same mean on every rank
            raise TrainingDiverged(
                f"the training loss is {logged['train/loss']} at step {step + 1} (mean of the steps since the "
                f"last log): the run diverged; lower train.lr or set train.max_grad_norm and start again")
        on_step(step + 1, controller, step_loss)
        if bar is not None:
            bar.update(1)
            if logged:
                bar.set_postfix(loss=f"{logged['train/loss']:.4f}", lr=f"{logged['train/lr']:.2e}",
                                budget=sum(controller.method.ranks().tolist()))
        done = step + 1
        if t.eval_every and done % t.eval_every == 0 and done < t.total_steps:
            metrics = evaluate(engine, task, job.micro_batch, proc)
            engine.train(True)
            live.report.evaluation(done, metrics)
            keep_best(job, live, done, metrics)
            if proc.is_main:
                log.info("step %d: %s", done, metrics)
        if t.save_every and done % t.save_every == 0 and done < t.total_steps:
            save_checkpoint(job.run, done, engine, controller, proc.rank,
                            lambda directory: save_trainable_state(directory, job, live))
        if _CRASH_AFTER is not None and done == int(_CRASH_AFTER):
            os._exit(17)
        if _HANG_AFTER is not None and done == int(_HANG_AFTER) and proc.rank == proc.world_size - 1:
            time.sleep(1e6)
    if bar is not None:
        bar.close()
    return means_over_ranks(losses)


def _progress_bar(total: int, start: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=start, desc="train", dynamic_ncols=True)


def _mean_over_ranks(value: torch.Tensor) -> float:
    return means_over_ranks([value])[0]


def _record_decision(run: rd.RunDir, controller: RankController, proc: ProcessInfo) -> None:
    """Append the latest allocation decision to ranks.jsonl (main process)."""
    if not proc.is_main or not controller.history or controller.history[-1]["step"] != controller.step_count:
        return
    run.append_event(run.ranks_log, controller.history[-1])


def _eval_indices(n: int, proc: ProcessInfo) -> torch.Tensor:
    """This rank's evaluation rows: an equal share for every rank, the last one padded by wrapping around
    (positions >= n are duplicates)."""
    per_rank = math.ceil(n / proc.world_size)
    return torch.arange(proc.rank * per_rank, (proc.rank + 1) * per_rank)


@torch.no_grad()
def evaluate(engine: Engine, task: TaskData, batch_size: int, proc: ProcessInfo) -> dict[str, float]:
    """The task metric on the evaluation split (`batch_size` rows per forward on each rank); every rank
    runs the same number of batches."""
    engine.train(False)
    if task.kind == "causal_lm":
        return _evaluate_loss(engine, task, batch_size, proc)
    n = len(task.eval["labels"])
    indices = _eval_indices(n, proc) % n
    predictions = []
    length = padded_length(task.eval, torch.arange(n))
    for chunk in indices.split(batch_size):
        logits = engine.forward(select(task.eval, chunk, length, labels=False)).logits
        predictions.append(logits.squeeze(-1).float().cpu() if task.regression else logits.argmax(-1).cpu())
    local = torch.cat(predictions)
    if proc.world_size > 1:
        gathered = [torch.empty_like(local) for _ in range(proc.world_size)]
        dist.all_gather(gathered, local)
        local = torch.cat(gathered)
    return task.metric(local[:n], task.eval["labels"])


def _evaluate_loss(engine: Engine, task: TaskData, batch_size: int, proc: ProcessInfo) -> dict[str, float]:
    """Token-averaged loss over every response token of the evaluation split, and its perplexity."""
    n = len(task.eval["labels"])
    positions = _eval_indices(n, proc)
    totals = torch.zeros(2, dtype=torch.float64)  # summed token loss, token count
    length = padded_length(task.eval, torch.arange(n))
    for chunk in positions.split(batch_size):
        batch = select(task.eval, chunk % n, length)
        batch["labels"][chunk >= n] = -100  # wrapped-around duplicates count nothing
        tokens = int((batch["labels"][:, 1:] != -100).sum())
        loss = engine.forward(batch).loss  # run on every rank alike (sharded engines gather in forward)
        if tokens:
            totals += torch.tensor([float(loss) * tokens, tokens], dtype=torch.float64)
    if proc.world_size > 1:
        dist.all_reduce(totals)
    return task.metric(totals[0], totals[1])


def save_trainable_state(directory: Path, job: Job, live: Live) -> None:
    """Full adapter tensors (gathered from any engine) + meta into `directory` (collective; rank 0 writes).

    Written beside every checkpoint and at the end, so `scale-rank export` works from any of them.
    """
    from safetensors.torch import save_file
    cfg = job.cfg
    state = live.engine.full_trainable_state()
    if job.proc.is_main:
        tmp = directory.with_name(f".tmp_{directory.name}_trainable")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(state, str(tmp / "trainable.safetensors"))
        (tmp / "meta.json").write_text(json.dumps({
            "num_labels": cfg.model.num_labels or job.task.num_labels,
            "base_model": resolve_model_path(cfg.model.name_or_path), "total_steps": cfg.train.total_steps}))
        torch.save(live.controller.state_dict(), tmp / "controller.pt")
        directory.mkdir(parents=True, exist_ok=True)
        for item in tmp.iterdir():
            os.replace(item, directory / item.name)
        tmp.rmdir()
    if dist.is_initialized():
        dist.barrier()


def keep_best(job: Job, live: Live, step: int, metrics: dict[str, float]) -> None:
    """Keep the adapter state with the best primary metric so far in run_dir/best (the papers report the
    best dev score); run_dir/best/best.json says which step and metrics (collective call)."""
    task = job.task
    record_path = job.run.best / "best.json"
    best = json.loads(record_path.read_text()) if record_path.is_file() else None
    if best is not None:
        previous, now = best["metrics"][task.metric_name], metrics[task.metric_name]
        if (previous >= now) if task.greater_is_better else (previous <= now):
            return
    save_trainable_state(job.run.best, job, live)
    if job.proc.is_main:
        rd.write_atomic(record_path, json.dumps({"step": step, "metric": task.metric_name, "metrics": metrics}))


def finish(job: Job, live: Live, metrics: dict) -> Path | None:
    """Save the final adapter state (full tensors from any engine), metrics, and the PEFT export."""
    from .export import export_run
    run = job.run
    save_trainable_state(run.final, job, live)
    if not job.proc.is_main:
        return None
    exported = export_run(run.path, run.adapter, overwrite=True)
    run.metrics.write_text(json.dumps(
        {"final": metrics, "best": json.loads((run.best / "best.json").read_text()),
         "ranks": exported["ranks"], "total_rank": sum(exported["ranks"].values()),
         "engine": live.engine.kind, "world_size": job.proc.world_size,
         "fsdp_shard_size": job.shard_size if isinstance(live.engine, FSDPEngine) else None},
        indent=2))
    return run.adapter
