"""GLUE loading (glue_data TSV layouts and hub conversion), label mapping, metrics and input errors."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from scale_rank.config import ConfigError, DataConfig
from scale_rank.data import glue
from scale_rank.data.tasks import build_task

REAL_GLUE = Path(os.environ.get("SCALE_RANK_GLUE_DIR", "/nonexistent"))  # a glue_data copy, if you have one


@pytest.fixture(scope="module")
def tokenizer():
    transformers = pytest.importorskip("transformers")
    from scale_rank.model import resolve_model_path
    try:
        path = resolve_model_path("minilm")
    except ConfigError as error:
        pytest.skip(str(error))
    return transformers.AutoTokenizer.from_pretrained(path)


def _write(path: Path, rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join("\t".join(row) + "\n" for row in rows), encoding="utf-8")


# Each task's real column layout; rows (text_a, text_b, raw label). Texts carry unbalanced quotes on purpose
# (GLUE files must be read with QUOTE_NONE).
LAYOUTS = {
    "cola": (None, lambda i, a, b, y: [f"gj0{i}", y, "" if y == "1" else "*", a]),
    "sst2": (["sentence", "label"], lambda i, a, b, y: [a, y]),
    "mrpc": (["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
             lambda i, a, b, y: [y, str(1000 + i), str(2000 + i), a, b]),
    "qqp": (["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
            lambda i, a, b, y: [str(i), str(2 * i), str(2 * i + 1), a, b, y]),
    "stsb": (["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1",
              "sentence2", "score"],
             lambda i, a, b, y: [str(i), "main-captions", "MSRvid", "2012test", f"{i:04d}", "none", "none",
                                 a, b, y]),
    "mnli": (["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
              "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "gold_label"],
             lambda i, a, b, y: [str(i), str(i), f"{i}e", "government", "( x )", "( y )", "(ROOT x)",
                                 "(ROOT y)", a, b, y, y]),
    "qnli": (["index", "question", "sentence", "label"], lambda i, a, b, y: [str(i), a, b, y]),
    "rte": (["index", "sentence1", "sentence2", "label"], lambda i, a, b, y: [str(i), a, b, y]),
}
RAW_LABELS = {
    "cola": ["1", "0", "1"], "sst2": ["0", "1", "1"], "mrpc": ["1", "0", "1"], "qqp": ["0", "1", "0"],
    "stsb": ["5.000", "0.5", "3.8"], "mnli": ["neutral", "contradiction", "entailment"],
    "qnli": ["not_entailment", "entailment", "entailment"], "rte": ["entailment", "not_entailment", "entailment"],
}
EXPECTED_IDS = {
    "cola": [1, 0, 1], "sst2": [0, 1, 1], "mrpc": [1, 0, 1], "qqp": [0, 1, 0], "stsb": [5.0, 0.5, 3.8],
    "mnli": [1, 2, 0], "qnli": [1, 0, 0], "rte": [0, 1, 0],
}
FOLDERS = {"cola": "CoLA", "sst2": "SST-2", "mrpc": "MRPC", "qqp": "QQP", "stsb": "STS-B", "mnli": "MNLI",
           "qnli": "QNLI", "rte": "RTE"}


def _rows(task: str, labels: list[str], tag: str) -> list[list[str]]:
    header, make = LAYOUTS[task]
    rows = [] if header is None else [header]
    for i, label in enumerate(labels):
        rows.append(make(i, f'{tag} first "quoted sentence {i}', f"{tag} second sentence {i}'s", label))
    return rows


def make_glue_dir(root: Path, task: str, train_labels=None, dev_labels=None) -> Path:
    folder = root / FOLDERS[task]
    train_labels = RAW_LABELS[task] if train_labels is None else train_labels
    dev_labels = RAW_LABELS[task][:2] if dev_labels is None else dev_labels
    _write(folder / "train.tsv", _rows(task, train_labels, "train"))
    if task == "mnli":
        _write(folder / "dev_matched.tsv", _rows(task, dev_labels, "matched"))
        _write(folder / "dev_mismatched.tsv", _rows(task, dev_labels[::-1] + dev_labels[:1], "mismatched"))
    else:
        _write(folder / "dev.tsv", _rows(task, dev_labels, "dev"))
    return folder


# --------------------------------------------------------------------------------------------- loading

@pytest.mark.parametrize("task", sorted(glue.TASKS))
def test_every_task_parses_its_layout(tmp_path, tokenizer, task):
    make_glue_dir(tmp_path, task)
    data = build_task(DataConfig(task=task, data_dir=str(tmp_path), max_length=24), tokenizer, seed=0)
    spec = glue.TASKS[task]
    assert data.name == task and data.metric_name == spec.metric_name
    assert data.regression == (task == "stsb")
    assert data.num_labels == {"stsb": 1, "mnli": 3}.get(task, 2)
    assert data.train["labels"].tolist() == pytest.approx(EXPECTED_IDS[task])
    assert data.train["labels"].dtype == (torch.float32 if task == "stsb" else torch.long)
    assert data.train["input_ids"].shape == (3, 24)
    assert len(data.eval["labels"]) == (5 if task == "mnli" else 2)
    # quotes survive verbatim (QUOTE_NONE) and pairs are tokenized as pairs
    text = tokenizer.decode(data.train["input_ids"][0], skip_special_tokens=True)
    assert '" quoted sentence 0' in text
    pair = spec.text_columns[1:] != ()
    assert ("second sentence" in text) == pair
    assert bool(data.train["token_type_ids"][0].any()) == pair
    metrics = data.metric(data.eval["labels"].clone(), data.eval["labels"])
    assert data.metric_name in metrics
    if task != "cola":  # two dev rows with distinct labels: perfect predictions score 1
        assert metrics[data.metric_name] == pytest.approx(1.0)


def test_cola_without_header_reads_first_row(tmp_path):
    folder = make_glue_dir(tmp_path, "cola")
    examples = glue.read_tsv(glue.TASKS["cola"], folder / "train.tsv")
    assert [e.label for e in examples] == [1, 0, 1]
    assert examples[0].text_a.startswith("train first") and examples[0].text_b is None


@pytest.mark.parametrize("name,key", [("SST-2", "sst2"), ("sst-2", "sst2"), ("sst_2", "sst2"), ("STS-B", "stsb"),
                                      ("MNLI", "mnli"), ("glue/qnli", "qnli"), ("CoLA", "cola"), ("RTE", "rte")])
def test_task_name_spellings(name, key):
    assert glue.canonical_task(name) == key


def test_data_dir_can_be_the_task_folder(tmp_path, tokenizer):
    folder = make_glue_dir(tmp_path, "mrpc")
    for path in (tmp_path, folder):
        data = build_task(DataConfig(task="MRPC", data_dir=str(path)), tokenizer, seed=0)
        assert data.train_size == 3


def test_mnli_eval_reports_matched_and_mismatched(tmp_path, tokenizer):
    make_glue_dir(tmp_path, "mnli", dev_labels=["entailment", "neutral"])
    data = build_task(DataConfig(task="mnli", data_dir=str(tmp_path)), tokenizer, seed=0)
    labels = data.eval["labels"]
    assert labels.tolist() == [0, 1, 1, 0, 0]  # matched rows, then mismatched
    predictions = torch.tensor([0, 1, 0, 0, 2])  # matched 2/2, mismatched 1/3
    metrics = data.metric(predictions, labels)
    assert metrics == {"accuracy": pytest.approx(1.0), "accuracy_mm": pytest.approx(1 / 3)}


def test_hub_conversion_on_in_memory_datasets():
    datasets = pytest.importorskip("datasets")
    mnli = datasets.Dataset.from_dict({"premise": ["p0", "p1"], "hypothesis": ["h0", "h1"], "label": [2, 0],
                                       "idx": [0, 1]})
    examples = glue.examples_from_hub(glue.TASKS["mnli"], mnli, "validation_matched")
    assert examples == [glue.Example("p0", "h0", 2), glue.Example("p1", "h1", 0)]
    stsb = datasets.Dataset.from_dict({"sentence1": ["a"], "sentence2": ["b"], "label": [3.25], "idx": [0]})
    assert glue.examples_from_hub(glue.TASKS["stsb"], stsb)[0].label == pytest.approx(3.25)
    sst2 = datasets.Dataset.from_dict({"sentence": ["x"], "label": [1], "idx": [0]})
    assert glue.examples_from_hub(glue.TASKS["sst2"], sst2) == [glue.Example("x", None, 1)]
    test_split = datasets.Dataset.from_dict({"sentence": ["x"], "label": [-1], "idx": [0]})
    with pytest.raises(ConfigError, match=r"row 0: label -1"):
        glue.examples_from_hub(glue.TASKS["sst2"], test_split, "test")
    with pytest.raises(ConfigError, match=r"missing column\(s\) \['question1', 'question2'\]"):
        glue.examples_from_hub(glue.TASKS["qqp"], sst2)


# --------------------------------------------------------------------------------------------- errors

def test_missing_files_are_named(tmp_path, tokenizer):
    folder = make_glue_dir(tmp_path, "rte")
    (folder / "dev.tsv").unlink()
    with pytest.raises(ConfigError, match=r"RTE/dev\.tsv not found"):
        build_task(DataConfig(task="rte", data_dir=str(tmp_path)), tokenizer, seed=0)
    folder = make_glue_dir(tmp_path, "mnli")
    (folder / "dev_mismatched.tsv").unlink()
    with pytest.raises(ConfigError, match=r"dev_mismatched\.tsv not found"):
        glue.load_local(glue.TASKS["mnli"], tmp_path)
    with pytest.raises(ConfigError, match=r"QQP/train\.tsv"):
        glue.load_local(glue.TASKS["qqp"], tmp_path)
    with pytest.raises(ConfigError, match="is not a directory"):
        glue.load_local(glue.TASKS["qqp"], tmp_path / "nowhere")


def test_missing_columns_are_named(tmp_path):
    _write(tmp_path / "QNLI" / "train.tsv", [["index", "sentence1", "sentence", "label"], ["0", "a", "b", "entailment"]])
    _write(tmp_path / "QNLI" / "dev.tsv", [["index", "question", "sentence", "label"], ["0", "a", "b", "entailment"]])
    with pytest.raises(ConfigError, match=r"train\.tsv: missing column\(s\) \['question'\]"):
        glue.load_local(glue.TASKS["qnli"], tmp_path)


def test_bad_labels_name_value_and_line(tmp_path):
    make_glue_dir(tmp_path, "sst2", train_labels=["0", "1", "2"])
    with pytest.raises(ConfigError, match=r"train\.tsv: line 4: label '2' is not one of the sst2 labels"):
        glue.load_local(glue.TASKS["sst2"], tmp_path)
    make_glue_dir(tmp_path, "mnli", dev_labels=["entailment", "-"])
    with pytest.raises(ConfigError, match=r"dev_matched\.tsv: line 3: label '-'"):
        glue.load_local(glue.TASKS["mnli"], tmp_path)
    make_glue_dir(tmp_path, "stsb", train_labels=["1.0", "5.5"])
    with pytest.raises(ConfigError, match=r"line 3: label '5\.5' outside the STS-B range"):
        glue.load_local(glue.TASKS["stsb"], tmp_path)
    make_glue_dir(tmp_path, "cola", train_labels=["1", "x"])
    with pytest.raises(ConfigError, match=r"line 2: label 'x'"):  # no header: data starts on line 1
        glue.load_local(glue.TASKS["cola"], tmp_path)


def test_short_rows_are_reported(tmp_path):
    _write(tmp_path / "train.tsv", [["sentence", "label"], ["fine", "1"], ["no label"]])
    with pytest.raises(ConfigError, match=r"line 3 has 1 field\(s\)"):
        glue.read_tsv(glue.TASKS["sst2"], tmp_path / "train.tsv")


def test_unknown_task_lists_tasks(tokenizer):
    with pytest.raises(ConfigError, match=r"unknown task 'wnli'.*'cola'.*'stsb'"):
        build_task(DataConfig(task="wnli"), tokenizer, seed=0)
    with pytest.raises(ConfigError, match="available"):
        glue.get_spec("squad")


# --------------------------------------------------------------------------------------------- metrics

def test_matthews_against_hand_computation():
    labels = [1, 1, 1, 0, 0, 0, 1, 0]
    predictions = [1, 1, 0, 0, 0, 1, 1, 0]  # tp 3 tn 3 fp 1 fn 1
    expected = (3 * 3 - 1 * 1) / np.sqrt(4 * 4 * 4 * 4)
    assert glue.matthews_corrcoef(torch.tensor(predictions), torch.tensor(labels)) == pytest.approx(expected)
    tp, tn, fp, fn = 4, 2, 1, 3
    labels = [1] * tp + [0] * tn + [0] * fp + [1] * fn
    predictions = [1] * tp + [0] * tn + [1] * fp + [0] * fn
    expected = (tp * tn - fp * fn) / np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert glue.matthews_corrcoef(predictions, labels) == pytest.approx(expected)


def test_matthews_multiclass_matches_sklearn():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    labels, predictions = rng.integers(0, 3, 50), rng.integers(0, 3, 50)
    assert glue.matthews_corrcoef(predictions, labels) == pytest.approx(
        sklearn_metrics.matthews_corrcoef(labels, predictions))


def test_constant_predictions_give_zero_matthews_with_warning():
    with pytest.warns(RuntimeWarning, match="Matthews correlation is undefined"):
        assert glue.matthews_corrcoef(torch.ones(6, dtype=torch.long), torch.tensor([0, 1, 0, 1, 1, 0])) == 0.0


def test_f1_against_hand_computation():
    labels = torch.tensor([1, 1, 1, 0, 0, 0, 1])
    predictions = torch.tensor([1, 0, 1, 1, 0, 0, 0])  # tp 2 fp 1 fn 2
    precision, recall = 2 / 3, 2 / 4
    assert glue.f1_binary(predictions, labels) == pytest.approx(2 * precision * recall / (precision + recall))
    with pytest.warns(RuntimeWarning):
        assert glue.f1_binary(torch.zeros(3), torch.zeros(3)) == 0.0
    assert glue.TASKS["mrpc"].metrics(predictions.numpy(), labels.numpy()) == {
        "accuracy": pytest.approx(4 / 7), "f1": pytest.approx(4 / 7)}


def test_correlations_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1)
    labels = np.round(rng.uniform(0, 5, 40) * 2) / 2  # many ties, as in STS-B
    predictions = labels + rng.normal(0, 1, 40)
    predictions[:5] = predictions[5]  # ties in the predictions too
    metrics = glue.TASKS["stsb"].metrics(torch.tensor(predictions, dtype=torch.float32), torch.tensor(labels))
    assert metrics["pearson"] == pytest.approx(stats.pearsonr(predictions, labels)[0], abs=1e-6)
    assert metrics["spearman"] == pytest.approx(stats.spearmanr(predictions, labels)[0], abs=1e-9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        glue.pearson(predictions, labels)
    with pytest.warns(RuntimeWarning, match="constant"):
        assert glue.pearson(np.ones(4), np.arange(4.0)) == 0.0


def test_metric_rejects_mismatched_lengths(tmp_path):
    metric = glue.make_metric(glue.TASKS["sst2"], [3])
    with pytest.raises(ValueError, match="2 predictions for 3"):
        metric(torch.tensor([0, 1]), torch.tensor([0, 1]))


# --------------------------------------------------------------------------------------------- real data

@pytest.mark.parametrize("task,folder,train_rows,dev_rows", [("sst2", "SST-2", 67_349, 872),
                                                             ("mrpc", "MRPC", 2_576, 1_500)])
def test_real_glue_copies(task, folder, train_rows, dev_rows):
    if not (REAL_GLUE / folder / "train.tsv").is_file():
        pytest.skip(f"no real GLUE copy at {REAL_GLUE / folder}")
    train, (dev,) = glue.load_local(glue.TASKS[task], REAL_GLUE)
    assert (len(train), len(dev)) == (train_rows, dev_rows)
    assert {e.label for e in train} == {0, 1} and {e.label for e in dev} == {0, 1}
    assert all(e.text_a for e in train) and (task == "sst2") == (train[0].text_b is None)


def test_stsb_regression_batches_train_and_evaluate_with_a_one_label_model(tmp_path, tokenizer):
    """Float labels give HF's MSE loss; evaluation uses the squeezed logits (TaskData.regression)."""
    transformers = pytest.importorskip("transformers")
    from scale_rank.data.tasks import select
    make_glue_dir(tmp_path, "stsb")
    data = build_task(DataConfig(task="stsb", data_dir=str(tmp_path), max_length=16), tokenizer, seed=0)
    config = transformers.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32, num_labels=data.num_labels)
    model = transformers.BertForSequenceClassification(config).eval()
    with torch.no_grad():
        out = model(**select(data.train, torch.arange(3), 16))
        logits = model(**select(data.eval, torch.arange(2), 16, labels=False)).logits
    assert out.logits.shape == (3, 1)
    assert float(out.loss) == pytest.approx(float(((out.logits.squeeze(-1) - data.train["labels"]) ** 2).mean()))
    predictions = logits.squeeze(-1).float().cpu() if data.regression else logits.argmax(-1).cpu()
    metrics = data.metric(predictions, data.eval["labels"])
    assert set(metrics) == {"pearson", "spearman"} and abs(metrics["pearson"]) == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------ hub, CLI

