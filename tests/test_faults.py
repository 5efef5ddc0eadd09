"""A run directory you can trust: one run per directory, verified checkpoints, resume that never silently
restarts or duplicates history, exports that never mix files, early one-line errors (one process)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from scale_rank import run_dir as rd
from scale_rank.cli import main
from scale_rank.config import ConfigError, TrainingDiverged, load_config
from scale_rank.export import export_run
from scale_rank.train import train
from tests.support.tiny import overrides, tiny_model_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny"))


class Crash(RuntimeError):
    pass


def crash_after(step: int):
    def observer(done, controller, loss):
        if done == step:
            raise Crash(f"crashed after step {step}")
    return observer


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def run_cfg(model_dir, out, method="adalora", steps=12, **train_options):
    return load_config(None, overrides(model_dir, out, method, steps=steps, **train_options))


@pytest.fixture(scope="module")
def whole_run(model_dir, tmp_path_factory):
    """An uninterrupted 12-step AdaLoRA run with checkpoints every 3 steps (the reference)."""
    out = tmp_path_factory.mktemp("whole") / "run"
    train(run_cfg(model_dir, out, save_every=3), progress=False)
    return out


def crashed_run(model_dir, out: Path, step: int = 8) -> Path:
    """The reference run, crashed after `step` (its last checkpoint is at 6)."""
    with pytest.raises(Crash):
        train(run_cfg(model_dir, out, save_every=3), progress=False, observer=crash_after(step))
    return out


def assert_same_adapter(a: Path, b: Path) -> None:
    x, y = load_file(str(a / "final/trainable.safetensors")), load_file(str(b / "final/trainable.safetensors"))
    assert x.keys() == y.keys()
    for key in x:
        assert (x[key] - y[key]).abs().max() <= 1e-6, key


# ------------------------------------------------------------------------------------------ one owner

def test_a_second_run_into_a_run_directory_is_refused_and_overwrite_replaces_it(model_dir, tmp_path):
    out = tmp_path / "run"
    train(run_cfg(model_dir, out, steps=6), progress=False)
    decisions = lines(out / rd.RANKS_FILE)
    with pytest.raises(ConfigError, match="already holds a run.*--overwrite"):
        train(run_cfg(model_dir, out, steps=6), progress=False)
    assert lines(out / rd.RANKS_FILE) == decisions  # nothing appended
    (out / "notes.txt").write_text("mine")
    train(run_cfg(model_dir, out, steps=6), progress=False, overwrite=True)
    assert lines(out / rd.RANKS_FILE) == decisions  # the new run's decisions only, not both runs'
    assert (out / "notes.txt").read_text() == "mine"  # files the run did not write are left alone
    assert not (out / rd.LOCK_FILE).exists()


def test_a_live_lock_keeps_a_second_writer_out_and_a_dead_ones_lock_is_taken_over(model_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / rd.LOCK_FILE).write_text(json.dumps({"host": os.uname().nodename, "pid": sleeper.pid}))
        with pytest.raises(ConfigError, match=f"in use by process {sleeper.pid}"):
            train(run_cfg(model_dir, out, "lora", steps=3), progress=False)
    finally:
        sleeper.kill()
        sleeper.wait()
    result = train(run_cfg(model_dir, out, "lora", steps=3), progress=False)  # the lock's process is gone
    assert result.adapter_dir is not None and not (out / rd.LOCK_FILE).exists()


def test_output_dir_that_is_a_file_is_refused(model_dir, tmp_path):
    (tmp_path / "taken").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        train(run_cfg(model_dir, tmp_path / "taken", "lora", steps=3), progress=False)


# ------------------------------------------------------------------------------------------ resume

def test_resume_after_a_crash_matches_the_uninterrupted_run_with_no_duplicate_decisions(model_dir, whole_run,
                                                                                       tmp_path):
    out = crashed_run(model_dir, tmp_path / "run")
    assert max(e["step"] for e in lines(out / rd.RANKS_FILE)) == 8  # logged beyond the checkpoint at 6
    train(run_cfg(model_dir, out, save_every=3), resume=True, progress=False)
    assert lines(out / rd.RANKS_FILE) == lines(whole_run / rd.RANKS_FILE)
    steps = [e["step"] for e in lines(out / rd.TELEMETRY_FILE) if e.get("event") == "ranks"]
    assert steps == sorted(set(steps))
    assert_same_adapter(out, whole_run)


@pytest.mark.parametrize("damage", ["flip_bytes", "truncate", "missing_file", "latest_names_nothing",
                                    "latest_is_garbage"])
def test_resume_skips_a_damaged_newest_checkpoint_and_says_why(model_dir, whole_run, tmp_path, damage, caplog):
    out = crashed_run(model_dir, tmp_path / "run", step=10)  # checkpoints at 6 and 9
    root = out / "checkpoints"
    newest = root / "step_00000009"
    assert rd.verify_checkpoint(newest) is None
    if damage == "flip_bytes":
        data = bytearray((newest / "rank0.pt").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (newest / "rank0.pt").write_bytes(bytes(data))
    elif damage == "truncate":
        path = newest / "trainable.safetensors"
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "missing_file":
        (newest / "trainable.safetensors").unlink()
    elif damage == "latest_names_nothing":
        import shutil
        shutil.rmtree(newest)
    else:
        (root / "latest").write_text("\x00garbage")
    caplog.set_level("WARNING", logger="scale_rank.run_dir")
    train(run_cfg(model_dir, out, save_every=3), resume=True, progress=False)
    if damage.startswith("latest"):
        assert "skipped" not in caplog.text  # an intact step 9 (or, with it gone, step 6) is simply used
    else:
        assert "skipped checkpoint step_00000009" in caplog.text
    assert lines(out / rd.RANKS_FILE) == lines(whole_run / rd.RANKS_FILE)
    assert_same_adapter(out, whole_run)


def test_resume_without_a_usable_checkpoint_stops_instead_of_starting_over(model_dir, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(Crash):
        train(run_cfg(model_dir, out), progress=False, observer=crash_after(2))  # no checkpoint yet
    with pytest.raises(ConfigError, match="no usable checkpoint.*--overwrite"):
        train(run_cfg(model_dir, out), resume=True, progress=False)
    crashed_run(model_dir, tmp_path / "damaged")
    for directory in (tmp_path / "damaged/checkpoints").glob("step_*"):
        (directory / "rank0.pt").write_bytes(b"junk")
    with pytest.raises(ConfigError, match="step_00000006: rank0.pt has 4 bytes"):
        train(run_cfg(model_dir, tmp_path / "damaged"), resume=True, progress=False)


def test_resume_refuses_settings_that_change_the_result(model_dir, tmp_path):
    out = crashed_run(model_dir, tmp_path / "run")
    for change, field in (({"seed": 1}, "train.seed"), ({"batch_size": 32}, "train.batch_size"),
                          ({"lr": 0.01}, "train.lr")):
        with pytest.raises(ConfigError, match=f"{field} was"):
            train(run_cfg(model_dir, out, save_every=3, **change), resume=True, progress=False)
    with pytest.raises(ConfigError, match="train.total_steps was 12 and is now 14"):
        train(run_cfg(model_dir, out, steps=14, save_every=3), resume=True, progress=False)
    saved = (out / rd.CONFIG_FILE).read_text()
    train(run_cfg(model_dir, out, save_every=4, eval_every=6), resume=True, progress=False)  # harmless changes
    assert (out / rd.CONFIG_FILE).read_text() == saved


def test_a_diverged_run_stops_at_the_next_logged_step(model_dir, tmp_path):
    """NaN weights make every later loss NaN: the loop stops at the next logged step with a message that says so,
    instead of training to the end and exporting a broken adapter."""
    def poison(done, controller, loss):
        if done == 3:
            with torch.no_grad():
                controller.layers[0].lora_A.fill_(float("nan"))
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match="training loss is nan at step 4 .*lower train.lr"):
        train(run_cfg(model_dir, out, log_every=2), progress=False, observer=poison)
    assert not (out / "final").exists()
    train(run_cfg(model_dir, tmp_path / "healthy", log_every=2), progress=False)  # the same run, unpoisoned, ends


def test_checkpoints_hold_the_adapter_before_latest_moves(model_dir, whole_run):
    latest = rd.latest_checkpoint(rd.RunDir(whole_run))
    manifest = json.loads((latest / rd.MANIFEST_FILE).read_text())
    assert {"trainable.safetensors", "meta.json", "controller.pt", "rank0.pt"} <= set(manifest["files"])
    assert manifest["world_size"] == 1 and latest.name == f"step_{manifest['step']:08d}"


# ------------------------------------------------------------------------------------------ export

def test_export_never_mixes_files_or_overwrites_silently(whole_run, tmp_path, capsys):
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "old.bin").write_text("old")
    with pytest.raises(ConfigError, match="not empty.*--overwrite"):
        export_run(whole_run, out)
    assert main(["export", str(whole_run), "--out", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    (tmp_path / "file").write_text("x")
    assert main(["export", str(whole_run), "--out", str(tmp_path / "file")]) == 2
    assert "is a file" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "nothing"), "--out", str(tmp_path / "e1")]) == 2
    assert "is missing" in capsys.readouterr().err


def test_export_of_a_truncated_adapter_is_a_one_line_error(whole_run, tmp_path, capsys):
    import shutil
    copy = tmp_path / "run"
    shutil.copytree(whole_run, copy)
    path = copy / "final/trainable.safetensors"
    path.write_bytes(path.read_bytes()[:64])
    assert main(["export", str(copy), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "truncated or damaged" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ settings

@pytest.mark.parametrize("setting", ["train.save_every=-1", "train.eval_every=-2", "train.log_every=-1"])
def test_negative_intervals_are_refused(setting, capsys):
    assert main(["train", "-o", setting]) == 2
    assert setting.split("=")[0] in capsys.readouterr().err


def test_a_glue_file_with_non_utf8_bytes_names_the_file_and_line(tmp_path):
    from scale_rank.data import glue
    folder = tmp_path / "SST-2"
    folder.mkdir()
    (folder / "train.tsv").write_bytes(b"sentence\tlabel\ngood\t1\nbad \xff\xfe movie\t0\n")
    with pytest.raises(ConfigError, match=r"train.tsv: line 3 is not UTF-8"):
        glue.read_tsv(glue.TASKS["sst2"], folder / "train.tsv")


def test_chat_records_with_other_fields_name_the_file_and_line(tmp_path):
    """A file that mixes field names gives every record every field (as None): no record may train on "None"."""
    from scale_rank.config import DataConfig
    from scale_rank.data import chat
    path = tmp_path / "data.jsonl"
    path.write_text('{"instruction": "add", "output": "4"}\n{"prompt": "sub", "answer": "1"}\n')
    cfg = DataConfig(task="chat", dataset=str(path), eval_dataset=str(path))
    train_records, _ = chat.load_splits(cfg, seed=0)
    assert chat.to_messages(train_records[0], cfg, "x")[1]["content"] == "4"
    with pytest.raises(ConfigError, match=r"data.jsonl line 2 has fields \['answer', 'prompt'\]"):
        chat.to_messages(train_records[1], cfg, "train record 0")


@pytest.mark.parametrize("setting,message", [
    ("data.eval_size=0", "data.eval_size must be > 0"),
    ("model.name_or_path=./no/such/model", "is not a directory"),
    ("model.name_or_path=nobody/no-such-model", "cannot load model 'nobody/no-such-model'"),
])
def test_bad_data_and_model_settings_are_one_line(setting, message, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # an unreachable hub, as on a machine without network
    assert main(["train", "-o", f"train.output_dir={tmp_path / 'r'}", "-o", setting]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_export_to_an_unwritable_place_is_one_line(whole_run, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["export", str(whole_run), "--out", str(tmp_path / "file" / "adapter")]) == 2
    assert "cannot write the export" in capsys.readouterr().err


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(ConfigError):
        main(["train", "--debug", "-o", "data.eval_size=0"])
