"""Where a method's GPU step time goes: host work, device work, kernel launches and syncs per optimizer step.

    python bench/gpu_step_profile.py --json gpu_step_profile.json      # the 1.1B nf4 Llama, about 4 minutes
    python bench/gpu_step_profile.py --device cpu --tiny --seq-len 64 --batch 1 --warmup 1 --steps 2

Same setup as bench/gpu_llm.py (the ~1.1B Llama with an nf4 base, batch 8 x 512 tokens, every method at the
same capacity, schedules of a 100-step run so that AdaLoRA decides every 3rd step from step 6 on), plus
ablations that take one cost out at a time:

- lora_r12: plain LoRA at AdaLoRA's starting capacity (r=12), the cost of the extra components alone;
- adalora_gamma0: AdaLoRA without the orthogonality regularizer;
- adalora_no_decisions: AdaLoRA whose schedule makes no decision within the profiled steps.

Per configuration: --warmup untimed steps, then --steps steps each timed alone (synchronised before and after)
for the median wall time and the main thread's CPU time (what the host spends issuing the step), then
--profile-steps steps under torch.profiler for, per step: the device time of all kernels ("device busy"), the
kernels and launch calls, the aten operations (nested ones included), and the host-device synchronisations
(stream and device syncs, memcpy calls). A step whose wall time is well above its device busy time is bound by
the host: each kernel a method adds per adapted module then costs its launch, not its arithmetic.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.gpu_llm import (METHODS, Trainer, batches, describe_device, load_base, on_device,  # noqa: E402
                           release, save_base, synchronize)

SCHEDULE_STEPS = 100  # the methods' schedules are those of a 100-step run (bench/gpu_llm.py's method_settings)
ABLATIONS = {"lora_r12": ("lora", {"r": 12}),
             "adalora_gamma0": ("adalora", {"gamma": 0.0}),
             "adalora_no_decisions": ("adalora", {"t_init": SCHEDULE_STEPS - 10, "t_final": 5})}
LAUNCH_CALLS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")


def configuration(label: str) -> tuple[str, dict]:
    """(method name, settings overrides) of a method or an ablation label."""
    if label in ABLATIONS:
        return ABLATIONS[label]
    if label != "peft_lora" and label not in METHODS:
        raise SystemExit(f"unknown configuration {label!r}: use peft_lora, {', '.join(METHODS)} or "
                         f"{', '.join(ABLATIONS)}")
    return label, {}


def timed_steps(trainer: Trainer, data: list[dict], device: str) -> tuple[list[float], list[float]]:
    """Wall and main-thread CPU seconds of each step, each step synchronised before and after."""
    wall, cpu = [], []
    for batch in data:
        batch = on_device(batch, device)
        synchronize(device)
        wall_start, cpu_start = time.perf_counter(), time.thread_time()
        trainer.step(batch)
        synchronize(device)
        wall.append(time.perf_counter() - wall_start)
        cpu.append(time.thread_time() - cpu_start)
    return wall, cpu


def is_kernel(event) -> bool:
    return str(getattr(event, "device_type", "")).endswith("CUDA")


def profiled(trainer: Trainer, data: list[dict], device: str) -> dict:
    """Per-step counts and device time over `data`, from torch.profiler."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profile:
        for batch in data:
            trainer.step(on_device(batch, device))
            synchronize(device)
    events = profile.key_averages()
    steps = len(data)

    def calls(*names: str) -> float:
        return sum(e.count for e in events if e.key in names) / steps

    kernels = [e for e in events if is_kernel(e)]
    host = sorted((e for e in events if not is_kernel(e)), key=lambda e: -e.self_cpu_time_total)
    return {"device_busy_ms": sum(e.self_device_time_total for e in kernels) / 1e3 / steps,
            "kernels": sum(e.count for e in kernels) / steps,
            "launch_calls": calls(*LAUNCH_CALLS),
            "aten_ops": sum(e.count for e in events if e.key.startswith("aten::")) / steps,
            "stream_syncs": calls("cudaStreamSynchronize"), "device_syncs": calls("cudaDeviceSynchronize"),
            "memcpy_calls": calls("cudaMemcpyAsync"),
            "top_host": [(e.key, e.count / steps, e.self_cpu_time_total / 1e3 / steps) for e in host[:8]]}


def run_one(label: str, path: Path, data: list[dict], args) -> dict:
    method, overrides = configuration(label)
    base = load_base(path, args.device)
    trainer = Trainer(method, base, SCHEDULE_STEPS, args.lr, overrides)
    trainer.model.train()
    warm, timed, rest = data[:args.warmup], data[args.warmup:args.warmup + args.steps], data[args.warmup + args.steps:]
    timed_steps(trainer, warm, args.device)
    wall, cpu = timed_steps(trainer, timed, args.device)
    result = {"configuration": label, "wall_ms": statistics.median(wall) * 1e3,
              "host_cpu_ms": statistics.median(cpu) * 1e3, **profiled(trainer, rest, args.device)}
    del trainer, base
    release(args.device)
    return result


def render(results: list[dict]) -> str:
    base = next((r for r in results if r["configuration"] == "lora"), results[0])
    lines = ["| configuration | wall ms/step (median) | vs LoRA | main-thread CPU ms | device busy ms | kernels | "
             "kernels vs LoRA | launch calls | aten ops | stream / device syncs | memcpy calls |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['configuration']} | {r['wall_ms']:.1f} | {r['wall_ms'] / base['wall_ms']:.3f} | "
                     f"{r['host_cpu_ms']:.1f} | {r['device_busy_ms']:.1f} | {r['kernels']:.0f} | "
                     f"{r['kernels'] - base['kernels']:+.0f} | {r['launch_calls']:.0f} | {r['aten_ops']:.0f} | "
                     f"{r['stream_syncs']:.1f} / {r['device_syncs']:.1f} | {r['memcpy_calls']:.1f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model instead of the 1.1B (smoke test)")
    parser.add_argument("--configurations", default=",".join(["peft_lora", *METHODS, *ABLATIONS]))
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--steps", type=int, default=12, help="timed steps per configuration")
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--json")
    args = parser.parse_args()
    labels = args.configurations.split(",")
    for label in labels:
        configuration(label)  # unknown names fail before the model is built
    with tempfile.TemporaryDirectory() as tmp:
        path = save_base(Path(tmp) / "base", args.tiny)
        data = batches(path, args.seq_len, args.batch, args.warmup + args.steps + args.profile_steps)
        results = []
        for label in labels:
            results.append(run_one(label, path, data, args))
            print(f"{label}: {results[-1]['wall_ms']:.1f} ms/step", flush=True)
    device = describe_device(args.device)
    print(f"\n{device}; {'tiny' if args.tiny else '1.1B'} Llama, nf4 base, batch {args.batch} x {args.seq_len} tokens; "
          f"{args.steps} timed steps, {args.profile_steps} profiled, after {args.warmup}\n")
    print(render(results))
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device, "args": vars(args), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
