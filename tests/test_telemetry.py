"""Rank telemetry: the table, the JSONL log, the pictures, W&B offline, and `report`."""
from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image

from scale_rank import telemetry as tm
from tests.support.methods import Run, fixed_batches

T = 10  # AdaLoRA: decisions at steps 4, 6 (delta_t 2) and 7 (end of the pruning phase)
ADALORA = dict(total_steps=T, r_init=4, r_target=2, t_init=2, t_final=3, delta_t=2)


def _train(method: str, run_dir, sinks=None, steps: int = T, **options) -> tuple[Run, tm.Telemetry]:
    """Train `steps` steps, writing ranks.jsonl like the loop's _record_decision and feeding telemetry."""
    torch.set_num_threads(1)
    run = Run(method, **options)
    telemetry = tm.Telemetry(run_dir, sinks=sinks) if sinks is not None else tm.Telemetry(run_dir)

    def after_apply(step):
        c = run.controller
        if c.history and c.history[-1]["step"] == c.step_count:
            with open(run_dir / "ranks.jsonl", "a") as out:
                out.write(json.dumps(c.history[-1]) + "\n")
        telemetry.record(c)

    run.train(fixed_batches(), steps, after_apply=after_apply)
    return run, telemetry


@pytest.fixture(scope="module")
def adalora_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("adalora_run")
    threads = torch.get_num_threads()
    run, telemetry = _train("adalora", run_dir, **ADALORA)
    telemetry.close()
    torch.set_num_threads(threads)
    return run, telemetry, run_dir


def test_table_rows_and_totals(adalora_run):
    run, _, _ = adalora_run
    table = tm.RankTable.from_controller(run.controller)
    ranks = run.controller.ranks()
    assert [r.module for r in table.rows] == list(ranks)
    assert [r.rank for r in table.rows] == list(ranks.values())
    assert [(r.layer, r.kind, r.capacity) for r in table.rows] == \
        [(l.layer_index, l.kind, l.r_max) for l in run.layers]
    assert all(r.score is not None for r in table.rows)  # AdaLoRA scores, summed per module
    totals = table.totals
    assert totals["total_rank"] == totals["budget"] == sum(ranks.values())
    assert totals["target"] == run.method.b_target == 2 * len(run.layers)
    expected_params = sum(r * (l.d_in + l.d_out) + (r if l.lora_lam.requires_grad else 0)
                          for l, r in zip(run.layers, ranks.values()))
    assert totals["trainable_params"] == expected_params
    # per-module score = sum over the module's components of AdaLoRA's last component scores
    per_module = run.method.layout.per_module_sum(run.method.last_scores.double())
    assert table.scores == pytest.approx(per_module.tolist())


def test_jsonl_matches_controller_history(adalora_run):
    run, _, run_dir = adalora_run
    lines = [json.loads(line) for line in (run_dir / tm.TELEMETRY_FILE).read_text().splitlines()]
    assert lines[0]["event"] == "layout"
    assert [m["module"] for m in lines[0]["modules"]] == [l.site for l in run.layers]
    events = lines[1:]
    history = run.controller.history
    assert len(history) >= 3  # decisions happened
    assert [{"step": e["step"], "ranks": e["ranks"]} for e in events] == history
    for event in events:
        assert event["totals"]["total_rank"] == sum(event["ranks"])
        assert event["totals"]["target"] == run.method.b_target
    assert sum(events[-1]["ranks"]) == run.method.b_target  # pruned to the target at the end


def test_pictures_exist_and_open(adalora_run):
    _, telemetry, run_dir = adalora_run
    for name in (tm.HEATMAP_FILE, tm.BUDGET_FILE, tm.TIMELINE_FILE):
        path = run_dir / name
        assert path.is_file(), name
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size[0] > 0 and image.size[1] > 0


def test_heatmap_matrix_equals_final_ranks(adalora_run):
    run, _, _ = adalora_run
    table = tm.RankTable.from_controller(run.controller)
    layers, kinds, grid = tm.rank_matrix(table)
    assert layers == sorted({l.layer_index for l in run.layers})
    assert set(kinds) == {l.kind for l in run.layers}
    for layer, rank in zip(run.layers, run.method.ranks().tolist()):
        assert grid[layers.index(layer.layer_index)][kinds.index(layer.kind)] == rank
    filled = sum(1 for row in grid for v in row if not math.isnan(v))
    assert filled == len(run.layers)
    timeline = tm.timeline_matrix(table.modules, [{"ranks": h["ranks"]} for h in run.controller.history])
    assert [row[-1] for row in timeline] == run.method.ranks().tolist()


def test_report_lists_every_module_and_totals(adalora_run):
    run, _, run_dir = adalora_run
    for name in (tm.HEATMAP_FILE, tm.BUDGET_FILE):
        (run_dir / name).unlink()
    (run_dir / "metrics.json").write_text(json.dumps({"final": {"accuracy": 0.5}}))
    text = tm.report(run_dir)
    ranks = run.controller.ranks()
    for site, rank in ranks.items():
        line = next(l for l in text.splitlines() if l.startswith(site + " "))
        assert line.split()[3] == str(rank), line
    table = tm.RankTable.from_controller(run.controller)
    assert f"total rank {sum(ranks.values())} " in text
    assert f"target {run.method.b_target}" in text
    assert f"trainable adapter parameters {table.totals['trainable_params']}" in text
    assert "accuracy 0.5000" in text
    assert (run_dir / tm.HEATMAP_FILE).is_file() and (run_dir / tm.BUDGET_FILE).is_file()


