"""Each method's optimizer step beside LoRA's in the same two processes: the low-noise counterpart of
distributed_overhead.py, whose separate launches of one method each differ by several percent for the same code.

    python bench/paired_overhead.py                          # ddp,fsdp2,zero3; lora,adalora; 3 launches (3.6 min)
    python bench/paired_overhead.py --engines ddp --methods lora,adalora,adalora-noreg --launches 5

One launch = one engine: a torchrun of 2 CPU processes (gloo, 1 thread each, bench/paired_worker.py) builds one
training per method the way train() builds it and steps them in turn through the training loop's own step
(`scale_rank.train.optimizer_step`), on the same batches, the order rotating every step. Machine, model, task,
capacity and method settings are those of distributed_overhead.py (AdaLoRA decides at every step). Logging and
telemetry are left out (train()'s per-step extras).

Per launch and method: the median step on rank 0 (wall; CPU = the process's CPU time) over --steps timed
steps after --warmup; "vs LoRA": that median over LoRA's of the same launch. The table gives the median over
launches and, in brackets, the min-max.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from distributed_overhead import LABELS, add_setup_arguments, run_items  # noqa: E402
from tests.distributed.dist_launch import run_workers  # noqa: E402
from tests.support.tiny import tiny_model_dir  # noqa: E402

WORKER = REPO / "bench" / "paired_worker.py"


def launch(args, work: Path, model_dir: Path, engine: str, tag: str) -> list[list[list[list[float]]]]:
    """One launch of every method under `engine`; per rank, per method, [wall, CPU] of every timed step."""
    out = work / tag
    out.mkdir(parents=True)
    items: list[str] = []
    for method in args.methods:
        run = run_items(model_dir, out / method, engine, method, args.warmup + args.steps, args)
        items += (["::"] if items else []) + run
    code = run_workers(WORKER, out, [str(args.warmup), str(args.steps), *items], nproc=2, timeout=args.timeout)
    if code != 0:
        raise RuntimeError(f"launch {tag} failed ({code}):\n" + (out / "output.txt").read_text()[-4000:])
    return [json.loads((out / f"rec.rank{r}.json").read_text()) for r in (0, 1)]


def medians(steps: list[list[float]]) -> tuple[float, float]:
    """(median wall, median CPU) of one training's steps, in ms."""
    return (statistics.median(s[0] for s in steps) * 1e3, statistics.median(s[1] for s in steps) * 1e3)


def render(args, results: dict) -> str:
    lines = ["| engine | method | wall ms/step | wall vs LoRA [min-max] | CPU ms/step | CPU vs LoRA [min-max] | "
             "rank 1 wall vs LoRA [min-max] |", "|---|---|---:|---:|---:|---:|---:|"]
    for engine, launches in results.items():
        for m, method in enumerate(args.methods):
            cells = []
            for rank, part in ((0, 0), (0, 1), (1, 0)):
                values = [medians(ranks[rank][m])[part] for ranks in launches]
                ratios = [medians(ranks[rank][m])[part] / medians(ranks[rank][0])[part] for ranks in launches]
                cells.append((statistics.median(values), statistics.median(ratios), min(ratios), max(ratios)))
            (wall, wr, wlo, whi), (cpu, cr, clo, chi), (_, r1, r1lo, r1hi) = cells
            lines.append(f"| {LABELS[engine]} | {LABELS[method]} | {wall:.1f} | {wr:.3f} [{wlo:.3f}-{whi:.3f}] | "
                         f"{cpu:.1f} | {cr:.3f} [{clo:.3f}-{chi:.3f}] | {r1:.3f} [{r1lo:.3f}-{r1hi:.3f}] |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_setup_arguments(parser, "lora,adalora")
    parser.add_argument("--launches", type=int, default=3, help="launches per engine")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per training")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--json", help="write every launch's step times here")
    args = parser.parse_args(argv)
    args.engines, args.methods = args.engines.split(","), args.methods.split(",")
    if args.methods[0] != "lora":
        parser.error("--methods must start with lora (the baseline)")
    started = time.time()
    results: dict[str, list] = {engine: [] for engine in args.engines}
    with tempfile.TemporaryDirectory(prefix="paired_bench_") as tmp:
        work = Path(tmp)
        model_dir = tiny_model_dir(work / "model", layers=args.layers, hidden=args.hidden)
        for index in range(args.launches):
            for engine in args.engines:
                begin = time.time()
                results[engine].append(launch(args, work, model_dir, engine, f"l{index}_{engine}"))
                print(f"[launch {index} {engine}] {time.time() - begin:.0f} s", flush=True)
    print(f"\n{args.launches} launches per engine x {args.steps} timed steps ({args.warmup} warmup) per method; "
          f"total {(time.time() - started) / 60:.1f} min\n")
    print(render(args, results))
    if args.json:
        Path(args.json).write_text(json.dumps({"methods": args.methods, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
