"""GPU check: every method on a ~1.1B Llama with a CUDA bitsandbytes 4-bit base, against PEFT LoRA in the same
run: tokens/s and peak memory (one H200, 4 Dec 2026: 3.7 min for --steps 100, numbers in bench/README.md):

    pip install torch==<your CUDA build> && pip install -e ".[dev]"
    python bench/gpu_llm.py --json gpu_llm.json                 # 150 steps each, batch 8 x 512 tokens (~5 min)
    python bench/gpu_llm.py --device cpu --tiny --seq-len 64 --batch 1 --steps 3   # the same code path on CPU

Setup: TinyLlama-1.1B's shape (bench/llm_1b_zero3.py), random init saved once in bf16 and loaded per
configuration with nf4 quantization (compute dtype bf16); adapters on all seven projections of every layer at
the same capacity (PEFT LoRA r=8, scale_rank LoRA r=8, AdaLoRA r_init=12 -> r_target=8, SoRA r_max=8, IncreLoRA
r 2 -> 8 within r_max=12, PRILoRA ranks 4..12 over depth); generated chat data packed into full rows; AdamW
lr 1e-4; decisions as often as each method's schedule allows in a short run. Each configuration trains a fresh
model; `--warmup` untimed steps, then the median step time over the rest gives tokens/s. Peak memory is
torch.cuda.max_memory_allocated over the timed steps (reset after loading).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.llm_1b_zero3 import model_dir as llama_1b_dir  # noqa: E402
from scale_rank.config import DataConfig, method_config  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = ("lora", "adalora", "sora", "increlora", "prilora")


def method_settings(name: str, steps: int) -> dict:
    """Same capacity for every method; schedules scaled to the run (150 steps: decisions from step 10 on)."""
    tenth = max(1, steps // 15)
    return {"lora": {"r": 8},
            "adalora": {"r_init": 12, "r_target": 8, "t_init": tenth, "t_final": max(1, steps // 4),
                        "delta_t": max(1, steps // 30)},
            "sora": {"r_max": 8, "xi": 1e-4},
            "increlora": {"r_start": 2, "r_target": 8, "r_max": 12, "incre_interval": tenth, "t_init": tenth},
            "prilora": {"r_first": 4, "r_last": 12, "prune_interval": max(1, steps // 6)}}[name]


def save_base(path: Path, tiny: bool) -> Path:
    """A random-init base saved once in bf16 (config, weights, tokenizer); every configuration loads it."""
    from transformers import AutoConfig, AutoModelForCausalLM
    if tiny:
        from tests.support.tiny import tiny_decoder_dir
        tiny_decoder_dir(path)
    else:
        llama_1b_dir(path)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.bfloat16)
    model.save_pretrained(path)
    return path


def load_base(path: Path, device: str):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_compute_dtype=torch.bfloat16)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization, dtype=torch.bfloat16,
                                                device_map={"": device})


def batches(path: Path, seq_len: int, batch: int, steps: int) -> list[dict[str, torch.Tensor]]:
    """Packed rows of generated chat data, `batch` rows per step (cycled if the data runs short)."""
    from transformers import AutoTokenizer

    from scale_rank.data import chat, synthetic_chat
    tokenizer = AutoTokenizer.from_pretrained(path)
    records = synthetic_chat.generate(max(64, steps * batch * seq_len // 24), seed=0)
    rows = chat.tokenize_records(tokenizer, records, DataConfig(task="synthetic_chat", max_length=seq_len,
                                                                packing=True), "train")
    n = len(rows["input_ids"]) - 1  # the last packed row may be short
    return [{k: v[[(s * batch + i) % n for i in range(batch)]] for k, v in rows.items()} for s in range(steps)]


PHASES = ("forward", "backward", "observe", "optimizer", "apply", "zero_grad")  # of Trainer.step


class Trainer:
    """One configuration: the model, its optimizer and (scale_rank) controller."""

    def __init__(self, name: str, base, steps: int, lr: float, overrides: dict | None = None):
        """`overrides`: method settings that replace `method_settings`' (ablations, bench/gpu_step_profile.py)."""
        self.name = name
        self.controller = None
        if name == "peft_lora":
            from peft import LoraConfig, get_peft_model
            self.model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
            params = [{"params": [p for p in self.model.parameters() if p.requires_grad]}]
        else:
            import scale_rank as sr
            settings = {**method_settings(name, steps), **(overrides or {})}
            method = sr.adapt(base, method_config(name, **settings), steps, TARGETS, [])
            self.model = base
            self.controller = sr.RankController(base, method)
            params = method.optimizer_groups(self.controller.layers, lr, 0.0)
        self.optimizer = torch.optim.AdamW(params, lr=lr)

    def step(self, batch: dict[str, torch.Tensor], mark=None) -> float:
        """One optimizer step; `mark(phase)`, if given, is called as each of PHASES ends (bench/host_overhead.py's
        clock)."""
        mark = mark or (lambda phase: None)
        with torch.autocast(batch["input_ids"].device.type, dtype=torch.bfloat16):
            loss = self.model(**batch).loss
        mark("forward")
        loss.backward()
        mark("backward")
        if self.controller is not None:
            self.controller.observe()
        mark("observe")
        self.optimizer.step()
        mark("optimizer")
        if self.controller is not None:
            self.controller.apply()
        mark("apply")
        self.optimizer.zero_grad(set_to_none=True)
        mark("zero_grad")
        return float(loss)

    def adapter_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)


