"""Rank telemetry: what the controller decided, as a table, a JSONL log, pictures, W&B and TensorBoard.

    telemetry = Telemetry(run_dir, report_to=cfg.train.report_to, is_main=proc.is_main, config=cfg.to_dict())
    ...each optimizer step, after controller.apply():
    telemetry.record(controller)          # logs only when the controller recorded a decision / change
    ...at the end:
    telemetry.close()                     # PNGs, the W&B table artifact

Files in the run directory (main process only):

    telemetry.jsonl      first line {"event": "layout", "modules": [...], "target": ...}; then one line per
                         event: {"event": "ranks", "step", "totals": {...}, "ranks": [...], "scores": [...]}
    rank_heatmap.png     final ranks, layers x matrix types, annotated
    rank_budget.png      total rank (and the target) over steps
    rank_timeline.png    ranks of every module (rows) over events (columns)

`report(run_dir)` rebuilds the final table from ranks.jsonl (the loop's {"step", "ranks"} log) plus the
layout line of telemetry.jsonl and re-draws the PNGs.

Scores: AdaLoRA's `last_scores` are per component; a module's score is the sum over its components.
IncreLoRA's are per module already. Both are the scores of the most recent decision (rank 0 only).
"""
from __future__ import annotations

import json
import logging
import math
import netrc
import os
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable
from urllib.parse import urlparse

import torch

from .comm import means_over_ranks
from .run_dir import METRICS_FILE, RANKS_FILE, TELEMETRY_FILE, WANDB_ID_FILE

log = logging.getLogger(__name__)

HEATMAP_FILE = "rank_heatmap.png"
BUDGET_FILE = "rank_budget.png"
TIMELINE_FILE = "rank_timeline.png"


# ---------------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------------


@dataclass
class ModuleInfo:
    """Static facts of one adapted module (what does not change during training)."""
    module: str
    layer: int
    kind: str
    capacity: int
    d_in: int
    d_out: int
    lam_trains: bool

    def params(self, rank: int) -> int:
        """Trainable adapter parameters at `rank`: A rows + B columns (+ lam entries where lam trains)."""
        return rank * (self.d_in + self.d_out) + (rank if self.lam_trains else 0)


@dataclass
class RankRow:
    module: str
    layer: int
    kind: str
    rank: int
    capacity: int
    score: float | None = None


