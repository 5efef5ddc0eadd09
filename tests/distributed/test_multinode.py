"""Several machines, simulated on this one: two launcher invocations with node ranks 0 and 1, one process each,
meeting at a rendezvous on localhost, train with each launch form the README documents, and the run's
allocation decisions (ranks.jsonl) equal those of one process on the same data."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from scale_rank.config import load_config
from scale_rank.train import train
from tests.distributed.dist_launch import REPO, _free_port
from tests.support.tiny import overrides, tiny_model_dir

pytestmark = pytest.mark.dist
TRAIN = str(REPO / "launch" / "train.py")
STEPS = 8
ENGINE_SETTINGS = {"ddp": ["train.engine=ddp"], "fsdp2": ["train.engine=fsdp2"],
                   "zero3": ["train.deepspeed_config=ds_configs/zero3.json"]}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def one_process(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "run"
    train(load_config(None, overrides(model_dir, out, "adalora", steps=STEPS)), progress=False)
    return decisions(out)


def decisions(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "ranks.jsonl").read_text().splitlines()]


def run_nodes(commands: list[list[str]], tmp_path: Path) -> None:
    """Start one command per simulated node at once and wait for all of them."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", "/tmp/torch_ext"),
           "PYTHONPATH": str(REPO)}
    logs = [open(tmp_path / f"node{i}.txt", "w") for i in range(len(commands))]
    nodes = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
             for cmd, log in zip(commands, logs)]
    try:
        codes = [node.wait(timeout=600) for node in nodes]
    finally:
        for node, log in zip(nodes, logs):
            node.kill()
            log.close()
    for i, code in enumerate(codes):
        assert code == 0, f"node {i}: " + (tmp_path / f"node{i}.txt").read_text()[-4000:]


def run_args(model_dir: Path, tmp_path: Path, engine: str) -> list[str]:
    return ["--no-progress", *overrides(model_dir, tmp_path / "run", "adalora", steps=STEPS),
            *ENGINE_SETTINGS[engine]]


def check(tmp_path: Path, one_process: list[dict], engine: str) -> None:
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert metrics["engine"] == ("deepspeed" if engine == "zero3" else engine)
    assert decisions(tmp_path / "run") == one_process


@pytest.mark.parametrize("engine", sorted(ENGINE_SETTINGS))
def test_torchrun_with_a_c10d_rendezvous(engine, model_dir, one_process, tmp_path):
    endpoint = f"127.0.0.1:{_free_port()}"
    run_nodes([[sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
                "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, TRAIN,
                *run_args(model_dir, tmp_path, engine)] for node in (0, 1)], tmp_path)
    check(tmp_path, one_process, engine)


@pytest.mark.parametrize("engine", sorted(ENGINE_SETTINGS))
def test_accelerate_with_a_multinode_config(engine, model_dir, one_process, tmp_path):
    accelerate = shutil.which("accelerate")
    assert accelerate, "accelerate is a dependency"
    port = str(_free_port())
    settings = [a for a in run_args(model_dir, tmp_path, engine) if not a.startswith("train.engine")
                and not a.startswith("train.deepspeed_config")]  # the yaml file chooses the engine
    run_nodes([[accelerate, "launch", "--config_file", f"launch/accelerate/multinode_{engine}.yaml",
                "--machine_rank", str(node), "--num_machines", "2", "--num_processes", "2",
                "--main_process_ip", "127.0.0.1", "--main_process_port", port, TRAIN, *settings]
               for node in (0, 1)], tmp_path)
    check(tmp_path, one_process, engine)


def test_deepspeed_with_a_hostfile(model_dir, one_process, tmp_path):
    deepspeed = shutil.which("deepspeed")
    assert deepspeed, "deepspeed is a dependency"
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node1 slots=1\nnode2 slots=1\n")
    port = str(_free_port())
    settings = [a for a in run_args(model_dir, tmp_path, "zero3") if not a.startswith("train.deepspeed_config")]
    run_nodes([[deepspeed, "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node), "--master_addr",
                "127.0.0.1", "--master_port", port, TRAIN, "--deepspeed", "ds_configs/zero3.json", *settings]
               for node in (0, 1)], tmp_path)
    check(tmp_path, one_process, "zero3")


@pytest.mark.parametrize("config", ["multinode_fsdp2_hybrid", "multinode_fsdp1_hybrid"])
def test_accelerate_hybrid_sharding_on_two_machines(config, model_dir, one_process, tmp_path):
    """2 machines x 2 processes: each machine shards, the machines replicate (FSDP1 HYBRID_SHARD within a
    machine; FSDP2 a 2 x 2 mesh from the yaml's parallelism_config, sized here on the command line)."""
    accelerate = shutil.which("accelerate")
    port = str(_free_port())
    sizes = ["--parallelism_config_dp_replicate_size", "2", "--parallelism_config_dp_shard_size", "2"] \
        if "fsdp2" in config else []
    run_nodes([[accelerate, "launch", "--config_file", f"launch/accelerate/{config}.yaml", "--machine_rank",
                str(node), "--num_machines", "2", "--num_processes", "4", *sizes, "--main_process_ip", "127.0.0.1",
                "--main_process_port", port, TRAIN, "--no-progress",
                *overrides(model_dir, tmp_path / "run", "adalora", steps=STEPS)] for node in (0, 1)], tmp_path)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["world_size"] == 4 and metrics["engine"] == config.split("_")[1]
    assert metrics["fsdp_shard_size"] == 2
    assert decisions(tmp_path / "run") == one_process