def on_device(batch: dict[str, torch.Tensor], device: str) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def describe_device(device: str) -> str:
    """The accelerator and the host it runs under: the host's kernel release tells a gVisor sandbox (which reports
    4.4.0 and makes every kernel launch a slower system call) from a VM, and a host-bound step's speed depends on it."""
    name = torch.cuda.get_device_name() if device == "cuda" else device
    return f"{name}, host kernel {platform.release()}, {os.cpu_count()} CPUs"


def synchronize(device: str) -> None:
    """Wait for the device's queued work (a no-op on CPU)."""
    if device == "cuda":
        torch.cuda.synchronize()


def release(device: str) -> None:
    """Free what a finished configuration left, so the next one starts from the same memory."""
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def run_one(name: str, path: Path, data: list[dict], args) -> dict:
    device = args.device
    base = load_base(path, device)
    trainer = Trainer(name, base, len(data), args.lr)
    trainer.model.train()
    synchronize(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for i, batch in enumerate(data):
        batch = on_device(batch, device)
        start = time.perf_counter()
        losses.append(trainer.step(batch))
        synchronize(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    tokens = int(data[0]["attention_mask"].sum())
    result = {"method": name, "median_step_s": statistics.median(times), "tokens_per_s": tokens /
              statistics.median(times), "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda"
              else float("nan"), "first_loss": losses[0], "last_loss": losses[-1],
              "trainable": trainer.adapter_parameters(),
              "final_rank": int(trainer.controller.method.ranks().sum()) if trainer.controller else None}
    del trainer, base
    release(device)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model instead of the 1.1B (smoke test)")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--methods", default="peft_lora," + ",".join(METHODS))
    parser.add_argument("--json")
    args = parser.parse_args()
    args.warmup = min(args.warmup, args.steps - 1)
    with tempfile.TemporaryDirectory() as tmp:
        path = save_base(Path(tmp) / "base", args.tiny)
        data = batches(path, args.seq_len, args.batch, args.steps)
        results = [run_one(name, path, data, args) for name in args.methods.split(",")]
    baseline = next((r for r in results if r["method"] == "peft_lora"), results[0])
    device = describe_device(args.device)
    print(f"\n{device}; {'tiny' if args.tiny else '1.1B'} Llama, nf4 base, batch {args.batch} x {args.seq_len} "
          f"tokens, {args.steps} steps ({args.warmup} untimed)")
    print("method     | tokens/s | vs PEFT LoRA | peak GiB | vs PEFT LoRA | trainable | final rank | loss first->last")
    for r in results:
        print(f"{r['method']:10s} | {r['tokens_per_s']:8.0f} | {r['tokens_per_s'] / baseline['tokens_per_s']:12.3f} | "
              f"{r['peak_gib']:8.2f} | {r['peak_gib'] / baseline['peak_gib']:12.3f} | {r['trainable']:9d} | "
              f"{str(r['final_rank']):>10s} | {r['first_loss']:.3f} -> {r['last_loss']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device, "args": vars(args), "results": results},
                                              indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