@dataclass
class RankTable:
    """The allocation at one step: a row per module and the totals."""
    step: int
    modules: list[ModuleInfo]
    ranks: list[int]
    scores: list[float] | None = None
    target: int | None = None
    scheduled: int | None = None  # the method's scheduled budget at this step (AdaLoRA), if any
    method: str | None = None

    @property
    def rows(self) -> list[RankRow]:
        scores = self.scores or [None] * len(self.modules)
        return [RankRow(m.module, m.layer, m.kind, int(r), m.capacity, s)
                for m, r, s in zip(self.modules, self.ranks, scores)]

    @property
    def totals(self) -> dict:
        out = {"total_rank": int(sum(self.ranks)), "budget": int(sum(self.ranks)),
               "capacity": int(sum(m.capacity for m in self.modules)),
               "trainable_params": int(sum(m.params(r) for m, r in zip(self.modules, self.ranks)))}
        if self.target is not None:
            out["target"] = int(self.target)
        if self.scheduled is not None:
            out["scheduled_budget"] = int(self.scheduled)
        return out

    def by_kind(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for m, r in zip(self.modules, self.ranks):
            out[m.kind] = out.get(m.kind, 0) + int(r)
        return out

    def by_layer(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for m, r in zip(self.modules, self.ranks):
            out[m.layer] = out.get(m.layer, 0) + int(r)
        return out

    def event(self) -> dict:
        """The JSONL line of this table."""
        line = {"event": "ranks", "step": self.step, "totals": self.totals, "ranks": [int(r) for r in self.ranks]}
        if self.scores is not None:
            line["scores"] = [float(s) for s in self.scores]
        return line

    @classmethod
    def from_controller(cls, controller) -> "RankTable":
        method = controller.method
        modules = module_infos(controller.layers)
        step = controller.history[-1]["step"] if controller.history else controller.step_count
        scores = method.module_scores()
        return cls(step=step, modules=modules, ranks=[int(r) for r in method.ranks().tolist()],
                   scores=None if scores is None else [float(s) for s in scores], target=method.target_budget(),
                   scheduled=method.scheduled_budget(step), method=method.name)

    @classmethod
    def from_event(cls, modules: list[ModuleInfo], event: dict, target: int | None = None) -> "RankTable":
        totals = event.get("totals", {})
        return cls(step=int(event["step"]), modules=modules, ranks=[int(r) for r in event["ranks"]],
                   scores=event.get("scores"), target=totals.get("target", target),
                   scheduled=totals.get("scheduled_budget"))


def module_infos(layers) -> list[ModuleInfo]:
    return [ModuleInfo(layer.site, int(layer.layer_index), layer.kind, int(layer.r_max), int(layer.d_in),
                       int(layer.d_out), bool(layer.lora_lam.requires_grad)) for layer in layers]


def rank_matrix(table: RankTable) -> tuple[list[int], list[str], list[list[float]]]:
    """Final ranks as a layers x matrix types grid (NaN where a layer has no such module).

    Modules sharing a (layer, type) cell (e.g. encoder and decoder layer 3) are summed.
    """
    layers = sorted({m.layer for m in table.modules})
    kinds = list(dict.fromkeys(m.kind for m in table.modules))
    grid = [[math.nan] * len(kinds) for _ in layers]
    for m, r in zip(table.modules, table.ranks):
        i, j = layers.index(m.layer), kinds.index(m.kind)
        grid[i][j] = (0 if math.isnan(grid[i][j]) else grid[i][j]) + int(r)
    return layers, kinds, grid


def format_table(table: RankTable) -> str:
    rows = table.rows
    width = max([len("module")] + [len(r.module) for r in rows])
    kw = max([len("type")] + [len(r.kind) for r in rows])
    has_scores = table.scores is not None
    head = f"{'module':<{width}}  {'layer':>5}  {'type':<{kw}}  {'rank':>4}  {'cap':>4}"
    lines = [head + ("  score" if has_scores else ""), "-" * (len(head) + (11 if has_scores else 0))]
    for r in rows:
        line = f"{r.module:<{width}}  {r.layer:>5}  {r.kind:<{kw}}  {r.rank:>4}  {r.capacity:>4}"
        if has_scores:
            line += f"  {r.score:.4g}"
        lines.append(line)
    t = table.totals
    lines.append(f"total rank {t['total_rank']} (capacity {t['capacity']}"
                 + (f", target {t['target']}" if "target" in t else "") + ")")
    lines.append(f"trainable adapter parameters {t['trainable_params']}")
    lines.append("by type: " + ", ".join(f"{k} {v}" for k, v in table.by_kind().items()))
    lines.append("by layer: " + ", ".join(f"{k} {v}" for k, v in sorted(table.by_layer().items())))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Pictures
# ---------------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def heatmap_figure(table: RankTable):
    plt = _pyplot()
    import numpy as np
    layers, kinds, grid = rank_matrix(table)
    data = np.array(grid, dtype=float)
    fig, ax = plt.subplots(figsize=(2.5 + 1.1 * len(kinds), 2.6 + 0.45 * len(layers)))
    vmax = max(m.capacity for m in table.modules) if table.modules else 1
    image = ax.imshow(np.ma.masked_invalid(data), cmap="viridis", vmin=0, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(kinds)), kinds, rotation=30, ha="right")
    ax.set_yticks(range(len(layers)), [str(l) for l in layers])
    ax.set_xlabel("matrix type")
    ax.set_ylabel("layer")
    ax.set_title(f"ranks at step {table.step} (total {sum(table.ranks)})")
    for i in range(len(layers)):
        for j in range(len(kinds)):
            if not math.isnan(data[i, j]):
                ax.text(j, i, f"{int(data[i, j])}", ha="center", va="center",
                        color="white" if data[i, j] < 0.6 * vmax else "black", fontsize=8)
    from matplotlib.ticker import MaxNLocator
    fig.colorbar(image, ax=ax, label="rank", ticks=MaxNLocator(integer=True))
    fig.tight_layout()
    return fig


def plot_rank_heatmap(table: RankTable, path: str | Path) -> Path:
    """Layers x matrix types of `table`'s ranks, annotated with the numbers (PNG)."""
    fig = heatmap_figure(table)
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)
    return Path(path)


