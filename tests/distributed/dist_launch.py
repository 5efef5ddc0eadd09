"""Run a worker script in several CPU processes with torchrun (gloo); the workers save results to a dir."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_workers(script: str | Path, out_dir: str | Path, args: list[str], nproc: int = 2,
                timeout: float = 900) -> int:
    """`torchrun --nproc_per_node nproc script out_dir *args` on CPU; its exit code (-1: timed out).

    The workers' output goes to out_dir/output.txt; what they save lies in out_dir. The first DeepSpeed
    run JIT-builds CPU ops (minutes on 2 cores) into TORCH_EXTENSIONS_DIR; later runs reuse them.
    """
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", "/tmp/torch_ext")  # DeepSpeed's JIT-built CPU ops, built once
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["CUDA_VISIBLE_DEVICES"] = ""  # CPU + gloo everywhere, also on a machine with GPUs
    env["DS_ACCELERATOR"] = "cpu"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(_free_port()), str(script), str(out_dir), *args]
    with open(Path(out_dir) / "output.txt", "w") as log:
        try:
            return subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            log.write(f"\n[run_workers] timed out after {timeout} s\n")
            return -1


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