def test_hub_path_loads_through_datasets(monkeypatch, tokenizer):
    """No data_dir: build_task asks datasets.load_dataset for nyu-mll/glue (the hub is simulated)."""
    datasets = pytest.importorskip("datasets")
    calls = []

    def load_dataset(name, config):
        calls.append((name, config))
        split = datasets.Dataset.from_dict({"sentence1": ["a b", "c d", "e f"], "sentence2": ["a b", "x", "e"],
                                            "label": [1, 0, 1], "idx": [0, 1, 2]})
        return datasets.DatasetDict({"train": split, "validation": split, "test": split})
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    task = build_task(DataConfig(task="mrpc", max_length=16), tokenizer, seed=0)
    assert calls == [("nyu-mll/glue", "mrpc")]
    assert task.train_size == 3 and task.metric_name in task.metric(torch.tensor([1, 0, 1]), task.eval["labels"])


def test_hub_failure_says_to_use_a_local_copy(monkeypatch, tokenizer):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: (_ for _ in ()).throw(ConnectionError("offline")))
    with pytest.raises(ConfigError, match="set data.data_dir to a local glue_data copy"):
        build_task(DataConfig(task="sst2"), tokenizer, seed=0)


def test_cli_bad_data_is_one_line_and_leaves_no_run_directory(tmp_path, capsys):
    from scale_rank.cli import main
    make_glue_dir(tmp_path / "glue", "sst2", train_labels=["0", "7"])
    out = tmp_path / "run"
    code = main(["train", "--task", "sst2", "--data-dir", str(tmp_path / "glue"), "--output-dir", str(out),
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "label '7' is not one of the sst2 labels" in err
    assert "Traceback" not in err and not out.exists()