def plot_budget(events: Iterable[dict], path: str | Path) -> Path:
    """Total rank over steps (step-wise), with the target and the scheduled budget where known (PNG)."""
    plt = _pyplot()
    events = list(events)
    steps = [e["step"] for e in events]
    totals = [sum(e["ranks"]) for e in events]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if steps:
        ax.step(steps, totals, where="post", marker=".", label="total rank")
        scheduled = [(e["step"], e.get("totals", {}).get("scheduled_budget")) for e in events]
        scheduled = [(s, b) for s, b in scheduled if b is not None]
        if scheduled:
            ax.plot(*zip(*scheduled), linestyle=":", label="scheduled budget")
        targets = [e.get("totals", {}).get("target") for e in events]
        target = next((t for t in reversed(targets) if t is not None), None)
        if target is not None:
            ax.axhline(target, color="grey", linestyle="--", label=f"target {target}")
    ax.set_xlabel("step")
    ax.set_ylabel("total rank")
    ax.set_title("rank budget")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def timeline_matrix(modules: list[ModuleInfo], events: list[dict]) -> list[list[int]]:
    """Ranks of every module (rows, module order) at every event (columns)."""
    return [[int(e["ranks"][k]) for e in events] for k in range(len(modules))]


def plot_rank_timeline(modules: list[ModuleInfo], events: Iterable[dict], path: str | Path) -> Path:
    """Heatmap of (layer, type) rows x events: how the allocation moved (PNG)."""
    plt = _pyplot()
    import numpy as np
    events = list(events)
    data = np.array(timeline_matrix(modules, events), dtype=float).reshape(len(modules), len(events))
    fig, ax = plt.subplots(figsize=(min(16, 2 + 0.25 * max(1, len(events))), 1 + 0.22 * len(modules)))
    image = ax.imshow(data, cmap="viridis", aspect="auto", interpolation="nearest", vmin=0,
                      vmax=max([m.capacity for m in modules] + [1]))
    ax.set_yticks(range(len(modules)), [f"{m.layer}/{m.kind}" for m in modules], fontsize=6)
    ticks = list(range(0, len(events), max(1, len(events) // 10)))
    ax.set_xticks(ticks, [str(events[i]["step"]) for i in ticks])
    ax.set_xlabel("step (at each event)")
    ax.set_title("ranks over time")
    fig.colorbar(image, ax=ax, label="rank")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def write_pictures(run_dir: Path, modules: list[ModuleInfo], events: list[dict], final: RankTable) -> list[Path]:
    run_dir = Path(run_dir)
    paths = [plot_rank_heatmap(final, run_dir / HEATMAP_FILE), plot_budget(events, run_dir / BUDGET_FILE)]
    if events and modules:
        paths.append(plot_rank_timeline(modules, events, run_dir / TIMELINE_FILE))
    return paths


# ---------------------------------------------------------------------------------------------------
# Sinks
# ---------------------------------------------------------------------------------------------------


class TelemetrySink:
    """Receives every rank event; `close()` once at the end."""

    def log_event(self, step: int, table: RankTable) -> None:
        raise NotImplementedError

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """Training scalars (train/loss, train/lr, train/samples_per_s, eval/<metric>); files ignore them."""

    def close(self) -> None:
        pass


def _layout_line(table: RankTable) -> dict:
    return {"event": "layout", "method": table.method, "target": table.target,
            "modules": [asdict(m) for m in table.modules]}


class JsonlSink(TelemetrySink):
    """run_dir/telemetry.jsonl: a layout line, then one line per event (appends, so resumes continue it)."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / TELEMETRY_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._has_layout = self.path.is_file() and self.path.stat().st_size > 0

    def log_event(self, step: int, table: RankTable) -> None:
        with open(self.path, "a") as out:
            if not self._has_layout:
                out.write(json.dumps(_layout_line(table)) + "\n")
                self._has_layout = True
            out.write(json.dumps(table.event()) + "\n")


class PictureSink(TelemetrySink):
    """Keeps the events; at close draws the heatmap, the budget curve and the timeline into run_dir.

    The curves use the run directory's ranks.jsonl / telemetry.jsonl when they hold more events (a resumed
    run), else the events seen by this process.
    """

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.events: list[dict] = []
        self.last: RankTable | None = None
        self.paths: list[Path] = []

    def log_event(self, step: int, table: RankTable) -> None:
        self.events.append(table.event())
        self.last = table

    def close(self) -> None:
        if self.last is None:
            return
        events = self.events
        try:  # after a resume the files hold the events from before it too
            _, on_disk, _ = load_run(self.run_dir)
            if len(on_disk) > len(events) and on_disk[-1]["ranks"] == events[-1]["ranks"]:
                events = on_disk
        except (OSError, ValueError, KeyError, TypeError):
            pass
        self.paths = write_pictures(self.run_dir, self.last.modules, events, self.last)


def scalars(table: RankTable) -> dict[str, float]:
    """Per-event scalars: totals, per matrix type and per layer sums."""
    t = table.totals
    out = {"rank/total": t["total_rank"], "rank/budget": t["budget"], "params/trainable": t["trainable_params"]}
    if "target" in t:
        out["rank/target"] = t["target"]
    if "scheduled_budget" in t:
        out["rank/scheduled_budget"] = t["scheduled_budget"]
    out.update({f"rank/type/{k}": v for k, v in table.by_kind().items()})
    out.update({f"rank/layer/{k}": v for k, v in table.by_layer().items()})
    return out


def wandb_credentials() -> bool:
    """Whether wandb would find an API key: WANDB_API_KEY, or a netrc entry for its host (`wandb login`)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_mode() -> str | None:
    """None (wandb decides, honouring WANDB_MODE) unless there are no credentials: then "offline", said once."""
    if os.environ.get("WANDB_MODE") or wandb_credentials():
        return None
    log.warning("W&B: no credentials (WANDB_API_KEY or `wandb login`): logging offline into the run "
                "directory; `wandb sync` uploads it later")
    return "offline"


class WandbSink(TelemetrySink):
    """Weights & Biases, project "scale_rank" (WANDB_PROJECT): online when wandb finds credentials, offline
    otherwise or with WANDB_MODE=offline."""

    def __init__(self, run_dir: str | Path, config: dict | None = None, name: str | None = None):
        import wandb
        self.wandb = wandb
        mode = wandb_mode()
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        id_file = run_dir / WANDB_ID_FILE  # a resumed run continues the same W&B run
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        id_file.write_text(run_id)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "scale_rank"), dir=str(run_dir),
                              mode=mode, config=config, name=name or run_dir.name,
                              id=run_id, resume="allow", reinit="finish_previous")
        self.last: RankTable | None = None
        self.step = 0  # wandb drops anything logged to a step below one it has seen

    def log_event(self, step: int, table: RankTable) -> None:
        self.log_metrics(step, scalars(table))
        self.last = table

    def log_metrics(self, step: int, metrics: dict) -> None:
        self.step = max(self.step, step)
        self.run.log(metrics, step=self.step)

    def close(self) -> None:
        wandb, run = self.wandb, self.run
        try:
            if self.last is not None:  # at the end of training, after the last decision's step
                plt = _pyplot()
                fig = heatmap_figure(self.last)
                self.log_metrics(self.last.step, {"rank/heatmap": wandb.Image(fig)})
                plt.close(fig)
                columns = ["module", "layer", "type", "rank", "capacity", "score"]
                data = [[r.module, r.layer, r.kind, r.rank, r.capacity, r.score] for r in self.last.rows]
                table = wandb.Table(columns=columns, data=data)
                self.log_metrics(self.last.step, {"rank/final_table": table})
                artifact = wandb.Artifact(f"final_ranks-{run.id}", type="rank_table")
                artifact.add(table, "final_ranks")
                run.log_artifact(artifact)
                run.summary.update({f"final/{k}": v for k, v in self.last.totals.items()})
        finally:
            run.finish()


