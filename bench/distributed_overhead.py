"""What adaptive rank allocation costs in sharded training: 2 CPU processes (torchrun, gloo) under DDP,
FSDP2 and DeepSpeed ZeRO-3, LoRA against AdaLoRA (and optionally the other methods) at the same capacity.

    python bench/distributed_overhead.py                       # defaults: about 12 min on 2 CPU cores
    python bench/distributed_overhead.py --repeats 5 --engines ddp,zero3
    python bench/distributed_overhead.py --methods lora,adalora,sora,increlora,prilora --repeats 2
    python bench/distributed_overhead.py --no-timing            # only the traffic sweep (about 1 min)

Every run trains through scale_rank.train.train (the loop users run) in bench/distributed_worker.py, which
wraps RankController.observe/apply, the method's parts, the controller's collectives and the engine's
ShardAccess.write from outside the library. Model: a random-init BERT written by
tests.support.tiny.tiny_model_dir (--hidden 384, --layers 4, FFN 2 x hidden, 2 heads, MiniLM tokenizer),
adapters on the six matrices of every layer; synthetic sentiment task, global batch --batch-size 64
(32 per process), sequences padded to the longest in the batch (at most --max-length).

Capacity --capacity 8 per module for every method (LoRA r=8, AdaLoRA r_init=8, SoRA r_max=8, IncreLoRA
r_max=8, PRILoRA 4..12 over depth). Decisions as often as a method allows: AdaLoRA re-masks every step
(delta_t=1, t_init=1, t_final=1: steps 2..T-1 decide, the last is the final phase), IncreLoRA grows every
step, SoRA thresholds every step, PRILoRA prunes every 10 steps. "adalora-noreg" is AdaLoRA with gamma=0
(no orthogonality regularizer in forward/backward), which leaves the controller's own cost.

Measured (2 processes per launch):
1. Step time: one launch per engine and repeat trains every method of --methods side by side in the same two
   processes (distributed_worker.py --in-turn): each method's train() in its own thread, one optimizer step at
   a time, the order of the methods rotating every step, so every method meets the same heap, page-fault and
   cache state and the same load of a shared machine, step after step (separate launches of the same code
   differ by several percent). Each run takes --steps optimizer steps, the first --warmup untimed; a step is
   the time from the moment train()'s loop gets control back from its observer to its next observer call
   (forward, backward, observe, optimizer step, apply, the loop's logging, telemetry and loss all-reduce), as
   wall time and as the process's CPU time (which leaves out waiting for a core or for the other rank).
   ms/step: median over launches of each launch's median step. vs LoRA: median over launches of (method's
   median step / LoRA's in the same launch), min-max in brackets. vs LoRA step by step: median over launches
   of each launch's median of (method's step s / LoRA's step s), two steps that ran next to each other; a
   second estimate, not a more precise one: run against itself (5 launches of LoRA, AdaLoRA, LoRA, AdaLoRA
   in turn under DDP), LoRA/LoRA gave 0.97-1.07 this way and 0.97-1.07 as a ratio of medians, AdaLoRA/AdaLoRA
   0.94-1.14 and 0.92-1.14, so one launch resolves about +-7 % either way. Controller: observe() + apply()
   per step (rank 0, which also decides), its parts, and its median as a share of the median step.
2. Traffic: controller.comm.bytes_moved and .calls per optimizer step (timed steps), against adapter
   parameters and total capacity; plus a sweep (one launch of DDP runs with --sweep-steps steps) over
   hidden size and capacity showing the bytes follow total rank, not adapter parameters.
3. Memory, LoRA and AdaLoRA each alone in its processes (--memory-repeats launches of --memory-steps steps per
   engine and method): the peak RSS of each process over set-up and, restarted (/proc/self/clear_refs), over
   the optimizer steps (ru_maxrss); the steady RSS after each step; the RSS jump while the RankController is
   built (AdaLoRA's EMAs are allocated there); and the exact bytes of every tensor the method keeps.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.distributed.dist_launch import run_workers  # noqa: E402
from tests.support.tiny import tiny_model_dir  # noqa: E402

WORKER = REPO / "bench" / "distributed_worker.py"
ENGINE_ITEMS = {
    "ddp": ["train.engine=ddp"],
    "fsdp2": ["train.engine=fsdp2"],
    "fsdp1": ["train.engine=fsdp1"],
    "zero2": ["train.deepspeed_config=ds_configs/zero2.json"],
    "zero3": ["train.deepspeed_config=ds_configs/zero3.json"],
}
LABELS = {"ddp": "DDP", "fsdp2": "FSDP2", "fsdp1": "FSDP1", "zero2": "ZeRO-2", "zero3": "ZeRO-3",
          "lora": "LoRA", "adalora": "AdaLoRA", "adalora-noreg": "AdaLoRA, gamma=0", "sora": "SoRA",
          "increlora": "IncreLoRA", "prilora": "PRILoRA"}


def method_items(name: str, capacity: int) -> list[str]:
    if name == "adalora-noreg":  # AdaLoRA without its orthogonality regularizer: the controller's cost alone
        return method_items("adalora", capacity) + ["method.gamma=0"]
    options = {
        "lora": {"r": capacity},
        "adalora": {"r_init": capacity, "r_target": max(1, capacity // 2), "t_init": 1, "t_final": 1,
                    "delta_t": 1},
        "sora": {"r_max": capacity},
        "increlora": {"r_max": capacity, "r_target": max(1, capacity // 2), "incre_rank": 1, "t_init": 1,
                      "incre_interval": 1},
        "prilora": {"r_first": max(1, capacity // 2), "r_last": capacity + capacity // 2, "prune_interval": 10},
    }[name]
    return [f"method.name={name}"] + [f"method.{k}={v}" for k, v in options.items()]


def run_items(model_dir: Path, out_dir: Path, engine: str, method: str, steps: int, args) -> list[str]:
    return [*method_items(method, args.capacity), f"model.name_or_path={model_dir}", "model.random_init=true",
            "data.train_size=1024", "data.eval_size=32", f"data.max_length={args.max_length}",
            f"train.output_dir={out_dir}", f"train.total_steps={steps}", f"train.batch_size={args.batch_size}",
            "train.lr=0.0005", *ENGINE_ITEMS[engine]]


def launch(work: Path, tag: str, warmup: int, items: list[str], timeout: float,
           in_turn: bool = False) -> list[list[dict]]:
    """One torchrun of 2 processes (its runs one after another, or with `in_turn` one step at a time); per
    run, the records of both ranks."""
    out = work / tag
    out.mkdir(parents=True)
    code = run_workers(WORKER, out, [str(warmup), *(["--in-turn"] if in_turn else []), *items], nproc=2,
                       timeout=timeout)
    if code != 0:
        raise RuntimeError(f"launch {tag} failed ({code}):\n" + (out / "output.txt").read_text()[-4000:])
    ranks = [json.loads((out / f"rec.rank{r}.json").read_text()) for r in (0, 1)]
    return [list(runs) for runs in zip(*(r["runs"] for r in ranks))]


# -- summarising one run ----------------------------------------------------------------------------------
def step_times(rec: dict, clock: str = "") -> list[float]:
    """Seconds (wall, or CPU with clock "_cpu") of each timed step (steps warmup+1 .. T; never step 1, which
    starts with the set-up)."""
    starts, ends = rec["step_start" + clock], rec["step_end" + clock]
    return [ends[s - 1] - starts[s - 1] for s in range(max(2, rec["warmup"] + 1), len(ends) + 1)]


def paired_ratio(rec: dict, base: dict, clock: str = "") -> float:
    """Median over the timed steps of (this run's step s / the baseline's step s), both from one in-turn
    launch: the two steps ran next to each other, so a slower stretch of the shared machine slows both and
    drops out of their ratio; in the ratio of the two runs' medians it stays whenever it covers more of one
    run's timed steps than of the other's."""
    return statistics.median(m / b for m, b in zip(step_times(rec, clock), step_times(base, clock)))


def per_step(entries: list, first: int, last: int) -> list[float]:
    """Sum per step of (step, seconds) entries over steps first..last (steps without entries count 0)."""
    sums = {s: 0.0 for s in range(first, last + 1)}
    for step, seconds in entries:
        if step in sums:
            sums[step] += seconds
    return list(sums.values())


def timed_steps(rec: dict) -> tuple[int, int]:
    """First and last timed step (1-based)."""
    return max(2, rec["warmup"] + 1), len(rec["step_end"])


def summarise(ranks: list[dict]) -> dict:
    """Step times, the controller's parts and its traffic in one run (medians; step: rank 0, the ranks step
    together)."""
    r0 = ranks[0]
    first, last = timed_steps(r0)
    out = {"step_ms": 1e3 * statistics.median(step_times(r0))}
    for key in ("observe_s", "apply_s"):
        out[key[:-2] + "_ms"] = 1e3 * statistics.median(r0[key][first - 1:last])
    out["controller_ms"] = 1e3 * statistics.median(
        [o + a for o, a in zip(r0["observe_s"][first - 1:last], r0["apply_s"][first - 1:last])])
    out["step_cpu_ms"] = 1e3 * statistics.median(step_times(r0, "_cpu"))
    out["controller_cpu_ms"] = 1e3 * statistics.median(
        [o + a for o, a in zip(r0["observe_cpu_s"][first - 1:last], r0["apply_cpu_s"][first - 1:last])])
    out["controller_ms_rank1"] = 1e3 * statistics.median(
        [o + a for o, a in zip(ranks[1]["observe_s"][first - 1:last], ranks[1]["apply_s"][first - 1:last])])
    for name, entries in r0["parts"].items():
        out["part_" + name] = 1e3 * statistics.median(per_step(entries, first, last))
    out["loss_allreduce_ms"] = 1e3 * statistics.median(r0["loss_allreduce_s"][first - 1:last])
    b, c = r0["bytes"], r0["calls"]
    n = last - first + 1
    out["bytes_per_step"] = (b[last - 1] - b[first - 2]) / n
    out["calls_per_step"] = (c[last - 1] - c[first - 2]) / n
    out["bytes_max_step"] = max(y - x for x, y in zip(b, b[1:])) if len(b) > 1 else b[0]
    for key in ("adapter_params", "capacity", "modules", "sum_d_in", "ranks_end"):
        out[key] = r0[key]
    out["bytes_total"], out["steps"] = b[-1], len(b)
    out["bytes_same_on_ranks"] = ranks[1]["bytes"] == b
    return out


def summarise_memory(ranks: list[dict]) -> dict:
    """The memory of one run alone in its processes (means of the 2 ranks)."""
    first, last = timed_steps(ranks[0])
    out = {"adapter_params": ranks[0]["adapter_params"]}
    out["maxrss_mib"] = statistics.mean(r["maxrss_kib"] for r in ranks) / 1024  # training peak
    out["setup_maxrss_mib"] = statistics.mean(r["maxrss_setup_kib"] for r in ranks) / 1024
    out["peak_reset"] = all(r["peak_reset"] for r in ranks)
    out["rss_steady_mib"] = statistics.mean(statistics.median(r["rss_kib"][first - 1:last]) for r in ranks) / 1024
    out["init_rss_kib"] = statistics.mean(r["rss_controller_init_kib"] for r in ranks)
    out["init_rss_trimmed_kib"] = statistics.mean(r["rss_controller_init_trimmed_kib"] for r in ranks)
    out["rss_end_mib"] = statistics.mean(r["rss_end_kib"] for r in ranks) / 1024
    out["rss_end_trimmed_mib"] = statistics.mean(r["rss_end_trimmed_kib"] for r in ranks) / 1024
    out["anon_end_trimmed_mib"] = statistics.mean(r["anon_end_trimmed_kib"] for r in ranks) / 1024
    out["anon_init_trimmed_kib"] = statistics.mean(r["anon_controller_init_trimmed_kib"] for r in ranks)
    out["state_bytes"] = statistics.mean(r["method_state_bytes"] for r in ranks)
    out["scored_local"] = statistics.mean(r["scored_local_entries"] for r in ranks)
    return out


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else float("nan")


def fmt(x, digits=1):
    if isinstance(x, str):
        return x
    if x != x:
        return "-"
    return f"{x:,.{digits}f}"


# -- the benchmark ----------------------------------------------------------------------------------------
def timing(args, work: Path, model_dir: Path) -> dict:
    """results[engine][method] = list of per-launch summaries (one per repeat): every method of an engine
    in the same launch, one step at a time."""
    results = {e: {m: [] for m in args.methods} for e in args.engines}
    for rep in range(args.repeats):
        for engine in args.engines:
            tag = f"r{rep}_{engine}"
            start = time.time()
            items: list[str] = []
            for method in args.methods:
                items += (["::"] if items else []) + run_items(model_dir, work / tag / method, engine, method,
                                                               args.steps, args)
            runs = launch(work, tag, args.warmup, items, args.timeout, in_turn=True)
            base = runs[0][0]  # LoRA's rank 0 (--methods starts with lora)
            for method, ranks in zip(args.methods, runs):
                summary = summarise(ranks)
                if method != "lora":
                    summary["paired_vs_lora"] = paired_ratio(ranks[0], base)
                    summary["paired_cpu_vs_lora"] = paired_ratio(ranks[0], base, "_cpu")
                results[engine][method].append(summary)
            print(f"[{tag}] {time.time() - start:.0f} s launch, ms/step " + ", ".join(
                f"{m} {results[engine][m][-1]['step_ms']:.0f}" for m in args.methods) + "; step by step vs LoRA "
                + ", ".join(f"{m} {results[engine][m][-1]['paired_vs_lora']:.3f}" for m in args.methods[1:]),
                flush=True)
    return results


def memory(args, work: Path, model_dir: Path) -> dict:
    """memory[engine][method] = list of per-launch memory summaries: LoRA and AdaLoRA each alone in its
    processes (--memory-repeats launches of --memory-steps steps each)."""
    found = {e: {m: [] for m in ("lora", "adalora")} for e in args.engines}
    for rep in range(args.memory_repeats):
        for engine in args.engines:
            for method in ("lora", "adalora"):
                tag = f"m{rep}_{engine}_{method}"
                runs = launch(work, tag, 2, run_items(model_dir, work / tag / "run", engine, method,
                                                      args.memory_steps, args), args.timeout)
                found[engine][method].append(summarise_memory(runs[0]))
                print(f"[{tag}] training peak RSS {found[engine][method][-1]['maxrss_mib']:.0f} MiB", flush=True)
    return found


def sweep(args, work: Path) -> list[dict]:
    """One DDP launch: the controller's traffic over hidden size x capacity (AdaLoRA), and each method."""
    plan = []
    for hidden in args.sweep_hidden:
        for capacity in args.sweep_capacity:
            plan.append(("adalora", hidden, capacity))
    for method in ("sora", "increlora", "prilora"):
        for hidden in (args.sweep_hidden[0], args.sweep_hidden[-1]):
            plan.append((method, hidden, args.sweep_capacity[len(args.sweep_capacity) // 2]))
    items = []
    for i, (method, hidden, capacity) in enumerate(plan):
        model_dir = tiny_model_dir(work / "models" / f"h{hidden}", layers=args.layers, hidden=hidden)
        sub = argparse.Namespace(**{**vars(args), "capacity": capacity})
        run = run_items(model_dir, work / "sweep" / f"run{i}", "ddp", method, args.sweep_steps, sub)
        if method == "prilora":
            run = [x for x in run if not x.startswith("method.prune_interval")] + ["method.prune_interval=3"]
        items += (["::"] if items else []) + run
    runs = launch(work, "sweep", 1, items, args.timeout)
    rows = []
    for (method, hidden, capacity), ranks in zip(plan, runs):
        r0 = ranks[0]
        increments = [y - x for x, y in zip([0] + r0["bytes"], r0["bytes"])]
        call_increments = [y - x for x, y in zip([0] + r0["calls"], r0["calls"])]
        rows.append({"method": method, "hidden": hidden, "capacity_per_module": capacity,
                     "modules": r0["modules"], "adapter_params": r0["adapter_params"],
                     "capacity": r0["capacity"], "sum_d_in": r0["sum_d_in"], "steps": len(increments),
                     "bytes_per_step": increments, "calls_per_step": call_increments,
                     "same_on_rank1": ranks[1]["bytes"] == r0["bytes"]})
    return rows


def render(args, results: dict | None, mem: dict | None, rows: list[dict] | None, meta: dict) -> str:
    out = [f"Run {meta['date']} on {meta['machine']}; {meta['setup']}", ""]
    if results:
        out += ["**Step time** (rank 0; controller = observe + apply per step, its median as % of the "
                "median step; parts are medians per step, so they need not add up)", "",
                "| engine | method | wall ms/step (median) | wall vs LoRA [min-max] | wall vs LoRA step by step "
                "[min-max] (CPU) | fastest launch ms/step, vs LoRA's | CPU ms/step (median) | CPU vs LoRA [min-max] | "
                "controller wall ms (rank 0 / rank 1) | % of wall step | controller CPU ms | % of CPU step | loss "
                "all-reduce ms (the loop's, a reference gloo latency) |",
                "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for engine, per_method in results.items():
            base = per_method.get("lora")
            for method, runs in per_method.items():
                if not runs:
                    continue
                ratio = paired = "1"
                best = min(r["step_ms"] for r in runs)
                best_cell = f"{best:.0f}"
                if base and method != "lora":
                    ratios = [m["step_ms"] / b["step_ms"] for m, b in zip(runs, base)]
                    ratio = f"{median(ratios):.3f} [{min(ratios):.2f}-{max(ratios):.2f}]"
                    pairs = [r["paired_vs_lora"] for r in runs]
                    paired = (f"{median(pairs):.3f} [{min(pairs):.2f}-{max(pairs):.2f}] "
                              f"({median([r['paired_cpu_vs_lora'] for r in runs]):.3f})")
                    best_cell += f", {best / min(b['step_ms'] for b in base):.3f}"
                step = median([r["step_ms"] for r in runs])
                ctrl = median([r["controller_ms"] for r in runs])
                share = median([r["controller_ms"] / r["step_ms"] * 100 for r in runs])
                cpu_ratio = "1"
                if base and method != "lora":
                    ratios = [m["step_cpu_ms"] / b["step_cpu_ms"] for m, b in zip(runs, base)]
                    cpu_ratio = f"{median(ratios):.3f} [{min(ratios):.2f}-{max(ratios):.2f}]"
                cpu_cells = (f"{fmt(median([r['step_cpu_ms'] for r in runs]), 0)} | {cpu_ratio}")
                cpu_ctrl = (f"{fmt(median([r['controller_cpu_ms'] for r in runs]), 2)} | "
                            f"{fmt(median([r['controller_cpu_ms'] / r['step_cpu_ms'] * 100 for r in runs]), 2)}")
                out.append(
                    f"| {LABELS[engine]} | {LABELS[method]} | {fmt(step, 0)} | {ratio} | {paired} | {best_cell} | "
                    f"{cpu_cells} | "
                    f"{fmt(ctrl, 2)} / {fmt(median([r['controller_ms_rank1'] for r in runs]), 2)} | {fmt(share, 2)} | "
                    f"{cpu_ctrl} | "
                    f"{fmt(median([r['loss_allreduce_ms'] for r in runs]), 2)} |")
        out += ["", "**Where the step goes** (rank 0, ms per step, medians over launches of per-launch medians; "
                "Engine.forward/backward/step and the controller's parts)", "",
                "| engine | method | forward | backward | optimizer step | observe | of which partial_sums "
                "(EMA update + local sums) | decide (rank 0) | apply | of which ShardAccess.write | "
                "controller collectives (observe + apply) |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for engine, per_method in results.items():
            for method, runs in per_method.items():
                if not runs:
                    continue
                cols = [median([r.get(key, 0.0) for r in runs]) for key in (
                    "part_engine.forward", "part_engine.backward", "part_engine.step", "observe_ms",
                    "part_partial_sums", "part_decide", "apply_ms", "part_access.write", "part_collectives")]
                out.append(f"| {LABELS[engine]} | {LABELS[method]} | " + " | ".join(fmt(c, 1 if i < 3 else 2)
                                                                              for i, c in enumerate(cols)) + " |")
        out += ["", "**Controller traffic per optimizer step** (timed steps; comm.bytes_moved counts the "
                "controller's all-reduce and broadcast; the same on both ranks)", "",
                "| engine | method | bytes/step | calls/step | adapter params | capacity C (total rank) | "
                "bytes/step / C | bytes/step per adapter param |", "|---|---|---:|---:|---:|---:|---:|---:|"]
        for engine, per_method in results.items():
            for method, runs in per_method.items():
                if not runs:
                    continue
                r = runs[0]
                bps = median([x["bytes_per_step"] for x in runs])
                out.append(f"| {LABELS[engine]} | {LABELS[method]} | {fmt(bps, 0)} | "
                           f"{fmt(median([x['calls_per_step'] for x in runs]), 2)} | {r['adapter_params']:,} | "
                           f"{r['capacity']} | {fmt(bps / r['capacity'], 1)} | {bps / r['adapter_params']:.4f} |")
    if mem:
        out += ["", "**Memory per process, AdaLoRA - LoRA** (separate launches, each method alone in its processes, "
                f"{args.memory_steps} steps; per repeat the difference of the two launches (mean of the 2 ranks), "
                "median over repeats [min..max]. set-up peak = "
                "ru_maxrss once the controller is built; training peak = ru_maxrss over the optimizer steps "
                "(peak restarted after set-up); steady = median VmRSS after each timed step; init jump = "
                "VmRSS after - before RankController(...), where the EMAs are allocated; anon trimmed = "
                "RssAnon (no file-backed pages, e.g. libtorch code a first kernel call maps in) after glibc "
                "malloc_trim(0) (freed heap pages returned): live memory; end = VmRSS after the "
                "last step; state = exact bytes of the tensors the method keeps, per process)", "",
                "| engine | training peak LoRA MiB | delta training peak MiB | delta set-up peak MiB | "
                "delta steady RSS MiB | delta end anon RSS, trimmed MiB | delta init jump KiB | delta init "
                "jump, anon trimmed KiB | delta state bytes | state delta / scored local entry | scored local entries / "
                "adapter params | delta training peak B / adapter param |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

        def delta(key, ad, lo):
            values = [x[key] - y[key] for x, y in zip(ad, lo)]
            return median(values), values

        for engine, per_method in mem.items():
            lo, ad = per_method["lora"], per_method["adalora"]
            params, scored = ad[0]["adapter_params"], ad[0]["scored_local"]
            cells = []
            for key in ("maxrss_mib", "setup_maxrss_mib", "rss_steady_mib", "anon_end_trimmed_mib",
                        "init_rss_kib", "anon_init_trimmed_kib"):
                mid, values = delta(key, ad, lo)
                cells.append(f"{mid:+.1f} [{min(values):+.1f}..{max(values):+.1f}]")
            state = median([x["state_bytes"] for x in ad]) - median([x["state_bytes"] for x in lo])
            peak = delta("maxrss_mib", ad, lo)[0]
            reset = "" if all(x["peak_reset"] for x in ad + lo) else " (peak not restarted)"
            out.append(f"| {LABELS[engine]} | {fmt(median([x['maxrss_mib'] for x in lo]))}{reset} | "
                       + " | ".join(cells) + f" | {state:+,.0f} | {state / scored:.2f} | "
                       f"{scored:,.0f} / {params:,} | {peak * 2**20 / params:+.1f} |")
    if rows:
        out += ["", f"**Traffic sweep** (DDP, 2 processes, {args.sweep_steps} steps per run; bytes per step "
                "where the method reduces, max and mean over the run; C = total capacity, sum of r_max)", "",
                "| method | hidden | r per module | adapter params | C | sum d_in | bytes (max step) | "
                "bytes (mean/step) | calls (max step) | max bytes / C | max bytes / adapter param |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for row in rows:
            peak = max(row["bytes_per_step"])
            out.append(f"| {LABELS[row['method']]} | {row['hidden']} | {row['capacity_per_module']} | "
                       f"{row['adapter_params']:,} | {row['capacity']} | {row['sum_d_in']:,} | {peak:,} | "
                       f"{statistics.mean(row['bytes_per_step']):,.0f} | {max(row['calls_per_step'])} | "
                       f"{peak / row['capacity']:.1f} | {peak / row['adapter_params']:.4f} |")
    return "\n".join(out)


def add_setup_arguments(parser: argparse.ArgumentParser, methods: str) -> None:
    """The options this bench shares with paired_overhead.py: engines, methods (default `methods`), model, batch."""
    parser.add_argument("--engines", default="ddp,fsdp2,zero3", help=f"of {','.join(ENGINE_ITEMS)}")
    parser.add_argument("--methods", default=methods,
                        help="lora first; of lora,adalora,adalora-noreg,sora,increlora,prilora")
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--capacity", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64, help="global (both processes)")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=900, help="seconds per launch")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_setup_arguments(parser, "lora,adalora,adalora-noreg")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--memory-repeats", type=int, default=1,
                        help="launches of LoRA and of AdaLoRA alone per engine, for the memory table (0: none; "
                             "only with adalora in --methods)")
    parser.add_argument("--memory-steps", type=int, default=10)
    parser.add_argument("--sweep-hidden", default="128,256,384")
    parser.add_argument("--sweep-capacity", default="4,8,16")
    parser.add_argument("--sweep-steps", type=int, default=6)
    parser.add_argument("--no-sweep", action="store_true")
    parser.add_argument("--no-timing", action="store_true")
    parser.add_argument("--workdir", help="keep launches' outputs here (default: a temporary directory)")
    parser.add_argument("--json", help="write every launch's summary here")
    args = parser.parse_args(argv)
    args.engines = args.engines.split(",")
    args.methods = args.methods.split(",")
    args.sweep_hidden = [int(x) for x in args.sweep_hidden.split(",")]
    args.sweep_capacity = [int(x) for x in args.sweep_capacity.split(",")]
    if args.methods[0] != "lora":
        parser.error("--methods must start with lora (the baseline)")
    if args.steps - args.warmup < 3:
        parser.error("--steps must exceed --warmup by at least 3")
    if args.memory_repeats and args.memory_steps < 5:
        parser.error("--memory-steps must be at least 5 (2 warmup steps, then the steady RSS)")

    started = time.time()
    with tempfile.TemporaryDirectory(prefix="dist_bench_") as tmp:
        work = Path(args.workdir or tmp)
        work = work / datetime.datetime.now().strftime("%Y%m%d_%H%M%S")
        work.mkdir(parents=True)
        model_dir = tiny_model_dir(work / "models" / f"h{args.hidden}", layers=args.layers, hidden=args.hidden)
        results = None if args.no_timing else timing(args, work, model_dir)
        measure_memory = not args.no_timing and args.memory_repeats > 0 and "adalora" in args.methods
        mem = memory(args, work, model_dir) if measure_memory else None
        rows = None if args.no_sweep else sweep(args, work)
    import torch
    meta = {"date": datetime.date.today().isoformat(),
            "machine": f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), "
                       f"load average {os.getloadavg()[0]:.1f} at the end",
            "setup": (f"torch {torch.__version__}; 2 processes x 1 thread (gloo); random-init BERT hidden "
                      f"{args.hidden}, {args.layers} layers; global batch {args.batch_size}; capacity "
                      f"{args.capacity} per module; "
                      + ("" if args.no_timing else f"{args.repeats} repeats x {args.steps} steps "
                         f"({args.warmup} warmup) per engine and method; ")
                      + f"total {(time.time() - started) / 60:.1f} min")}
    print()
    print(render(args, results, mem, rows, meta))
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "results": results, "memory": mem, "sweep": rows},
                                              indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
