"""The largest decoder this 2-core, 24 GiB CPU machine trains for real: a ~1.1B-parameter Llama (TinyLlama-1.1B
shape, random init from the config) on a 4-bit nf4 base, DeepSpeed ZeRO-3, 2 processes, AdaLoRA deciding.

    python bench/llm_1b_zero3.py                       # 6 optimizer steps; about 15-25 min on 2 idle cores
    python bench/llm_1b_zero3.py --steps 4 --seq-len 64 --method prilora --json out.json

It launches `torchrun --nproc_per_node 2 bench/llm_1b_worker.py`, which runs `scale_rank.train.train` (the same
loop `launch/train.py` runs) on generated chat data and writes, per rank: peak resident memory (ru_maxrss),
the seconds of every optimizer step, the losses and AdaLoRA's budget after each step. This script prints them
next to the planner's estimate for the same setting (`scale_rank.planning`), so the gap is visible.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# TinyLlama-1.1B's shape (hidden 2048, 22 layers, 32 heads / 4 KV heads, MLP 5632); the vocabulary is that of
# the offline MiniLM tokenizer the generated data is written with (30522 instead of 32000).
SHAPE = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
         "num_key_value_heads": 4, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
         "tie_word_embeddings": False}


def model_dir(path: Path) -> Path:
    """config.json of the ~1.1B Llama plus a fast tokenizer with a chat template."""
    from transformers import AutoTokenizer, LlamaConfig

    from scale_rank.model import resolve_model_path
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("minilm"))
    tokenizer.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}[SEP]\n"
                               "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    LlamaConfig(vocab_size=tokenizer.vocab_size, **SHAPE).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def parameter_count(path: Path) -> int:
    """Parameters of the model at `path`, counted on the meta device (no memory)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    return sum(p.numel() for p in model.parameters())


def overrides(args, model: Path, out: Path) -> list[str]:
    method = {"adalora": ["method.r_init=12", "method.r_target=8", "method.t_init=1", "method.t_final=1",
                          "method.delta_t=1"],
              "prilora": ["method.r_first=4", "method.r_last=12", "method.prune_interval=2"],
              "lora": ["method.r=8"]}[args.method]
    return [f"method.name={args.method}", *method, f"model.name_or_path={model}", "model.random_init=true",
            "model.quantization=nf4", "data.task=synthetic_chat", f"data.max_length={args.seq_len}",
            f"data.train_size={8 * args.batch}", "data.eval_size=4", f"train.output_dir={out}",
            f"train.total_steps={args.steps}", f"train.batch_size={args.batch}", "train.warmup_steps=0",
            "train.lr=1e-4", "train.deepspeed_config=ds_configs/zero3.json",
            f"train.gradient_checkpointing={str(args.checkpointing).lower()}"]


def planned_gib(args) -> dict[str, float]:
    """The planner's per-device numbers for this setting (`scale-rank plan`: a GPU memory model with a 16-bit
    unquantized rest; this fp32 CPU run stores that rest in float32)."""
    from scale_rank.config import load_config
    from scale_rank.planning import PlanInputs, make_plan
    cfg = load_config(None, [item for item in overrides(args, args.model_dir, Path("unused"))
                             if item.startswith("method.")])
    inputs = PlanInputs(engine="zero3", gpus=2, bits=4, seq_len=args.seq_len, micro_batch=args.batch // 2,
                        gradient_checkpointing=args.checkpointing, adapter_bytes=4)
    memory = make_plan(str(args.model_dir / "config.json"), cfg.method, inputs, None, args.steps).memory
    return {"base_weights_gib": memory.base_weights / 2**30,
            "states_gib": (memory.adapter_params + memory.gradients + memory.optimizer_states
                           + memory.method_state) / 2**30,
            "total_without_reserve_gib": (memory.total - memory.reserve) / 2**30}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4, help="global batch (2 processes)")
    parser.add_argument("--method", default="adalora", choices=["adalora", "prilora", "lora"])
    parser.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--json", help="write the per-rank records here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        args.model_dir = model_dir(tmp / "model")
        env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu",
                   PYTHONPATH=str(REPO), WANDB_MODE="offline")
        env.setdefault("TORCH_EXTENSIONS_DIR", "/tmp/torch_ext")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               str(REPO / "bench" / "llm_1b_worker.py"), str(tmp), *overrides(args, args.model_dir, tmp / "run")]
        code = subprocess.run(cmd, cwd=REPO, env=env).returncode
        if code != 0:
            print(f"workers failed with exit code {code}", file=sys.stderr)
            return code
        records = [json.loads((tmp / f"rank{r}.json").read_text()) for r in (0, 1)]
        plan = planned_gib(args)
        records[0]["parameters"] = parameter_count(args.model_dir)
    report(args, records, plan)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                               "ranks": records, "plan": plan}, indent=2))
    return 0


def report(args, records: list[dict], plan: dict) -> None:
    first = records[0]
    print(f"\n~1.1B Llama ({first['parameters'] / 1e9:.2f}B parameters, {first['adapter_parameters'] / 1e6:.1f}M "
          f"adapter), nf4 base, ZeRO-3, 2 CPU processes, {args.method}, seq {args.seq_len}, global batch "
          f"{args.batch}, checkpointing {'on' if args.checkpointing else 'off'}")
    print("rank | peak RSS GiB | RSS while training GiB | build s | median step s | losses | budget after each step")
    for rank, record in enumerate(records):
        print(f"{rank:4d} | {record['peak_rss_gib']:12.2f} | {max(record['rss_gib']):22.2f} | {record['build_s']:7.1f} | "
              f"{statistics.median(record['step_s']):13.1f} | "
              f"{' '.join(f'{x:.3f}' for x in record['losses'])} | {record['budgets']}")
    print(f"planner (scale-rank plan, zero3 x 2, nf4, 16-bit rest): base {plan['base_weights_gib']:.2f} GiB, "
          f"adapter states {plan['states_gib']:.2f} GiB, all but the CUDA reserve "
          f"{plan['total_without_reserve_gib']:.2f} GiB per device; RSS also holds the Python runtime and "
          "libraries (~1.5 GiB), the float32 rest of this CPU run and the model built before quantization")


if __name__ == "__main__":
    sys.exit(main())