class TensorBoardSink(TelemetrySink):
    """TensorBoard scalars under run_dir/tensorboard (needs the tensorboard package)."""

    def __init__(self, run_dir: str | Path):
        from torch.utils.tensorboard import SummaryWriter  # ImportError without tensorboard
        self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def log_event(self, step: int, table: RankTable) -> None:
        self.log_metrics(step, scalars(table))

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


def make_sinks(run_dir: str | Path, report_to: Iterable[str] = (), is_main: bool = True,
               config: dict | None = None) -> list[TelemetrySink]:
    """JSONL and pictures always; "wandb" / "tensorboard" when in report_to. Nothing off the main process."""
    if not is_main:
        return []
    if isinstance(report_to, str):
        report_to = report_to.split(",")
    report_to = {item.strip().lower() for item in (report_to or ())}
    sinks: list[TelemetrySink] = [JsonlSink(run_dir), PictureSink(run_dir)]
    if "wandb" in report_to or "all" in report_to:
        sinks.append(WandbSink(run_dir, config))
    if "tensorboard" in report_to or "all" in report_to:
        try:
            sinks.append(TensorBoardSink(run_dir))
        except ImportError:
            log.warning("report_to has tensorboard but the tensorboard package is not installed: skipped")
    return sinks


class Telemetry:
    """Feeds the controller's decisions to the sinks (main process)."""

    def __init__(self, run_dir: str | Path, report_to: Iterable[str] = (), is_main: bool = True,
                 config: dict | None = None, sinks: list[TelemetrySink] | None = None):
        self.sinks = sinks if sinks is not None else make_sinks(run_dir, report_to, is_main, config)
        self._logged_step: int | None = None
        self.closed = False

    def record(self, controller, force: bool = False) -> RankTable | None:
        """Log the controller's latest history entry if it is new (as the loop's ranks.jsonl does)."""
        if not self.sinks or not controller.history:
            return None
        step = controller.history[-1]["step"]
        if not force and (step != controller.step_count or step == self._logged_step):
            return None
        table = RankTable.from_controller(controller)
        self.log(table)
        return table

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """Training scalars on the rank panels' step axis (main process)."""
        for sink in self.sinks:
            sink.log_metrics(step, metrics)

    def log(self, table: RankTable) -> None:
        self._logged_step = table.step
        for sink in self.sinks:
            sink.log_event(table.step, table)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for sink in self.sinks:
            try:
                sink.close()
            except Exception:  # telemetry never fails a finished training run
                log.exception("telemetry sink %s failed to close", type(sink).__name__)


