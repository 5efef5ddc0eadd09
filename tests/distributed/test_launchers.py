"""The launch commands of the README start, train on the intended engine and finish, on CPU."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed.dist_launch import REPO, _free_port
from tests.support.tiny import overrides, tiny_model_dir

pytestmark = pytest.mark.dist
TRAIN = str(REPO / "launch" / "train.py")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny"))


def run(cmd: list[str], tmp_path: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", "/tmp/torch_ext"),
           "PYTHONPATH": str(REPO)}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "final metric" in done.stdout
    return json.loads((tmp_path / "run" / "metrics.json").read_text())


def args(model_dir: Path, tmp_path: Path) -> list[str]:
    return ["--no-progress", *overrides(model_dir, tmp_path / "run", "adalora", steps=6)]


def test_plain_python(model_dir, tmp_path):
    metrics = run([sys.executable, TRAIN, *args(model_dir, tmp_path)], tmp_path)
    assert (metrics["engine"], metrics["world_size"]) == ("single", 1)


def test_torchrun_ddp(model_dir, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), TRAIN, *args(model_dir, tmp_path)]
    metrics = run(cmd, tmp_path)
    assert (metrics["engine"], metrics["world_size"]) == ("ddp", 2)


@pytest.mark.parametrize("config,engine", [("fsdp2", "fsdp2"), ("fsdp1", "fsdp1"), ("zero3", "deepspeed")])
def test_accelerate_launch(config, engine, model_dir, tmp_path):
    accelerate = shutil.which("accelerate")
    assert accelerate, "accelerate is a dependency"
    cmd = [accelerate, "launch", "--config_file", f"launch/accelerate/{config}.yaml", "--main_process_port",
           str(_free_port()), TRAIN, *args(model_dir, tmp_path)]
    metrics = run(cmd, tmp_path)
    assert (metrics["engine"], metrics["world_size"]) == (engine, 2)


def test_deepspeed_launcher(model_dir, tmp_path):
    deepspeed = shutil.which("deepspeed")
    assert deepspeed, "deepspeed is a dependency"
    cmd = [deepspeed, "--num_gpus", "2", "--master_port", str(_free_port()), TRAIN,
           "--deepspeed", "ds_configs/zero2.json", *args(model_dir, tmp_path)]
    metrics = run(cmd, tmp_path)
    assert (metrics["engine"], metrics["world_size"]) == ("deepspeed", 2)


@pytest.mark.parametrize("engine", ["ddp", "zero2"])
def test_bf16_mixed_precision_runs(engine, model_dir, tmp_path):
    """bf16: autocast under DDP, DeepSpeed's bf16 optimizer under ZeRO (adapter masks applied in bf16)."""
    choice = ["train.deepspeed_config=ds_configs/zero2.json"] if engine == "zero2" else ["train.engine=ddp"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), TRAIN, *args(model_dir, tmp_path), "train.precision=bf16", *choice]
    metrics = run(cmd, tmp_path)
    assert metrics["world_size"] == 2 and metrics["total_rank"] > 0
