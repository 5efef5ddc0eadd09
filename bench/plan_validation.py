"""Check the memory planner's activation model against measurements on CPU (`scale-rank plan`).

For random-init Llama models built from a config (tiny: hidden 64, 3 layers; small: hidden 512, 8 layers,
vocab 32000, 56M parameters; small-v256: the same with a 256-token vocabulary, so that a block's backward and
not the loss's decides the peak), with scale_rank adapters on every linear of every block, one forward and
backward of a micro-batch is measured two ways:

  saved: bytes of the tensors autograd saves for backward (torch.autograd.graph.saved_tensors_hooks),
         each storage counted once, parameters and buffers excluded. Planner: Activations.saved (the
         `activations` and `logits` lines of `scale-rank plan`).
  peak:  the highest memory allocated during forward + backward beyond what existed before (parameters,
         buffers, inputs), traced by a dispatch mode that follows every storage an op creates until it
         is freed. Planner: Activations.saved + Activations.backward_peak (adds the `backward peak` line).

Checkpointing uses transformers' activation checkpointing with use_reentrant=True: the reentrant form saves
each block's input through save_for_backward, where the hooks see it (the default non-reentrant form keeps
the same tensors alive through a closure the hooks cannot see). The rotary cos / sin tables stay alive the
same way in both forms: the planner counts them, the `saved` measurement cannot see them (the peak does).

    python bench/plan_validation.py                 # every case: 8.5 min on 2 CPU cores
    python bench/plan_validation.py --models tiny --json out.json   # 30 s
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import AutoModelForCausalLM, LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scale_rank import RankController, adapt  # noqa: E402
from scale_rank.config import method_config  # noqa: E402
from scale_rank.planning.adapters import plan_adapters  # noqa: E402
from scale_rank.planning.memory import PlanInputs, activations  # noqa: E402
from scale_rank.planning.models import model_geometry  # noqa: E402

MODELS = {
    "tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000, max_position_embeddings=512),
    "small": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=4, vocab_size=32000, max_position_embeddings=1024),
}
MODELS["small-v256"] = {**MODELS["small"], "vocab_size": 256}  # a block's backward, not the loss, peaks
SHAPES = {"tiny": (128, 2), "small": (256, 2), "small-v256": (256, 2)}  # (seq_len, micro_batch)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
METHODS = {"lora": {"r": 8}, "adalora": {"r_init": 8, "r_target": 4}}
PRECISIONS = (("fp32", "fp32"), ("bf16", "bf16"), ("bf16", "fp32"))  # (model, adapters)


@dataclass
class Case:
    model: str
    method: str
    model_dtype: str
    adapter_dtype: str
    checkpointing: bool


def build(case: Case) -> tuple[torch.nn.Module, LlamaConfig]:
    """Random-init Llama in the model dtype, adapters attached, then cast to the adapter dtype."""
    torch.manual_seed(0)
    config = LlamaConfig(**MODELS[case.model], attn_implementation="sdpa")
    model = AutoModelForCausalLM.from_config(config).to(DTYPES[case.model_dtype])
    method = adapt(model, method_config(case.method, **METHODS[case.method]), 100, trainable=[])
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = param.data.to(DTYPES[case.adapter_dtype])
    for name, buffer in model.named_buffers():
        if name.endswith(".active"):
            buffer.data = buffer.data.to(DTYPES[case.adapter_dtype])
    RankController(model, method)  # sets the orthogonality regularizer (AdaLoRA) as in training
    if case.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    return model, config


def batch(case: Case) -> torch.Tensor:
    seq, micro = SHAPES[case.model]
    return torch.randint(0, MODELS[case.model]["vocab_size"], (micro, seq), generator=torch.Generator().manual_seed(1))


def storages(model: torch.nn.Module) -> set[int]:
    """Addresses of the storages of the model's parameters and buffers."""
    return {tensor.untyped_storage().data_ptr() for tensor in [*model.parameters(), *model.buffers()]}


def measure_saved(case: Case) -> int:
    """Bytes of distinct storages autograd saves for backward in one forward (parameters excluded)."""
    model, _ = build(case)
    ids = batch(case)
    owned = storages(model)
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in owned:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(input_ids=ids, labels=ids).loss
    del loss
    return sum(saved.values())


class PeakTracker(TorchDispatchMode):
    """Live bytes of every storage an op creates while active (freed storages leave via weakref), and
    their highest sum. The storages in `owned` (parameters, buffers: ops return views of them) are not
    counted."""

    def __init__(self, owned: set[int]):
        super().__init__()
        self.owned = owned
        self.live: set[int] = set()
        self.current = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu":
                self._track(tensor.untyped_storage())
        return out

    def _track(self, storage: torch.UntypedStorage) -> None:
        key = storage.data_ptr()
        if key in self.live or key in self.owned or storage.nbytes() == 0:
            return
        self.live.add(key)
        self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key, storage.nbytes())

    def _free(self, key: int, nbytes: int) -> None:
        self.live.discard(key)
        self.current -= nbytes


def measure_peak(case: Case) -> int:
    """Peak bytes allocated during forward + backward beyond what existed before (the model, the batch)."""
    model, _ = build(case)
    ids = batch(case)
    tracker = PeakTracker(storages(model))
    with tracker:
        model(input_ids=ids, labels=ids).loss.backward()
    return tracker.peak


def planned(case: Case) -> dict[str, int]:
    """The planner's numbers for the same model, method, dtypes and batch shape."""
    config = LlamaConfig(**MODELS[case.model])
    geometry = model_geometry(config)
    plan = plan_adapters(geometry, method_config(case.method, **METHODS[case.method]))
    seq, micro = SHAPES[case.model]
    inputs = PlanInputs(engine="ddp", gpus=1, seq_len=seq, micro_batch=micro,
                        gradient_checkpointing=case.checkpointing,
                        activation_bytes=DTYPES[case.model_dtype].itemsize,
                        adapter_bytes=DTYPES[case.adapter_dtype].itemsize)
    acts = activations(geometry, plan, inputs)
    return {"saved": acts.saved, "peak": acts.saved + acts.backward_peak}


def run(models: list[str]) -> list[dict]:
    rows = []
    for model in models:
        for method in METHODS:
            for model_dtype, adapter_dtype in PRECISIONS:
                for checkpointing in (False, True):
                    case = Case(model, method, model_dtype, adapter_dtype, checkpointing)
                    start = time.perf_counter()
                    measured = {"saved": measure_saved(case), "peak": measure_peak(case)}
                    plan = planned(case)
                    rows.append({**case.__dict__, **{f"{k}_measured": v for k, v in measured.items()},
                                 **{f"{k}_planned": v for k, v in plan.items()},
                                 "seconds": round(time.perf_counter() - start, 2)})
    return rows


def print_table(rows: list[dict]) -> None:
    print("| model | method | model / adapter dtype | checkpointing | saved: planned MiB | measured MiB | error "
          "| peak: planned MiB | measured MiB | error |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        cells = [row["model"], row["method"], f"{row['model_dtype']} / {row['adapter_dtype']}",
                 "yes" if row["checkpointing"] else "no"]
        for key in ("saved", "peak"):
            planned, measured = row[f"{key}_planned"], row[f"{key}_measured"]
            cells += [f"{planned / 2**20:.3f}", f"{measured / 2**20:.3f}", f"{(planned - measured) / measured:+.1%}"]
        print("| " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {list(MODELS)}")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    rows = run(args.models.split(","))
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