class TrainingMetrics:
    """The loop's scalars for the sinks, on the rank panels' step axis: every `every` steps the window's mean
    loss (over steps and ranks), the learning rate, samples per second and, when gradients are clipped, the
    mean gradient norm before clipping; eval/<metric> at every evaluation.

    Losses and norms stay device tensors until a logged step, which reads them back in one reduction, so
    the steps between do not wait for the device. Every rank calls `step` (the reduction is collective).
    """

    def __init__(self, telemetry: Telemetry, every: int, batch_size: int):
        self.telemetry, self.every, self.batch_size = telemetry, every, batch_size
        self._losses: list[torch.Tensor] = []
        self._norms: list[torch.Tensor] = []
        self._since = time.perf_counter()

    def step(self, step: int, loss: torch.Tensor, lr: float,
             grad_norm: torch.Tensor | None = None) -> dict[str, float] | None:
        """Record one step's loss on this rank; on a logged step returns what was logged."""
        self._losses.append(loss.detach().float().reshape(()))
        if grad_norm is not None:
            self._norms.append(grad_norm.detach().float().reshape(()).to(self._losses[-1].device))
        if not self.every or step % self.every:
            return None
        now = time.perf_counter()
        values = means_over_ranks([torch.stack(self._losses).mean()] + ([torch.stack(self._norms).mean()]
                                                                        if self._norms else []))
        metrics = {"train/loss": values[0], "train/lr": lr,
                   "train/samples_per_s": len(self._losses) * self.batch_size / max(now - self._since, 1e-9)}
        if self._norms:
            metrics["train/grad_norm"] = values[1]
        self.telemetry.log_metrics(step, metrics)
        self._losses, self._norms, self._since = [], [], now
        return metrics

    def evaluation(self, step: int, metrics: dict[str, float]) -> None:
        self.telemetry.log_metrics(step, {f"eval/{key}": value for key, value in metrics.items()})


