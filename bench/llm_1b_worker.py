"""Worker of bench/llm_1b_zero3.py (under torchrun): train with the given overrides, record per-rank peak
and current memory, step times, losses and the method's budget into OUT_DIR/rank<r>.json.

    llm_1b_worker.py OUT_DIR SECTION.KEY=VALUE ...
"""
from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import torch.distributed as dist

from scale_rank.config import load_config
from scale_rank.engine import exit_processes
from scale_rank.train import train


def current_rss_gib() -> float:
    """Resident memory now (the peak, ru_maxrss, is set by the model build before quantization)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def main() -> int:
    out_dir, *items = sys.argv[1:]
    started = time.perf_counter()
    record = {"step_s": [], "losses": [], "budgets": [], "rss_gib": []}
    last = [None]

    def observer(step, controller, loss):
        now = time.perf_counter()
        if last[0] is None:
            record["build_s"] = now - started  # model build, quantization, engine setup and the first step
        else:
            record["step_s"].append(now - last[0])
        last[0] = now
        record["losses"].append(loss)
        record["budgets"].append(int(controller.method.ranks().sum()))
        record["rss_gib"].append(current_rss_gib())
        if step == 1:
            record["adapter_parameters"] = sum(a.r_max * (a.d_in + a.d_out + 1) for a in controller.layers)

    train(load_config(None, items), progress=False, observer=observer)
    record["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    rank = dist.get_rank() if dist.is_initialized() else 0
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(record))
    return 0


if __name__ == "__main__":
    exit_processes(main())
