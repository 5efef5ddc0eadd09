"""Host time per training step, by phase, on a deep and narrow Llama: a CPU stand-in for a host-bound GPU step.

    python bench/host_overhead.py                       # 12 layers (84 adapted modules), every method, ~2 min
    python bench/host_overhead.py --methods lora,adalora --rounds 5

On one H200 the 1.1B Llama's step with an nf4 base is bound by the host issuing kernels, not by the device
(bench/gpu_step_profile.py): what an adaptive method costs there is the host time of the operations it adds per
adapted module. This bench makes the CPU step host-bound the same way: a random Llama with hidden size 64 and
16 tokens per step, so that every operation's arithmetic is negligible next to its dispatch, autograd and Python
overhead. Same methods and settings as bench/gpu_llm.py (adapters on the seven projections of every layer,
schedules of a 100-step run), the forward under bf16 autocast, AdamW with foreach=True (torch's choice on a
GPU; the CPU default loops over the parameters). Each phase of a step (forward, backward, observe, optimizer
step, apply, zero_grad) is timed with the main thread's CPU clock; the methods take turns for `--rounds`
rounds of `--steps` timed steps (after `--warmup` untimed ones per round), and the table gives medians.

Not the GPU's numbers: observe and apply run torch._foreach_* loops on the CPU, one kernel each on a GPU, so
their columns overstate them; forward and backward are the columns that carry over.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.gpu_llm import METHODS, PHASES, Trainer  # noqa: E402

PROJECTIONS = 7  # adapted modules per layer


def narrow_llama(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config)


def make_trainer(name: str, layers: int) -> Trainer:
    trainer = Trainer(name, narrow_llama(layers), 100, 1e-4)
    for group in trainer.optimizer.param_groups:
        group["foreach"] = True
    trainer.model.train()
    return trainer


def timed_step(trainer: Trainer, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """Main-thread CPU seconds of each phase of one optimizer step."""
    times, last = {}, [time.thread_time()]

    def mark(phase: str) -> None:
        now = time.thread_time()
        times[phase], last[0] = now - last[0], now
    trainer.step(batch, mark)
    return times


def measure(names: list[str], layers: int, rounds: int, steps: int, warmup: int) -> dict[str, dict[str, float]]:
    """Median ms per phase per method, the methods taking turns round by round."""
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(rounds * (warmup + steps)):
        ids = torch.randint(0, 256, (1, 16), generator=generator)
        batches.append({"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)})
    trainers = {name: make_trainer(name, layers) for name in names}
    samples: dict[str, dict[str, list[float]]] = {name: {phase: [] for phase in PHASES} for name in names}
    per_round = warmup + steps
    for round_index in range(rounds):
        for name, trainer in trainers.items():
            for i, batch in enumerate(batches[round_index * per_round:(round_index + 1) * per_round]):
                phases = timed_step(trainer, batch)
                if i >= warmup:
                    for phase, seconds in phases.items():
                        samples[name][phase].append(seconds)
    return {name: {phase: statistics.median(values) * 1e3 for phase, values in by_phase.items()}
            for name, by_phase in samples.items()}


def table(results: dict[str, dict[str, float]], modules: int) -> str:
    baseline = results.get("peft_lora") or next(iter(results.values()))
    lora = results.get("lora")
    lines = ["| method | " + " | ".join(f"{p} ms" for p in PHASES) + " | forward + backward ms | vs PEFT LoRA | "
             "forward + backward over LoRA, us per module |", "|---|" + "---:|" * (len(PHASES) + 3)]
    base = baseline["forward"] + baseline["backward"]
    for name, phases in results.items():
        both = phases["forward"] + phases["backward"]
        over = "-" if lora is None or name == "lora" else \
            f"{(both - lora['forward'] - lora['backward']) * 1e3 / modules:+.0f}"
        lines.append(f"| {name} | " + " | ".join(f"{phases[p]:.2f}" for p in PHASES) +
                     f" | {both:.2f} | {both / base:.3f} | {over} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="peft_lora," + ",".join(METHODS))
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=15, help="timed steps per method and round")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per method and round")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = measure(args.methods.split(","), args.layers, args.rounds, args.steps, args.warmup)
    print(f"narrow Llama, {args.layers} layers ({PROJECTIONS * args.layers} adapted modules), 16 tokens, bf16 "
          f"autocast; medians of {args.rounds} rounds x {args.steps} steps, main-thread CPU time\n")
    print(table(results, PROJECTIONS * args.layers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