# ---------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_run(run_dir: str | Path) -> tuple[list[ModuleInfo], list[dict], dict]:
    """(modules, events, layout line) of a run directory.

    Events come from ranks.jsonl (the loop's record) when present, enriched with the totals / scores of
    telemetry.jsonl at the same step; otherwise from telemetry.jsonl alone.
    """
    run_dir = Path(run_dir)
    lines = _read_jsonl(run_dir / TELEMETRY_FILE)
    layouts = [line for line in lines if line.get("event") == "layout"]
    telemetry = [line for line in lines if line.get("event") == "ranks"]
    history = _read_jsonl(run_dir / RANKS_FILE)
    layout = layouts[-1] if layouts else {}
    if layout:
        modules = [ModuleInfo(**m) for m in layout["modules"]]
    else:
        n = len(history[-1]["ranks"]) if history else 0
        modules = [ModuleInfo(f"module_{k}", k, "?", 0, 0, 0, False) for k in range(n)]
        log.warning("%s has no %s: module names, capacities and parameter counts are unknown",
                    run_dir, TELEMETRY_FILE)
    if not history:
        return modules, telemetry, layout
    by_step = {e["step"]: e for e in telemetry}
    events = []
    for entry in history:
        rich = by_step.get(entry["step"])
        if rich is not None and rich["ranks"] == entry["ranks"]:
            events.append(rich)
        else:
            events.append({"event": "ranks", "step": entry["step"], "ranks": entry["ranks"]})
    return modules, events, layout


def report(run_dir: str | Path, pictures: bool = True) -> str:
    """The final rank table and totals of a run directory (and its metrics); re-draws the PNGs there."""
    run_dir = Path(run_dir)
    modules, events, layout = load_run(run_dir)
    if not events:
        raise FileNotFoundError(f"{run_dir} has no {RANKS_FILE} or {TELEMETRY_FILE}: nothing to report")
    final = RankTable.from_event(modules, events[-1], layout.get("target"))
    out = [f"run {run_dir}" + (f" ({layout['method']})" if layout.get("method") else ""),
           f"final allocation at step {final.step} ({len(events)} events)", format_table(final)]
    metrics_path = run_dir / METRICS_FILE
    if metrics_path.is_file():
        metrics = json.loads(metrics_path.read_text())
        final_metrics = metrics.get("final", {})
        if final_metrics:
            out.append("metrics: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, (int, float)) else f"{k} {v}"
                                               for k, v in final_metrics.items()))
        if "total_rank" in metrics and metrics["total_rank"] != final.totals["total_rank"]:
            out.append(f"note: metrics.json total_rank {metrics['total_rank']} (exported components with a "
                       "non-zero gate) differs from the controller's")
    if pictures:
        paths = write_pictures(run_dir, modules, events, final)
        out.append("pictures: " + ", ".join(str(p) for p in paths))
    return "\n".join(out)
