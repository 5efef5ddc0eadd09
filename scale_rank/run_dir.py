"""The run directory: its layout, who may write into it, and the verified checkpoints it holds.

    run_dir/
        run_config.yaml      the resolved RunConfig of the run
        ranks.jsonl          one line per allocation decision {"step", "ranks"} (the loop's record)
        telemetry.jsonl      a layout line, then one line per decision with totals and scores
        metrics.json         final and best metrics, final ranks (written last)
        checkpoints/         step_N/ (engine state, rankK.pt, trainable state, manifest.json) and `latest`
        best/ final/         full adapter state (trainable.safetensors, meta.json, controller.pt)
        adapter/             the PEFT export of final/
        .lock                {"host", "pid"} of the process that writes the run (removed at its end)
        wandb/ wandb_run_id  the W&B files and run id (a resume continues that run)

Every other module asks this one for paths. A new run into a directory that holds a run is refused unless
the user resumes it or overwrites it; the lock keeps a second writer out, and a lock left by a dead process
on this host is taken over. Each checkpoint carries a manifest with every file's size and SHA-256; resume
takes the newest checkpoint that verifies, and cuts the decision logs back to its step.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

from .config import ConfigError

log = logging.getLogger(__name__)

CONFIG_FILE = "run_config.yaml"
RANKS_FILE = "ranks.jsonl"
TELEMETRY_FILE = "telemetry.jsonl"
METRICS_FILE = "metrics.json"
LOCK_FILE = ".lock"
MANIFEST_FILE = "manifest.json"
LATEST_FILE = "latest"
WANDB_ID_FILE = "wandb_run_id"
EVENT_LOGS = (RANKS_FILE, TELEMETRY_FILE)
# everything a run writes (what --overwrite removes; nothing else in the directory is touched)
RUN_ENTRIES = (CONFIG_FILE, RANKS_FILE, TELEMETRY_FILE, METRICS_FILE, "checkpoints", "best", "final", "adapter",
               "rank_heatmap.png", "rank_budget.png", "rank_timeline.png", "wandb", WANDB_ID_FILE, "tensorboard")
MODES = ("new", "resume", "overwrite")


@dataclass(frozen=True)
class RunDir:
    """Paths of one run directory."""

    path: Path

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    @property
    def config(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def ranks_log(self) -> Path:
        return self.path / RANKS_FILE

    @property
    def telemetry_log(self) -> Path:
        return self.path / TELEMETRY_FILE

    @property
    def metrics(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def best(self) -> Path:
        return self.path / "best"

    @property
    def final(self) -> Path:
        return self.path / "final"

    @property
    def adapter(self) -> Path:
        return self.path / "adapter"

    @property
    def lock(self) -> Path:
        return self.path / LOCK_FILE

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step_{step:08d}"

    def holds_run(self) -> bool:
        return any((self.path / name).exists() for name in RUN_ENTRIES[:5])

    def append_event(self, log_file: Path, record: dict) -> None:
        with open(log_file, "a") as out:
            out.write(json.dumps(record) + "\n")

    def cut_event_logs(self, step: int) -> None:
        """Drop logged decisions after `step` (a resume from the checkpoint of `step` logs them again)."""
        for log_file in (self.path / name for name in EVENT_LOGS):
            if not log_file.is_file():
                continue
            kept = [line for line in log_file.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= step]
            write_atomic(log_file, "".join(line + "\n" for line in kept))


# ----------------------------------------------------------------------------------------- ownership

def write_atomic(path: Path, text: str) -> None:
    """Write `text` to a hidden sibling, then rename it over `path` (a reader never sees half a file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _lock_owner(lock: Path) -> dict | None:
    try:
        return json.loads(lock.read_text())
    except (OSError, ValueError):
        return None


def acquire_lock(run: RunDir) -> None:
    """Create run_dir/.lock for this process; refuse while a live process holds it."""
    run.path.mkdir(parents=True, exist_ok=True)
    me = {"host": socket.gethostname(), "pid": os.getpid()}
    for _ in range(2):
        try:
            fd = os.open(run.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            owner = _lock_owner(run.lock)
            if owner is not None and owner.get("host") == me["host"] and not _alive(int(owner["pid"])):
                log.warning("%s: taking over the lock of process %s, which is gone", run.path, owner["pid"])
                run.lock.unlink(missing_ok=True)
                continue
            who = f"process {owner['pid']} on {owner['host']}" if owner else "another process"
            raise ConfigError(f"{run.path} is in use by {who} (lock {run.lock}); wait for it to finish, or "
                              "delete the lock file if that process is gone")
        with os.fdopen(fd, "w") as out:
            json.dump(me, out)
        return
    raise ConfigError(f"could not take the lock {run.lock}")


def release_lock(run: RunDir) -> None:
    owner = _lock_owner(run.lock)
    if owner is not None and owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
        run.lock.unlink(missing_ok=True)


def claim(run: RunDir, mode: str) -> None:
    """Take the run directory for this run (main process): lock it, then apply `mode`.

    new: refuse a directory that holds a run; overwrite: remove the run's files first; resume: the
    directory must hold a run (its checkpoints are chosen by `resume_checkpoint`).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if run.path.exists() and not run.path.is_dir():
        raise ConfigError(f"train.output_dir {run.path} is a file; choose a directory")
    acquire_lock(run)
    try:
        if mode == "new" and run.holds_run():
            raise ConfigError(f"{run.path} already holds a run: pass --resume to continue it, --overwrite to "
                              "replace it, or choose another train.output_dir")
        if mode == "resume" and not run.config.is_file():
            raise ConfigError(f"cannot resume: {run.config} is missing (not a scale_rank run directory)")
        if mode == "overwrite":
            for name in RUN_ENTRIES:
                entry = run.path / name
                if entry.is_dir():
                    shutil.rmtree(entry)
                elif entry.exists():
                    entry.unlink()
    except BaseException:
        release_lock(run)
        raise


# ----------------------------------------------------------------------------------------- checkpoints

def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as data:
        for block in iter(lambda: data.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)


def write_manifest(directory: Path, world_size: int, step: int) -> None:
    """manifest.json: the step, the world size and every file's size and SHA-256 (written last)."""
    files = {str(p.relative_to(directory)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
             for p in _files(directory)}
    write_atomic(directory / MANIFEST_FILE,
                  json.dumps({"step": step, "world_size": world_size, "files": files}, indent=1))


def verify_checkpoint(directory: Path) -> str | None:
    """None when every file of the manifest is there with its size and checksum, else what is wrong."""
    manifest_path = directory / MANIFEST_FILE
    if not directory.is_dir():
        return "missing"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"no readable {MANIFEST_FILE}"
    for name, expected in files.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {expected['bytes']}"
        if _sha256(path) != expected["sha256"]:
            return f"{name} does not match its checksum"
    return None


def checkpoint_world_size(directory: Path) -> int:
    return int(json.loads((directory / MANIFEST_FILE).read_text())["world_size"])


def latest_checkpoint(run: RunDir) -> Path | None:
    """The checkpoint `latest` names, if that directory exists (no verification)."""
    pointer = run.checkpoints / LATEST_FILE
    if not pointer.is_file():
        return None
    path = run.checkpoints / pointer.read_text().strip()
    return path if path.is_dir() else None


def resume_checkpoint(run: RunDir, world_size: int) -> Path:
    """The newest checkpoint that verifies; logs every newer one it skips and why. With none usable, a
    ConfigError that lists what was found (starting over is the user's explicit --overwrite)."""
    candidates = sorted(run.checkpoints.glob("step_*"), reverse=True) if run.checkpoints.is_dir() else []
    skipped = []
    for directory in candidates:
        problem = verify_checkpoint(directory)
        if problem is None:
            saved = checkpoint_world_size(directory)
            if saved != world_size:
                raise ConfigError(f"cannot resume {run.path}: checkpoint {directory.name} was written by "
                                  f"{saved} processes and this run has {world_size}; launch {saved} processes")
            for name, why in skipped:
                log.warning("resume: skipped checkpoint %s (%s)", name, why)
            return directory
        skipped.append((directory.name, problem))
    found = "; ".join(f"{name}: {why}" for name, why in skipped) or "none"
    raise ConfigError(f"cannot resume {run.path}: no usable checkpoint (found: {found}); pass --overwrite to "
                      "start over")
