"""torchrun worker of bench/paired_overhead.py: several trainings in the same two processes, stepping in turn.

    paired_worker.py OUT_DIR WARMUP STEPS ITEMS... (each training's config items, trainings separated by "::")

Each training is built as train() builds it (`scale_rank.train.build_training`: its own model, engine and
optimizer, and a RankController) and steps through `scale_rank.train.optimizer_step`, the loop's step:
micro-batches forward and backward, observe, the engine's step, apply, zero_grad. The loop's logging and
telemetry are left out. Step s of every training sees the same batch, and the order of the trainings rotates
by one every step. Writes OUT_DIR/rec.rank<r>.json: per training, [wall s, CPU s] of every timed step.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from distributed_worker import split_items  # noqa: E402
from scale_rank.config import load_config  # noqa: E402
from scale_rank.engine import exit_processes, init_processes  # noqa: E402
from scale_rank.train import build_training, optimizer_step, resolve_job  # noqa: E402


def main() -> int:
    out_dir, warmup, steps, *items = sys.argv[1:]
    warmup, steps = int(warmup), int(steps)
    trainings, proc = [], None
    for config_items in split_items(items):
        cfg = load_config(None, config_items)
        proc = proc or init_processes(cfg.train.dist_timeout_minutes)
        job = resolve_job(cfg, proc)
        engine, controller = build_training(job)
        engine.train(True)
        trainings.append((job, engine, controller))
    times: list[list[list[float]]] = [[] for _ in trainings]
    n = len(trainings)
    for step in range(warmup + steps):
        for index in [(step + k) % n for k in range(n)]:
            job, engine, controller = trainings[index]
            wall, cpu = time.perf_counter(), time.process_time()
            optimizer_step(job, engine, controller, step)
            if step >= warmup:
                times[index].append([time.perf_counter() - wall, time.process_time() - cpu])
    Path(out_dir, f"rec.rank{proc.rank}.json").write_text(json.dumps(times))
    exit_processes(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
