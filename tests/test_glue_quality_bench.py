"""bench/glue_quality.py on a tiny BERT and tiny MRPC files: every method reported, scale_rank LoRA and PEFT
LoRA on one loss trajectory from identical weights, matched final budgets, the full profile's schedules."""
from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from tests.support.tiny import tiny_model_dir
from tests.test_glue import make_glue_dir

pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

BENCH = Path(__file__).resolve().parents[1] / "bench" / "glue_quality.py"
METHODS = ["lora", "adalora", "peft_lora", "peft_adalora"]
RANK, STEPS = 2, 6  # AdaLoRA: t_init 1, budget falls until step 4, final phase (t_final) 2 steps


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("glue_quality", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_options(bench, tmp_path_factory):
    """Options of one tiny run: 2-layer BERT (12 adapted modules, weights saved so it loads like a checkpoint)
    on tiny MRPC files."""
    model_dir = tiny_model_dir(tmp_path_factory.mktemp("model"))
    torch.manual_seed(0)
    config = transformers.BertConfig.from_pretrained(model_dir)
    transformers.BertForSequenceClassification(config).save_pretrained(model_dir)
    data_dir = tmp_path_factory.mktemp("glue")
    make_glue_dir(data_dir, "mrpc", train_labels=["1", "0"] * 8, dev_labels=["1", "0", "1", "0"])
    return bench.Options(tasks=["mrpc"], methods=METHODS, seeds=[0], steps=STEPS, batch_size=4, max_length=32,
                         rank=RANK, model=str(model_dir), data_dir=str(data_dir))


def run_with_threads(bench, opts, threads: int) -> dict:
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return bench.benchmark(opts)
    finally:
        torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def result(bench, tiny_options):
    return run_with_threads(bench, tiny_options, 1)


def by_method(result) -> dict[str, dict]:
    return {r["method"]: r for r in result["records"]}


def test_every_method_has_a_row(bench, result):
    assert [row["method"] for row in result["rows"]] == METHODS
    for name in METHODS:
        assert f"| {bench.LABELS[name]} |" in result["table"]
    assert "accuracy (primary) | f1 |" in result["table"]  # MRPC: scale_rank's primary metric, and F1
    for record in result["records"]:
        assert len(record["losses"]) == len(record["step_s"]) == STEPS
        assert record["reported"]["step"] == STEPS and set(record["reported"]) == {"step", "accuracy", "f1"}
    rows = {row["method"]: row for row in result["rows"]}
    assert rows["peft_lora"]["vs_peft_lora"] == 1.0


def test_lora_follows_peft_lora_from_identical_weights(result):
    """PEFT's initial A and B are copied into scale_rank's LoRA: same losses at every step, same dev score."""
    runs = by_method(result)
    ours, peft = runs["lora"], runs["peft_lora"]
    assert ours["losses"][0] == peft["losses"][0]
    assert ours["losses"] == pytest.approx(peft["losses"], rel=1e-5, abs=1e-6)
    assert ours["losses"][-1] != ours["losses"][0]  # it trained
    assert ours["reported"] == peft["reported"]
    assert "scale_rank LoRA vs PEFT LoRA from the same initial adapters" in result["table"]
    assert runs["adalora"]["losses"][0] == runs["peft_adalora"]["losses"][0]


def test_matched_budgets(result):
    budgets = {name: record["budget"] for name, record in by_method(result).items()}
    modules = 12
    assert all(b["modules"] == modules for b in budgets.values())
    assert budgets["lora"]["total_rank"] == budgets["peft_lora"]["total_rank"] == RANK * modules
    assert budgets["lora"]["adapter_params"] == budgets["peft_lora"]["adapter_params"]
    assert budgets["lora"]["trained_adapter_params"] == budgets["peft_lora"]["trained_adapter_params"]
    # AdaLoRA: r_init = 1.5 r trains, the final budget is LoRA's total rank (on both sides)
    assert budgets["adalora"]["total_rank"] == budgets["peft_adalora"]["total_rank"] == RANK * modules
    assert budgets["adalora"]["trained_adapter_params"] == budgets["peft_adalora"]["trained_adapter_params"]
    assert budgets["adalora"]["trained_adapter_params"] > budgets["lora"]["trained_adapter_params"]
    assert len({b["head_params"] for b in budgets.values()}) == 1  # the same head trains in full everywhere


def test_full_profile_uses_the_recipes_scaled_to_the_steps(bench):
    """MRPC recipe: 30 epochs of 3,668 rows at batch 32 = 3,438 steps; AdaLoRA t_init 600 / t_final 1,800."""
    as_recipe = bench.make_plan("mrpc", bench.Options(profile="full", data_dir=None), train_size=3668)
    assert (as_recipe.steps, as_recipe.warmup, as_recipe.eval_every) == (3438, 100, 100)
    assert as_recipe.schedule["adalora"] == {"t_init": 600, "t_final": 1800, "delta_t": 1}
    short = bench.make_plan("mrpc", bench.Options(profile="full", steps=344, data_dir=None), train_size=3668)
    assert short.schedule["adalora"] == {"t_init": 60, "t_final": 180, "delta_t": 1}
    assert short.schedule["prilora"] == {"prune_interval": 10} and short.eval_every == 10
    settings = bench.method_settings("adalora", short, rank=8)
    assert (settings.r_init, settings.r_target, settings.resolved_gamma()) == (12, 8, 0.03)


def test_method_specs_carry_settings(bench):
    """`name@key=value+key=value` runs a method with changed settings (the paper-exact variants)."""
    assert bench.split_spec("adalora@init=paper+gamma=0") == ("adalora", {"init": "paper", "gamma": "0"})
    assert bench.label("increlora@init=paper") == "IncreLoRA (init=paper)"
    plan = bench.make_plan("mrpc", bench.Options(profile="separate", data_dir=None), train_size=2576)
    paper = bench.method_settings("adalora@init=paper+gamma=0", plan, rank=8)
    assert (paper.init, paper.gamma, paper.r_init) == ("paper", 0.0, 12)
    assert bench.method_settings("adalora", plan, rank=8).init == "lora"
    wider = bench.method_settings("adalora@r_init=16+delta_t=5", plan, rank=8)  # over the budget and schedule
    assert (wider.r_init, wider.r_target, wider.delta_t, wider.t_init) == (16, 8, 5, 30)
    with pytest.raises(Exception, match="unknown method option"):
        bench.method_settings("adalora@no_such=1", plan, rank=8)


def test_separate_profile_shapes(bench):
    """The profile behind the README's tables: 300 steps per task in length-grouped batches at the recipes'
    learning rates, paper-exact AdaLoRA included (against PEFT's); --lr replaces every task's learning rate."""
    sst2 = bench.make_plan("sst2", bench.Options(profile="separate", data_dir=None), train_size=67349)
    mrpc = bench.make_plan("mrpc", bench.Options(profile="separate", data_dir=None), train_size=2576)
    assert (sst2.steps, sst2.lr, mrpc.steps, mrpc.lr, mrpc.max_length) == (300, 8e-4, 300, 1e-3, 96)
    assert sst2.length_groups == mrpc.length_groups == 8
    assert bench.make_plan("sst2", bench.Options(profile="separate", data_dir=None, lr=2e-3), 67349).lr == 2e-3
    methods = bench.PROFILES["separate"]["methods"]
    assert set(bench.ALL_METHODS) < set(methods) and "adalora@init=paper" in methods
    assert mrpc.schedule["adalora"] == {"t_init": 30, "t_final": 90, "delta_t": 1}


def test_long_profile_is_separate_three_times_as_long(bench):
    """SST-2 and MRPC, 900 steps in separate's batches; every scale_rank method and PEFT LoRA."""
    sst2 = bench.make_plan("sst2", bench.Options(profile="long", data_dir=None), train_size=67349)
    mrpc = bench.make_plan("mrpc", bench.Options(profile="long", data_dir=None), train_size=2576)
    assert (sst2.steps, sst2.lr, sst2.batch_size, sst2.max_length, sst2.length_groups) == (900, 8e-4, 16, 64, 8)
    assert (mrpc.steps, mrpc.max_length) == (900, 96)
    assert sst2.schedule["adalora"] == {"t_init": 90, "t_final": 270, "delta_t": 1}
    profile = bench.PROFILES["long"]
    assert profile["tasks"] == ("sst2", "mrpc") and profile["pooling"] == "mean"
    assert set(profile["methods"]) == set(bench.SCALE_RANK_METHODS) | {"peft_lora"}


def test_workers_run_the_seeds_side_by_side_with_the_same_results(bench, tiny_options, result):
    """Two processes of one thread each: seed 0's records equal the one-process run's (also one thread)."""
    opts = dataclasses.replace(tiny_options, methods=["lora", "adalora"], seeds=[1, 0], workers=2)
    parallel = run_with_threads(bench, opts, 2)
    assert [(r["seed"], r["method"]) for r in parallel["records"]] == [
        (1, "lora"), (1, "adalora"), (0, "lora"), (0, "adalora")]
    alone = by_method(result)
    for record in parallel["records"][2:]:
        assert record["losses"] == alone[record["method"]]["losses"]
        assert record["reported"] == alone[record["method"]]["reported"]
    assert "2 threads in 2 processes" in parallel["table"]


def test_length_grouped_batches_keep_each_groups_examples_and_cut_padding(bench):
    lengths = torch.randint(5, 60, (200,), generator=torch.Generator().manual_seed(0))
    groups, size, steps = 4, 8, 12
    plain = [bench.batch_indices(s, 200, size, seed=3) for s in range(steps)]
    grouped = [bench.length_grouped_indices(s, lengths, size, 3, groups) for s in range(steps)]
    assert all(torch.equal(a, b) for a, b in zip(plain, [bench.length_grouped_indices(s, lengths, size, 3, 1)
                                                          for s in range(steps)]))
    for first in range(0, steps, groups):
        assert sorted(torch.cat(grouped[first:first + groups]).tolist()) == \
            sorted(torch.cat(plain[first:first + groups]).tolist())
    assert len({tuple(b.tolist()) for b in grouped}) == steps
    padded = lambda batches: sum(int(lengths[b].max()) * size for b in batches)  # noqa: E731
    assert padded(grouped) < 0.8 * padded(plain)


def test_mean_pooling_reads_the_masked_mean_of_the_last_hidden_states(bench, tiny_options):
    """The head reads the mean over the kept tokens (an independent masked mean of the encoder's last hidden
    states), so padding a row does not change its logits; the separate profile uses it, quick keeps CLS."""
    model = transformers.BertForSequenceClassification.from_pretrained(tiny_options.model).eval()
    bench.use_mean_pooling(model)
    ids = torch.randint(5, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        hidden = model.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        short = model(input_ids=ids[1:, :6], attention_mask=mask[1:, :6]).logits
    mean = torch.stack([hidden[0].mean(0), hidden[1, :6].mean(0)])
    torch.testing.assert_close(logits, model.classifier(mean))
    torch.testing.assert_close(short[0], logits[1], rtol=1e-5, atol=1e-6)
    assert bench.Options(profile="separate").resolved_pooling() == "mean"
    assert bench.Options(profile="quick").resolved_pooling() == "cls"
    with pytest.raises(ValueError, match="no BERT-style pooler"):
        bench.use_mean_pooling(transformers.BertModel(model.config, add_pooling_layer=False))


def test_paired_difference_from_lora_and_issue_9_lines(bench):
    """Per-seed differences from LoRA on the same seeds; the marks follow LoRA's mean - 0.5 and its std."""
    def runs(method, accuracies):
        return [{"task": "sst2", "method": method, "seed": seed, "reported": {"step": 9, "accuracy": a / 100},
                 "step_s": [1.0], "budget": {"total_rank": 8, "adapter_params": 8, "trained_adapter_params": 8},
                 "orthogonality": None} for seed, a in enumerate(accuracies)]
    records = (runs("lora", [80.0, 81.0, 82.0]) + runs("adalora", [81.5, 82.5, 83.0])
               + runs("sora", [79.0, 80.5, 81.5]) + runs("prilora", [80.5, 80.0, 82.0]))
    rows = {row["method"]: row for row in bench.summarize(records, {"sst2": "accuracy"})}
    assert rows["lora"]["vs_lora"] is None
    ada = rows["adalora"]["vs_lora"]
    assert ada["mean"] == pytest.approx(4 / 3) and ada["std"] == pytest.approx(0.2886751, rel=1e-6)
    assert (ada["wins"], ada["seeds"], ada["lora_std"]) == (3, 3, pytest.approx(1.0))
    assert ada["ahead_by_lora_std"] and ada["within_half_point"]  # +1.33 > LoRA's std 1.0
    sora, prilora = rows["sora"]["vs_lora"], rows["prilora"]["vs_lora"]
    assert sora["mean"] == pytest.approx(-2 / 3) and not sora["within_half_point"]
    assert prilora["mean"] == pytest.approx(-1 / 6) and prilora["within_half_point"]
    assert not prilora["ahead_by_lora_std"] and prilora["wins"] == 1
    table = bench.format_table(list(rows.values()))
    assert "| +1.33 ± 0.29 (3/3)* |" in table and "| -0.67 ± 0.29 (0/3)! |" in table
    assert "| -0.17 ± 0.76 (1/3) |" in table
