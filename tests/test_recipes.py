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


LLM_RECIPES = sorted((ROOT / "configs" / "llm").glob("*.yaml"))


def test_llm_recipes_cover_every_method_engine_and_base():
    names = {p.stem for p in LLM_RECIPES}
    for method in ("lora", "adalora", "sora", "increlora", "prilora"):
        for engine in ("zero3", "fsdp2"):
            assert {f"llama3_8b_{method}_{engine}", f"llama3_8b_{method}_{engine}_qlora"} <= names


@pytest.mark.parametrize("path", LLM_RECIPES, ids=[p.stem for p in LLM_RECIPES])
def test_llm_recipe_says_what_its_name_says(path):
    cfg = load_config(path)
    assert cfg.data.task == "chat" and cfg.train.precision == "bf16" and cfg.train.gradient_checkpointing
    assert (cfg.model.quantization == "nf4") == path.stem.endswith("_qlora")
    if "_zero3" in path.stem:
        assert cfg.train.deepspeed_config == "ds_configs/zero3.json"
        assert (ROOT / cfg.train.deepspeed_config).is_file()
    else:
        assert cfg.train.engine == "fsdp2"
    assert cfg.train.output_dir == f"runs/llm/{path.stem}"
    assert f"--config configs/llm/{path.name}" in path.read_text()
