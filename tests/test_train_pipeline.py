"""The training pipeline end to end on one process: run directory, metrics, export, resume, bad input."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification

from scale_rank.cli import main
from scale_rank.config import ConfigError, load_config
from scale_rank.run_dir import RunDir, latest_checkpoint
from scale_rank.train import train
from tests.support.tiny import FAST_METHODS, overrides, tiny_model_dir

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny"))


def rebuilt_base(model_dir: Path, seed: int = 0):
    """The random base a run with train.seed=`seed` trained on (the loader seeds before building)."""
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(model_dir, num_labels=2))


@pytest.mark.parametrize("method", sorted(FAST_METHODS))
def test_run_writes_everything_and_export_matches_peft(method, model_dir, tmp_path):
    from peft import PeftModel
    torch.set_num_threads(1)
    cfg = load_config(None, overrides(model_dir, tmp_path / "run", method, eval_every=4))
    result = train(cfg, progress=False)
    run = tmp_path / "run"
    for name in ("run_config.yaml", "metrics.json", "final/trainable.safetensors", "adapter/adapter_config.json"):
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0.0 <= metrics["final"]["accuracy"] <= 1.0
    assert metrics["best"]["metrics"]["accuracy"] >= metrics["final"]["accuracy"]
    assert metrics["best"]["step"] in (4, 8, 12) and (run / "best/trainable.safetensors").is_file()
    assert (run / "rank_heatmap.png").is_file() and (run / "telemetry.jsonl").is_file()
    assert len(result.losses) == 12 and all(torch.isfinite(torch.tensor(result.losses)))
    adapter_config = json.loads((run / "adapter/adapter_config.json").read_text())
    assert adapter_config["rank_pattern"] == adapter_config["alpha_pattern"] == metrics["ranks"]

    from scale_rank.export import load_run
    trained, tokenizer, _ = load_run(run)
    batch = tokenizer(["the film was not good.", "i thought the plot was superb."], return_tensors="pt",
                      padding=True)
    peft_model = PeftModel.from_pretrained(rebuilt_base(model_dir), str(run / "adapter")).eval()
    with torch.no_grad():
        diff = (peft_model(**batch).logits - trained(**batch).logits).abs().max()
    assert diff <= 1e-5


def test_cli_reports_bad_input_before_training(model_dir, tmp_path, capsys):
    code = main(["train", *overrides(model_dir, tmp_path / "r", "adalora"), "-o", "method.t_init=20"])
    assert code == 2
    assert "t_init + t_final" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    assert main(["train", "-o", "method.name=adalorax"]) == 2
    assert "unknown method" in capsys.readouterr().err
    assert main(["train", *overrides(model_dir, tmp_path / "r2", "lora"), "-o", "train.batch_size=7",
                 "-o", "train.grad_accum=2"]) == 2
    assert "divisible" in capsys.readouterr().err


def test_refuses_to_overwrite_and_to_resume_a_different_run(model_dir, tmp_path):
    args = overrides(model_dir, tmp_path / "run", "adalora", steps=6, save_every=3)
    train(load_config(None, args), progress=False)
    with pytest.raises(ConfigError, match="--resume"):
        train(load_config(None, args), progress=False)
    other = overrides(model_dir, tmp_path / "run", "sora", steps=6)
    with pytest.raises(ConfigError, match="method settings differ"):
        train(load_config(None, other), resume=True, progress=False)


def _run_cli(args: list[str], env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), "--no-progress", *args],
                          env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)


@pytest.mark.parametrize("method", ["adalora", "increlora"])
def test_crash_and_resume_continues_exactly(method, model_dir, tmp_path):
    """Killed after step 7 (checkpoint at 6), resumed: same decisions and weights as an uninterrupted run."""
    from safetensors.torch import load_file
    whole = overrides(model_dir, tmp_path / "whole", method, steps=12, save_every=3)
    broken = overrides(model_dir, tmp_path / "broken", method, steps=12, save_every=3)
    assert _run_cli(sum((["-o", o] for o in whole), [])).returncode == 0
    crashed = _run_cli(sum((["-o", o] for o in broken), []), {"SCALE_RANK_CRASH_AFTER_STEP": "7"})
    assert crashed.returncode == 17, crashed.stderr[-2000:]
    assert (tmp_path / "broken/checkpoints/latest").read_text() == "step_00000006"
    resumed = _run_cli(sum((["-o", o] for o in broken), []) + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = load_file(str(tmp_path / "whole/final/trainable.safetensors"))
    b = load_file(str(tmp_path / "broken/final/trainable.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)
    history = [json.loads(line) for line in (tmp_path / "whole/ranks.jsonl").read_text().splitlines()]
    resumed_history = torch.load(tmp_path / "broken/final/controller.pt", weights_only=False)["history"]
    assert resumed_history == history


def test_interrupted_checkpoint_write_keeps_the_previous_one(model_dir, tmp_path, monkeypatch):
    from scale_rank.engines import LocalEngine  # one process
    args = overrides(model_dir, tmp_path / "run", "adalora", steps=9, save_every=3)
    calls = {"n": 0}
    real = LocalEngine.save_state

    def failing(self, directory):
        calls["n"] += 1
        if calls["n"] == 2:
            (directory / "engine.pt").write_bytes(b"partial")
            raise OSError("disk full")
        real(self, directory)
    monkeypatch.setattr(LocalEngine, "save_state", failing)
    with pytest.raises(OSError, match="disk full"):
        train(load_config(None, args), progress=False)
    assert latest_checkpoint(RunDir(tmp_path / "run")).name == "step_00000003"
    monkeypatch.setattr(LocalEngine, "save_state", real)
    result = train(load_config(None, args), resume=True, progress=False)
    assert result.adapter_dir is not None
