"""Every shipped recipe loads and passes validation with the real GLUE training-set sizes."""
from __future__ import annotations

from pathlib import Path

import pytest

from scale_rank.config import load_config
from scale_rank.train import resolve_total_steps

ROOT = Path(__file__).resolve().parents[1]
GLUE_TRAIN_SIZE = {"mnli": 392_702, "rte": 2_490, "qnli": 104_743, "mrpc": 3_668, "qqp": 363_846,
                   "sst2": 67_349, "cola": 8_551, "stsb": 5_749}
RECIPES = sorted((ROOT / "configs").rglob("*.yaml"))


def test_a_recipe_for_every_glue_task_and_method():
    names = {p.stem for p in (ROOT / "configs" / "glue").glob("*.yaml")}
    assert names == {f"{t}_{m}" for t in GLUE_TRAIN_SIZE for m in ("lora", "adalora", "sora", "increlora", "prilora")}


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_validates(path):
    cfg = load_config(path)
    size = GLUE_TRAIN_SIZE.get(cfg.data.task, cfg.data.train_size)
    cfg.train.total_steps = resolve_total_steps(cfg, size)
    cfg.validate()
