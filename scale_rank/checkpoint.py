"""Atomic checkpoints: everything is written into a temporary directory, then renamed into place.

A crash while saving leaves the previous checkpoint (named in `latest`) untouched and loadable. Each
checkpoint's manifest (scale_rank.run_dir) lets a resume verify it before loading anything.
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from .run_dir import LATEST_FILE, RunDir, write_atomic, write_manifest

KEEP_LAST = 2  # the newest checkpoints kept; resume falls back to an older one that verifies


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


def save_checkpoint(run: RunDir, step: int, engine, controller, rank: int,
                    write_extra: Callable[[Path], None] | None = None) -> Path:
    """Write step `step` atomically; every rank calls this. `write_extra(directory)` (collective) adds more
    files, e.g. the full adapter state; the manifest covers them all and is written before `latest` moves."""
    root = run.checkpoints
    final = run.checkpoint(step)
    tmp = root / f".tmp_{final.name}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    engine.save_state(tmp)
    torch.save({"step": step, "controller": controller.state_dict(), "rng": rng_state()},
               tmp / f"rank{rank}.pt")
    _barrier()
    if write_extra is not None:
        write_extra(tmp)
    if rank == 0:
        write_manifest(tmp, dist.get_world_size() if dist.is_initialized() else 1, step)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        write_atomic(root / LATEST_FILE, final.name)
        for old in sorted(root.glob("step_*"))[:-KEEP_LAST]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(path: Path, engine, controller, rank: int) -> dict:
    """Restore engine, controller and RNG state from a verified checkpoint; returns this rank's record."""
    engine.load_state(Path(path))
    record = torch.load(Path(path) / f"rank{rank}.pt", weights_only=False)
    controller.load_state_dict(record["controller"])
    set_rng_state(record["rng"])
    return record
