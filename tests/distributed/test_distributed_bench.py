"""bench/distributed_overhead.py: every method of an engine trains through train() in the same 2 processes, one
optimizer step at a time in a rotating order; memory comes from launches of one method each."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_distributed_bench_steps_methods_in_turn_and_measures_memory_alone(tmp_path):
    out, work = tmp_path / "bench.json", tmp_path / "work"
    steps = 5
    cmd = [sys.executable, str(REPO / "bench" / "distributed_overhead.py"), "--engines", "ddp", "--methods",
           "lora,adalora", "--repeats", "1", "--steps", str(steps), "--warmup", "1", "--hidden", "64", "--layers",
           "1", "--no-sweep", "--memory-steps", "5", "--workdir", str(work), "--json", str(out)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "| DDP | AdaLoRA |" in done.stdout and "**Memory per process, AdaLoRA - LoRA**" in done.stdout
    record = json.loads(out.read_text())
    for method in ("lora", "adalora"):
        (timed,) = record["results"]["ddp"][method]
        assert timed["step_ms"] > 0 and timed["step_cpu_ms"] > 0
        (alone,) = record["memory"]["ddp"][method]
        assert alone["maxrss_mib"] > 0
    assert 0.5 < record["results"]["ddp"]["adalora"][0]["paired_vs_lora"] < 2.0
    assert record["results"]["ddp"]["lora"][0]["bytes_per_step"] == 0  # the controller's traffic, per training
    assert record["results"]["ddp"]["adalora"][0]["bytes_per_step"] > 0

    (launch,) = work.glob("*/r0_ddp")
    for rank in (0, 1):
        runs = json.loads((launch / f"rec.rank{rank}.json").read_text())["runs"]
        assert [len(run["step_end"]) for run in runs] == [steps, steps]
        spans = sorted((run["step_start"][s - 1], run["step_end"][s - 1], s, index)
                       for index, run in enumerate(runs) for s in range(2, steps + 1))
        # one training works at a time, and in the schedule's order: step s's runs rotated by s - 1
        assert all(later[0] >= earlier[1] for earlier, later in zip(spans, spans[1:]))
        assert [(s, index) for _, _, s, index in spans] == [(s, (s - 1 + k) % 2) for s in range(2, steps + 1)
                                                            for k in range(2)]


def test_step_by_step_ratio_pairs_the_same_steps_and_skips_the_untimed_ones():
    """vs LoRA step by step: the median over the timed steps s (never step 1, nor the warmup) of the method's
    step s over LoRA's step s, in wall or CPU time."""
    sys.path.insert(0, str(REPO / "bench"))
    from distributed_overhead import paired_ratio

    def record(durations, cpu_scale=1.0):
        starts = [10.0 * s for s in range(len(durations))]
        return {"warmup": 2, "step_start": starts, "step_end": [a + d for a, d in zip(starts, durations)],
                "step_start_cpu": starts, "step_end_cpu": [a + d * cpu_scale for a, d in zip(starts, durations)]}

    lora = record([5.0, 1.0, 1.0, 2.0, 4.0, 2.0])
    # steps 3..6 timed: ratios 1.1, 1.05, 1.25, 1.05 -> median 1.075; steps 1 and 2 (x9, x0.1) left out
    method = record([45.0, 0.1, 1.1, 2.1, 5.0, 2.1], cpu_scale=0.5)
    assert paired_ratio(method, lora) == pytest.approx(1.075)
    assert paired_ratio(method, lora, "_cpu") == pytest.approx(0.5375)
    assert paired_ratio(lora, lora) == 1.0