def test_report_without_telemetry_file(tmp_path):
    (tmp_path / "ranks.jsonl").write_text("\n".join(json.dumps(e) for e in [
        {"step": 3, "ranks": [4, 4]}, {"step": 5, "ranks": [3, 1]}]) + "\n")
    text = tm.report(tmp_path, pictures=False)
    assert "module_0" in text and "module_1" in text and "total rank 4 " in text
    with pytest.raises(FileNotFoundError):
        tm.report(tmp_path / "missing")


def test_increlora_scores_are_per_module(tmp_path):
    run, telemetry = _train("increlora", tmp_path, steps=6, total_steps=6, r_start=1, r_target=3, r_max=6,
                            incre_rank=1, top_h=3, incre_interval=2, t_init=2)
    telemetry.close()
    table = tm.RankTable.from_controller(run.controller)
    assert table.target == run.method.target_total
    assert table.scores == pytest.approx(run.method.last_scores.double().tolist())
    assert (tmp_path / tm.HEATMAP_FILE).is_file()


def test_not_main_process_logs_nothing(tmp_path):
    assert tm.make_sinks(tmp_path, ["wandb"], is_main=False) == []
    assert not any(tmp_path.iterdir())


def test_wandb_offline_writes_run_dir(adalora_run, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    run, _, _ = adalora_run
    sinks = tm.make_sinks(tmp_path, ["wandb"], config={"method": "adalora"})
    assert [type(s).__name__ for s in sinks] == ["JsonlSink", "PictureSink", "WandbSink"]
    telemetry = tm.Telemetry(tmp_path, sinks=sinks)
    modules = tm.module_infos(run.layers)
    for entry in run.controller.history:
        telemetry.log(tm.RankTable(entry["step"], modules, entry["ranks"], target=run.method.b_target))
    scalars = tm.scalars(tm.RankTable(1, modules, run.controller.history[-1]["ranks"]))
    assert scalars["rank/total"] == sum(run.controller.history[-1]["ranks"])
    assert sum(v for k, v in scalars.items() if k.startswith("rank/type/")) == scalars["rank/total"]
    assert sum(v for k, v in scalars.items() if k.startswith("rank/layer/")) == scalars["rank/total"]
    telemetry.close()
    offline = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(offline) == 1
    assert list(offline[0].glob("run-*.wandb"))
    media = list(offline[0].rglob("*.png"))
    assert media, "the heatmap image was not saved"
    assert list(offline[0].rglob("*.table.json")), "the final rank table was not saved"
    first_id = telemetry.sinks[-1].run.id
    resumed = tm.make_sinks(tmp_path, ["wandb"], config={"method": "adalora"})[-1]  # as a resumed run does
    assert resumed.run.id == first_id
    resumed.close()


def test_pictures_after_resume_cover_the_whole_run(adalora_run, tmp_path, monkeypatch):
    """A resumed process sees only its own events; the budget curve still covers the files' history."""
    run, _, run_dir = adalora_run
    history = run.controller.history
    for name in (tm.RANKS_FILE, tm.TELEMETRY_FILE):
        (tmp_path / name).write_text((run_dir / name).read_text())
    sink = tm.PictureSink(tmp_path)
    modules = tm.module_infos(run.layers)
    sink.log_event(history[-1]["step"], tm.RankTable(history[-1]["step"], modules, history[-1]["ranks"]))
    seen = []
    original = tm.plot_budget
    monkeypatch.setattr(tm, "plot_budget", lambda events, path: (seen.append(list(events)), original(events, path))[1])
    sink.close()
    assert [e["step"] for e in seen[0]] == [h["step"] for h in history]


def test_training_scalars_reach_the_offline_wandb_run(tmp_path, monkeypatch):
    """loss, lr, throughput (every log_every steps), eval metrics and rank series are in the run's log file."""
    pytest.importorskip("wandb")
    from scale_rank.config import load_config
    from scale_rank.train import train
    monkeypatch.setenv("WANDB_MODE", "offline")  # not silent: the run's console record must show no warning
    out = tmp_path / "run"
    train(load_config(None, ["train.total_steps=6", f"train.output_dir={out}", "data.train_size=64",
                             "data.eval_size=32", "train.log_every=2", "train.report_to=[wandb]",
                             "method.t_init=1", "method.t_final=1"]), progress=False)
    (log_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    data = log_file.read_bytes()
    for key, at_least in (("train/loss", 3), ("train/lr", 3), ("train/samples_per_s", 3), ("eval/accuracy", 1),
                          ("rank/total", 1)):
        assert data.count(key.encode()) >= at_least, key
    # the heatmap and final table are logged at the end: wandb drops (and says so in the run's console record)
    # anything logged to an earlier step than one it has seen, such as the last decision's
    assert b"Tried to log to step" not in data


def test_wandb_goes_offline_only_without_credentials(tmp_path, monkeypatch):
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert tm.wandb_mode() == "offline"  # no key anywhere
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password 0123456789abcdef\n")
    assert tm.wandb_mode() is None  # `wandb login` stored a key: wandb decides (online), not forced offline
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert tm.wandb_mode() is None  # wandb reads WANDB_MODE itself
