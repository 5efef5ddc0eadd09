"""Dry runs and memory plans for adapter fine-tuning of large models (`scale-rank plan`).

models.py    geometry from a config: closed form for llama / mistral / qwen2, meta-device builds otherwise
adapters.py  closed-form adapter counts per method, per-method statistics, controller traffic
memory.py    per-GPU memory: weights, adapters, gradients, AdamW, method state, activations
planner.py   the plan for one configuration, whether it fits, what to change
report.py    the text table
"""
from .adapters import AdapterPlan, plan_adapters
from .memory import ENGINES, MemoryBreakdown, PlanInputs, activations, memory_breakdown
from .models import (ModelGeometry, build_meta_model, load_model_config, meta_trainable_count,
                     model_geometry)
from .planner import Plan, make_plan
from .report import format_plan

__all__ = ["AdapterPlan", "ENGINES", "MemoryBreakdown", "ModelGeometry", "Plan", "PlanInputs", "activations",
           "build_meta_model", "format_plan", "load_model_config", "make_plan", "memory_breakdown",
           "meta_trainable_count", "model_geometry", "plan_adapters"]
