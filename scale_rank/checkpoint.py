"""Atomic checkpoints: everything is written into a temporary directory, then renamed into place.

A crash while saving leaves the previous checkpoint (named in `latest`) untouched and loadable.
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

KEEP_LAST = 2


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = checkpoint_root(run_dir) / "latest"
    if not pointer.is_file():
        return None
    path = checkpoint_root(run_dir) / pointer.read_text().strip()
    return path if path.is_dir() else None


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(run_dir: Path, step: int, engine, controller, rank: int) -> Path:
    """Write step `step` atomically; every rank calls this."""
    root = checkpoint_root(run_dir)
    name = f"step_{step:08d}"
    tmp, final = root / f".tmp_{name}", root / name
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    engine.save_state(tmp)
    torch.save({"step": step, "controller": controller.state_dict(), "rng": rng_state()},
               tmp / f"rank{rank}.pt")
    _barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        pointer = root / ".latest.tmp"
        pointer.write_text(name)
        os.replace(pointer, root / "latest")
        for old in sorted(root.glob("step_*"))[:-KEEP_LAST]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(path: Path, engine, controller, rank: int) -> dict:
    """Restore engine, controller and RNG state; returns this rank's saved record (step, extras)."""
    record_path = Path(path) / f"rank{rank}.pt"
    if not record_path.is_file():
        raise FileNotFoundError(f"{record_path} is missing: the checkpoint was written by fewer processes; "
                                "resume with the same number of processes")
    engine.load_state(Path(path))
    record = torch.load(record_path, weights_only=False)
    controller.load_state_dict(record["controller"])
    set_rng_state(record["rng"])
    return record
