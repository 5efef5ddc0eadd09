"""The eight GLUE tasks: loading (classic glue_data TSVs or the hub), label mapping and official metrics.

Two sources, one code path after loading:

* `data.data_dir=PATH`: the classic `glue_data` layout. PATH is either the folder holding `<TASK>/train.tsv`
  and `<TASK>/dev.tsv` (MNLI: `dev_matched.tsv` and `dev_mismatched.tsv`) or the task folder itself. The TSVs
  are read with `csv` and QUOTE_NONE (GLUE text contains unbalanced quotes), columns by their header names
  (CoLA ships without a header: source, label, original_label, sentence).
* no data_dir: `datasets.load_dataset("nyu-mll/glue", config)`, converted by `examples_from_hub`.

Both produce `Example(text_a, text_b, label)` lists with the hub's label ids (MNLI: entailment 0, neutral 1,
contradiction 2; QNLI/RTE: entailment 0, not_entailment 1), so a model trained from one source scores the
same on the other.

MNLI evaluates on matched and mismatched dev: `task.eval` holds the matched rows followed by the mismatched
ones and the metric splits them (`accuracy` = matched, the primary metric, and `accuracy_mm`).

Metrics follow the official GLUE definitions (sklearn / scipy conventions), computed in numpy:
Matthews correlation (CoLA), accuracy, binary F1 of class 1 (MRPC, QQP), Pearson and Spearman (STS-B).
Undefined values follow sklearn: a Matthews correlation whose denominator is 0 (e.g. constant predictions)
is 0.0 with a warning, and so is an F1 with no positive predictions and no positive labels; a Pearson or
Spearman correlation of a constant series (where scipy returns nan) is also reported as 0.0 with a warning,
so best-checkpoint selection never compares against nan.
"""
from __future__ import annotations

import csv
import math
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..config import ConfigError


@dataclass(frozen=True)
class Example:
    text_a: str
    text_b: str | None
    label: float | int


@dataclass(frozen=True)
class GlueSpec:
    name: str  # canonical key: cola, sst2, ...
    folder: str  # glue_data folder name
    hub_config: str
    text_columns: tuple[str, ...]  # TSV header names (one or two)
    label_column: str
    labels: tuple[str, ...] | None  # raw TSV label strings in id order; None: regression
    hub_text_columns: tuple[str, ...]
    metric_name: str  # primary metric key
    metrics: Callable[[np.ndarray, np.ndarray], dict[str, float]] = field(repr=False, compare=False)
    eval_files: tuple[str, ...] = ("dev.tsv",)
    hub_eval_splits: tuple[str, ...] = ("validation",)
    header: bool = True
    no_header_columns: tuple[str, ...] = ()  # column names when the file has no header (CoLA)

    @property
    def regression(self) -> bool:
        return self.labels is None

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)


# --------------------------------------------------------------------------------------------- metrics

def _as_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        x = x.double() if x.is_floating_point() else x
        return x.numpy()
    return np.asarray(x)


def _check_lengths(predictions: np.ndarray, labels: np.ndarray) -> None:
    if predictions.shape != labels.shape:
        raise ValueError(f"predictions {predictions.shape} and labels {labels.shape} differ in shape")
    if predictions.size == 0:
        raise ValueError("cannot compute a metric on zero examples")


def accuracy_score(predictions, labels) -> float:
    p, y = _as_numpy(predictions), _as_numpy(labels)
    _check_lengths(p, y)
    return float((p == y).mean())


def f1_binary(predictions, labels) -> float:
    """F1 of class 1 (sklearn's f1_score, average='binary'); 0.0 with a warning when undefined."""
    p, y = _as_numpy(predictions), _as_numpy(labels)
    _check_lengths(p, y)
    tp = float(np.sum((p == 1) & (y == 1)))
    fp = float(np.sum((p == 1) & (y != 1)))
    fn = float(np.sum((p != 1) & (y == 1)))
    denominator = 2 * tp + fp + fn
    if denominator == 0:
        warnings.warn("F1 is undefined (no positive predictions or labels); reporting 0.0", RuntimeWarning,
                      stacklevel=2)
        return 0.0
    return 2 * tp / denominator


