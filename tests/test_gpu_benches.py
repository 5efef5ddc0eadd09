"""bench/gpu_llm.py and bench/gpu_step_profile.py on CPU with a tiny Llama: the code paths a GPU run takes; and
bench/host_overhead.py, their CPU stand-in."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--device", "cpu", "--tiny", "--seq-len", "64", "--batch", "1"]


def run_bench(script: str, *args: str) -> None:
    subprocess.run([sys.executable, str(REPO / "bench" / script), *SMALL, *args], check=True, cwd=REPO,
                   capture_output=True, text=True, timeout=600)


def test_gpu_llm_lora_follows_peft_lora(tmp_path):
    out = tmp_path / "gpu_llm.json"
    run_bench("gpu_llm.py", "--steps", "4", "--warmup", "1", "--methods", "peft_lora,lora,adalora",
              "--json", str(out))
    results = {r["method"]: r for r in json.loads(out.read_text())["results"]}
    peft, lora = results["peft_lora"], results["lora"]
    assert lora["first_loss"] == pytest.approx(peft["first_loss"], rel=1e-3)  # B = 0: the base's loss
    assert lora["last_loss"] == pytest.approx(peft["last_loss"], rel=1e-2)
    assert lora["trainable"] == peft["trainable"]
    assert results["adalora"]["trainable"] > lora["trainable"]  # r_init 12 against r 8
    assert all(r["tokens_per_s"] > 0 for r in results.values())


def test_gpu_step_profile_counts_each_configuration(tmp_path):
    out = tmp_path / "profile.json"
    run_bench("gpu_step_profile.py", "--warmup", "1", "--steps", "2", "--profile-steps", "1",
              "--configurations", "lora,adalora,adalora_gamma0", "--json", str(out))
    results = {r["configuration"]: r for r in json.loads(out.read_text())["results"]}
    assert set(results) == {"lora", "adalora", "adalora_gamma0"}
    assert results["lora"]["kernels"] == 0  # no CUDA on this machine: host-side counts only
    assert results["lora"]["aten_ops"] < results["adalora_gamma0"]["aten_ops"] < results["adalora"]["aten_ops"]
    assert all(r["wall_ms"] > 0 and r["host_cpu_ms"] > 0 for r in results.values())


def test_gpu_step_profile_rejects_unknown_configurations():
    with pytest.raises(subprocess.CalledProcessError) as error:
        run_bench("gpu_step_profile.py", "--configurations", "lora,dora")
    assert "unknown configuration 'dora'" in error.value.stderr


def test_host_overhead_times_every_phase_of_each_method():
    spec = importlib.util.spec_from_file_location("host_overhead", REPO / "bench" / "host_overhead.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    results = bench.measure(["lora", "adalora"], layers=1, rounds=1, steps=2, warmup=1)
    assert set(results) == {"lora", "adalora"}
    for phases in results.values():
        assert set(phases) == set(bench.PHASES)
        assert phases["forward"] > 0 and phases["backward"] > 0 and all(v >= 0 for v in phases.values())
    text = bench.table(results, bench.PROJECTIONS)
    assert "| lora |" in text and "| adalora |" in text
