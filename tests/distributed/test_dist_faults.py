"""Faults under torchrun (2 CPU processes): a hung rank ends the job, a config error is one line, a diverged run
stops every process with one line, a resume with another world size is refused."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.distributed.dist_launch import REPO, _free_port
from tests.support.tiny import overrides, tiny_model_dir

pytestmark = pytest.mark.dist
TRAIN = str(REPO / "launch" / "train.py")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny"))


def torchrun(args: list[str], env_extra: dict | None = None, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO),
           **(env_extra or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(_free_port()), TRAIN, "--no-progress", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_a_hung_rank_ends_the_job_after_the_timeout(model_dir, tmp_path):
    args = overrides(model_dir, tmp_path / "run", "adalora", steps=12) + ["train.dist_timeout_minutes=0.1"]
    start = time.monotonic()
    done = torchrun(args, {"SCALE_RANK_HANG_AFTER_STEP": "2"})
    assert done.returncode != 0
    assert time.monotonic() - start < 150
    assert "rank 0: a collective waited longer than train.dist_timeout_minutes=0.1" in done.stderr


def test_a_config_error_is_one_line_from_the_main_process(model_dir, tmp_path):
    done = torchrun(overrides(model_dir, tmp_path / "run", "adalora") + ["method.t_init=20"])
    assert done.returncode != 0
    assert done.stderr.count("scale-rank: error:") == 1
    assert "t_init + t_final" in done.stderr


def test_a_diverged_run_stops_every_process_with_one_line(model_dir, tmp_path):
    """A learning rate far too large makes the loss NaN within a few steps: both processes see the same mean loss,
    stop at the same logged step, and the job ends with one line from the main process and no export."""
    args = overrides(model_dir, tmp_path / "run", "adalora", steps=12) + ["train.lr=1e8", "train.log_every=2"]
    done = torchrun(args)
    assert done.returncode != 0
    assert done.stderr.count("scale-rank: error:") == 1
    assert "TrainingDiverged" not in done.stderr  # no traceback from a process (torchrun prints its own)
    assert "the training loss is nan at step 2" in done.stderr and "lower train.lr" in done.stderr
    assert not (tmp_path / "run" / "final").exists()


def test_resume_with_another_world_size_is_refused(model_dir, tmp_path):
    args = overrides(model_dir, tmp_path / "run", "lora", steps=6, save_every=3)
    crashed = torchrun(args, {"SCALE_RANK_CRASH_AFTER_STEP": "4"})
    assert crashed.returncode != 0
    manifest = json.loads((tmp_path / "run/checkpoints/step_00000003/manifest.json").read_text())
    assert manifest["world_size"] == 2 and {"rank0.pt", "rank1.pt"} <= set(manifest["files"])
    done = subprocess.run([sys.executable, TRAIN, "--no-progress", *args, "--resume"], cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 2
    assert "written by 2 processes and this run has 1; launch 2 processes" in done.stderr
    assert done.stderr.count("scale-rank: error:") == 1 and "Traceback" not in done.stderr
    assert "taking over the lock of process" in done.stderr  # the crashed run's lock, left by a dead process
    assert not (Path(tmp_path / "run") / ".lock").exists()
