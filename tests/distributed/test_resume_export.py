"""Kill-and-resume under 2 processes, and PEFT exports from sharded runs and their checkpoints."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForSequenceClassification

from scale_rank.export import export_run
from tests.distributed.dist_launch import run_workers
from tests.distributed.resume_worker import SAVE_EVERY
from tests.support.tiny import tiny_model_dir

pytestmark = pytest.mark.dist
WORKER = Path(__file__).with_name("resume_worker.py")
WEIGHT_ATOL = 1e-5  # float32 updates replayed from the same state and data: equal up to reduction order


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny"))


def peft_logits(model_dir: Path, adapter: Path, batch: dict) -> torch.Tensor:
    from peft import PeftModel
    torch.manual_seed(0)  # the run's seed: the random base it trained on
    base = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(model_dir, num_labels=2))
    with torch.no_grad():
        return PeftModel.from_pretrained(base, str(adapter)).eval()(**batch).logits


@pytest.mark.parametrize("engine", ["ddp", "fsdp2", "zero3"])
def test_killed_and_resumed_run_matches_uninterrupted(engine, model_dir, tmp_path):
    assert run_workers(WORKER, tmp_path, [engine, str(model_dir), "whole"]) == 0, \
        (tmp_path / "output.txt").read_text()[-3000:]
    os.environ["SCALE_RANK_CRASH_AFTER_STEP"] = str(SAVE_EVERY + 2)
    try:
        assert run_workers(WORKER, tmp_path, [engine, str(model_dir), "broken"]) != 0
    finally:
        del os.environ["SCALE_RANK_CRASH_AFTER_STEP"]
    assert (tmp_path / "broken/checkpoints/latest").read_text() == f"step_{SAVE_EVERY:08d}"
    assert not (tmp_path / "broken/final").exists()
    assert run_workers(WORKER, tmp_path, [engine, str(model_dir), "broken", "--resume"]) == 0, \
        (tmp_path / "output.txt").read_text()[-3000:]

    whole = load_file(str(tmp_path / "whole/final/trainable.safetensors"))
    resumed = load_file(str(tmp_path / "broken/final/trainable.safetensors"))
    assert whole.keys() == resumed.keys()
    assert all(v.numel() > 0 for v in whole.values())  # full tensors, never empty ZeRO-3 shards
    for key in whole:
        torch.testing.assert_close(resumed[key], whole[key], rtol=0, atol=WEIGHT_ATOL, msg=key)
    history = [torch.load(tmp_path / f"{run}/final/controller.pt", weights_only=False)["history"]
               for run in ("whole", "broken")]
    assert history[0] == history[1] and len(history[0]) > 1


@pytest.mark.parametrize("engine", ["fsdp2", "zero3"])
def test_export_from_sharded_run_and_checkpoint_loads_in_peft(engine, model_dir, tmp_path):
    assert run_workers(WORKER, tmp_path, [engine, str(model_dir), "run"]) == 0, \
        (tmp_path / "output.txt").read_text()[-3000:]
    trained = torch.load(tmp_path / "run_logits.pt")
    exported = peft_logits(model_dir, tmp_path / "run/adapter", trained["batch"])
    assert (exported - trained["logits"]).abs().max() <= 1e-5
    config = json.loads((tmp_path / "run/adapter/adapter_config.json").read_text())
    assert config["rank_pattern"] == config["alpha_pattern"]

    checkpoint = tmp_path / "run/checkpoints" / f"step_{2 * SAVE_EVERY:08d}"
    summary = export_run(checkpoint, tmp_path / "from_checkpoint")
    assert summary["ranks"]
    peft_logits(model_dir, tmp_path / "from_checkpoint", trained["batch"])  # loads in PEFT
