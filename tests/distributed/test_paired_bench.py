"""bench/paired_overhead.py: two trainings in the same 2 processes, each stepping through the loop's own step."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_paired_bench_times_every_method_on_both_ranks(tmp_path):
    out = tmp_path / "paired.json"
    cmd = [sys.executable, str(REPO / "bench" / "paired_overhead.py"), "--engines", "ddp", "--methods",
           "lora,adalora", "--launches", "1", "--steps", "3", "--warmup", "1", "--hidden", "64", "--layers", "1",
           "--json", str(out)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["methods"] == ["lora", "adalora"]
    ranks = record["results"]["ddp"][0]
    assert len(ranks) == 2
    for per_method in ranks:
        assert len(per_method) == 2
        for steps in per_method:
            assert len(steps) == 3 and all(wall > 0 and cpu > 0 for wall, cpu in steps)
    assert "| DDP | AdaLoRA |" in done.stdout