def matthews_corrcoef(predictions, labels) -> float:
    """Multiclass Matthews correlation (sklearn's formula); 0.0 with a warning when the denominator is 0."""
    p, y = _as_numpy(predictions), _as_numpy(labels)
    _check_lengths(p, y)
    classes, inverse = np.unique(np.concatenate([y, p]), return_inverse=True)
    y_idx, p_idx = inverse[:len(y)], inverse[len(y):]
    confusion = np.zeros((len(classes), len(classes)), dtype=np.float64)
    np.add.at(confusion, (y_idx, p_idx), 1)
    t_sum, p_sum = confusion.sum(1), confusion.sum(0)
    correct, n = np.trace(confusion), confusion.sum()
    cov_yp = correct * n - np.dot(t_sum, p_sum)
    cov_pp = n * n - np.dot(p_sum, p_sum)
    cov_yy = n * n - np.dot(t_sum, t_sum)
    if cov_pp * cov_yy == 0:
        warnings.warn("Matthews correlation is undefined (constant predictions or labels); reporting 0.0",
                      RuntimeWarning, stacklevel=2)
        return 0.0
    return float(cov_yp / math.sqrt(cov_yy * cov_pp))


def _rank(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (scipy.stats.rankdata 'average')."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    starts = np.concatenate([[True], sorted_x[1:] != sorted_x[:-1]])
    group = np.cumsum(starts) - 1
    first = np.flatnonzero(starts)
    counts = np.diff(np.append(first, len(x)))
    average = first + (counts + 1) / 2.0  # mean of 1-based positions first+1 .. first+count
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = average[group]
    return ranks


def pearson(predictions, labels) -> float:
    """Pearson correlation; 0.0 with a warning when either series is constant (scipy: nan)."""
    p, y = _as_numpy(predictions).astype(np.float64), _as_numpy(labels).astype(np.float64)
    _check_lengths(p, y)
    p, y = p - p.mean(), y - y.mean()
    denominator = math.sqrt(float(np.dot(p, p)) * float(np.dot(y, y)))
    if denominator == 0:
        warnings.warn("correlation is undefined for a constant series; reporting 0.0", RuntimeWarning,
                      stacklevel=2)
        return 0.0
    return float(np.clip(np.dot(p, y) / denominator, -1.0, 1.0))


def spearman(predictions, labels) -> float:
    p, y = _as_numpy(predictions).astype(np.float64), _as_numpy(labels).astype(np.float64)
    _check_lengths(p, y)
    return pearson(_rank(p), _rank(y))


def _metrics_accuracy(p, y):
    return {"accuracy": accuracy_score(p, y)}


def _metrics_mcc(p, y):
    return {"matthews_corr": matthews_corrcoef(p, y), "accuracy": accuracy_score(p, y)}


def _metrics_acc_f1(p, y):
    return {"accuracy": accuracy_score(p, y), "f1": f1_binary(p, y)}


def _metrics_corr(p, y):
    return {"pearson": pearson(p, y), "spearman": spearman(p, y)}


# --------------------------------------------------------------------------------------------- tasks

_NLI = ("entailment", "not_entailment")

TASKS: dict[str, GlueSpec] = {spec.name: spec for spec in (
    GlueSpec("cola", "CoLA", "cola", ("sentence",), "label", ("0", "1"), ("sentence",),
             "matthews_corr", _metrics_mcc, header=False,
             no_header_columns=("source", "label", "original_label", "sentence")),
    GlueSpec("sst2", "SST-2", "sst2", ("sentence",), "label", ("0", "1"), ("sentence",),
             "accuracy", _metrics_accuracy),
    GlueSpec("mrpc", "MRPC", "mrpc", ("#1 String", "#2 String"), "Quality", ("0", "1"),
             ("sentence1", "sentence2"), "accuracy", _metrics_acc_f1),
    GlueSpec("qqp", "QQP", "qqp", ("question1", "question2"), "is_duplicate", ("0", "1"),
             ("question1", "question2"), "accuracy", _metrics_acc_f1),
    GlueSpec("stsb", "STS-B", "stsb", ("sentence1", "sentence2"), "score", None,
             ("sentence1", "sentence2"), "pearson", _metrics_corr),
    GlueSpec("mnli", "MNLI", "mnli", ("sentence1", "sentence2"), "gold_label",
             ("entailment", "neutral", "contradiction"), ("premise", "hypothesis"), "accuracy",
             _metrics_accuracy, eval_files=("dev_matched.tsv", "dev_mismatched.tsv"),
             hub_eval_splits=("validation_matched", "validation_mismatched")),
    GlueSpec("qnli", "QNLI", "qnli", ("question", "sentence"), "label", _NLI, ("question", "sentence"),
             "accuracy", _metrics_accuracy),
    GlueSpec("rte", "RTE", "rte", ("sentence1", "sentence2"), "label", _NLI, ("sentence1", "sentence2"),
             "accuracy", _metrics_accuracy),
)}

STSB_RANGE = (0.0, 5.0)


def _normalise(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def canonical_task(name: str) -> str | None:
    """'SST-2', 'sst_2', 'glue/sst2', 'STS-B', 'MNLI' ... -> the TASKS key, or None if not a GLUE task."""
    key = _normalise(name.split("/", 1)[1] if name.lower().startswith("glue/") else name)
    aliases = {"mnlim": "mnli", "mnlimm": "mnli", "mnlimatched": "mnli", "stsbenchmark": "stsb"}
    key = aliases.get(key, key)
    return key if key in TASKS else None


def is_glue_task(name: str) -> bool:
    return canonical_task(name) is not None


def get_spec(name: str) -> GlueSpec:
    key = canonical_task(name)
    if key is None:
        raise ConfigError(f"unknown GLUE task {name!r}; available: {sorted(TASKS)}")
    return TASKS[key]


# --------------------------------------------------------------------------------------------- loading

def _parse_label(spec: GlueSpec, raw: str, where: str) -> float | int:
    value = raw.strip()
    if spec.labels is None:
        try:
            score = float(value)
        except ValueError:
            raise ConfigError(f"{where}: label {raw!r} is not a number (STS-B scores are in "
                              f"[{STSB_RANGE[0]}, {STSB_RANGE[1]}])") from None
        if not (STSB_RANGE[0] <= score <= STSB_RANGE[1]):
            raise ConfigError(f"{where}: label {raw!r} outside the STS-B range {list(STSB_RANGE)}")
        return score
    if value not in spec.labels:
        raise ConfigError(f"{where}: label {raw!r} is not one of the {spec.name} labels {list(spec.labels)}")
    return spec.labels.index(value)


def read_tsv(spec: GlueSpec, path: Path) -> list[Example]:
    """One GLUE TSV in the shipped column layout; ConfigError names the file, column, value and line."""
    if not path.is_file():
        raise ConfigError(f"GLUE {spec.name}: expected file {path} not found")
    csv.field_size_limit(min(sys.maxsize, 2 ** 31 - 1))
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            rows = list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: line {_first_undecodable_line(path)} is not UTF-8 text; re-save the file as "
                          "UTF-8") from error
    if not rows:
        raise ConfigError(f"{path}: empty file")
    first_data_line = 1
    if spec.header:
        header = [name.strip() for name in rows[0]]
        rows = rows[1:]
        first_data_line = 2
    else:
        header = list(spec.no_header_columns)
        if rows and [c.strip() for c in rows[0][:len(header)]] == header:  # tolerate an added header
            rows = rows[1:]
            first_data_line = 2
    needed = (*spec.text_columns, spec.label_column)
    missing = [name for name in needed if name not in header]
    if missing:
        raise ConfigError(f"{path}: missing column(s) {missing} for GLUE {spec.name} (found {header}); "
                          f"expected the glue_data layout")
    text_idx = [header.index(name) for name in spec.text_columns]
    label_idx = header.index(spec.label_column)
    width = max(*text_idx, label_idx) + 1
    examples = []
    for offset, row in enumerate(rows):
        line = first_data_line + offset
        if not row or (len(row) == 1 and not row[0].strip()):
            continue  # blank line (trailing newline)
        if len(row) < width:
            raise ConfigError(f"{path}: line {line} has {len(row)} field(s), expected at least {width} "
                              f"(columns {header})")
        label = _parse_label(spec, row[label_idx], f"{path}: line {line}")
        texts = [row[i] for i in text_idx]
        examples.append(Example(texts[0], texts[1] if len(texts) > 1 else None, label))
    if not examples:
        raise ConfigError(f"{path}: no examples")
    return examples


def _first_undecodable_line(path: Path) -> int:
    for number, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            return number
    return 0


def task_directory(spec: GlueSpec, data_dir: str | Path) -> Path:
    """The folder with train.tsv: `data_dir` itself, or its <TASK> subfolder (spelling-insensitive)."""
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise ConfigError(f"data.data_dir {str(root)!r} is not a directory")
    if (root / "train.tsv").is_file():
        return root
    for child in sorted(root.iterdir()):
        if child.is_dir() and canonical_task(child.name) == spec.name:
            return child
    raise ConfigError(f"data.data_dir {str(root)!r} holds neither train.tsv nor a {spec.folder}/ folder "
                      f"(expected {root / spec.folder / 'train.tsv'})")


def load_local(spec: GlueSpec, data_dir: str | Path) -> tuple[list[Example], list[list[Example]]]:
    """(train examples, [eval examples per eval split]) from a glue_data directory."""
    folder = task_directory(spec, data_dir)
    for name in ("train.tsv", *spec.eval_files):  # name every missing file before reading anything
        if not (folder / name).is_file():
            raise ConfigError(f"GLUE {spec.name}: expected file {folder / name} not found")
    return read_tsv(spec, folder / "train.tsv"), [read_tsv(spec, folder / name) for name in spec.eval_files]


def examples_from_hub(spec: GlueSpec, dataset, split_name: str = "split") -> list[Example]:
    """A `datasets.Dataset` of nyu-mll/glue (any split with labels) -> Examples, labels validated."""
    needed = (*spec.hub_text_columns, "label")
    missing = [name for name in needed if name not in dataset.column_names]
    if missing:
        raise ConfigError(f"hub GLUE {spec.name} {split_name}: missing column(s) {missing} "
                          f"(found {dataset.column_names})")
    columns = [dataset[name] for name in spec.hub_text_columns]
    examples = []
    for row, label in enumerate(dataset["label"]):
        where = f"hub GLUE {spec.name} {split_name}: row {row}"
        if spec.labels is None:
            value = _parse_label(spec, str(label), where)
        else:
            if isinstance(label, bool) or not isinstance(label, (int, np.integer)) \
                    or not 0 <= int(label) < spec.num_labels:
                raise ConfigError(f"{where}: label {label!r} is not one of the {spec.name} label ids "
                                  f"{list(range(spec.num_labels))} (test splits have no labels)")
            value = int(label)
        texts = [column[row] for column in columns]
        examples.append(Example(texts[0], texts[1] if len(texts) > 1 else None, value))
    if not examples:
        raise ConfigError(f"hub GLUE {spec.name} {split_name}: no examples")
    return examples


def load_hub(spec: GlueSpec) -> tuple[list[Example], list[list[Example]]]:
    try:
        import datasets
    except ImportError as error:
        raise ConfigError("GLUE from the hub needs the package datasets (pip install datasets), "
                          "or set data.data_dir to a local glue_data copy") from error
    try:
        loaded = datasets.load_dataset("nyu-mll/glue", spec.hub_config)
    except Exception as error:  # offline, hub errors: say how to avoid the hub
        raise ConfigError(f"could not load nyu-mll/glue {spec.hub_config!r} from the hub ({error}); "
                          f"set data.data_dir to a local glue_data copy") from error
    return (examples_from_hub(spec, loaded["train"], "train"),
            [examples_from_hub(spec, loaded[split], split) for split in spec.hub_eval_splits])


# --------------------------------------------------------------------------------------------- tensors

def tokenize_examples(tokenizer, examples: list[Example], max_length: int,
                      regression: bool) -> dict[str, torch.Tensor]:
    """Single sentences or sentence pairs (tokenizer(a, b)), padded to max_length; token_type_ids kept."""
    texts_a = [e.text_a for e in examples]
    pairs = examples[0].text_b is not None
    texts_b = [e.text_b for e in examples] if pairs else None
    encoded = tokenizer(texts_a, texts_b, padding="max_length", truncation=True, max_length=max_length,
                        return_tensors="pt")
    out = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
    if "token_type_ids" in encoded:
        out["token_type_ids"] = encoded["token_type_ids"]
    labels = [e.label for e in examples]
    out["labels"] = torch.tensor(labels, dtype=torch.float32 if regression else torch.long)
    return out


def make_metric(spec: GlueSpec, eval_sizes: list[int]) -> Callable[[torch.Tensor, torch.Tensor], dict]:
    """The task metric over the concatenated eval splits (MNLI: matched then mismatched)."""
    def metric(predictions: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        p, y = _as_numpy(predictions), _as_numpy(labels)
        if len(p) != sum(eval_sizes):
            raise ValueError(f"{len(p)} predictions for {sum(eval_sizes)} {spec.name} eval examples")
        if len(eval_sizes) == 1:
            return spec.metrics(p, y)
        results: dict[str, float] = {}
        start = 0
        for size, suffix in zip(eval_sizes, ("", "_mm")):
            part = spec.metrics(p[start:start + size], y[start:start + size])
            results.update({f"{key}{suffix}": value for key, value in part.items()})
            start += size
        return results
    return metric
