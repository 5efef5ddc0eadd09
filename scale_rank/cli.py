"""The `scale-rank` command: train, export, report."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from .config import ConfigError, TrainingDiverged, load_config

ERROR_GRACE_S = 5.0


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return common


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="fine-tune with an adaptive-rank method (defaults: the embedded demo)",
                       parents=[_common()])
    p.add_argument("assignments", nargs="*", metavar="SECTION.KEY=VALUE",
                   help="config overrides, e.g. method.r_target=4 train.total_steps=300")
    p.add_argument("--config", help="YAML recipe (configs/...); omitted: the embedded demo defaults")
    p.add_argument("-o", "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value, e.g. -o method.r_target=4 (repeatable)")
    p.add_argument("--method", help="shortcut for -o method.name=...")
    p.add_argument("--output-dir", help="shortcut for -o train.output_dir=...")
    p.add_argument("--task", help="shortcut for -o data.task=...")
    p.add_argument("--data-dir", help="shortcut for -o data.data_dir=...")
    p.add_argument("--deepspeed", "--deepspeed_config", dest="deepspeed", help="DeepSpeed JSON config")
    p.add_argument("--report-to", help="comma-separated sinks beyond the run directory's files, e.g. wandb")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in output_dir from its newest checkpoint that verifies")
    p.add_argument("--overwrite", action="store_true", help="replace the run output_dir holds (its files only)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def _export_parser(sub) -> None:
    p = sub.add_parser("export", help="write a run's adapter as a plain PEFT LoRA adapter (or merged weights)",
                       parents=[_common()])
    p.add_argument("run_dir")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--merge", action="store_true", help="save full merged weights instead (save_pretrained)")
    p.add_argument("--overwrite", action="store_true", help="replace what --out holds")


def _report_parser(sub) -> None:
    p = sub.add_parser("report", help="print a run's final rank table and totals, re-draw its rank pictures",
                       parents=[_common()])
    p.add_argument("run_dir")
    p.add_argument("--no-pictures", action="store_true", help="only print (no PNGs into run_dir)")


def _plan_parser(sub) -> None:
    p = sub.add_parser("plan", help="per-GPU memory of fine-tuning a (large) model, from its config alone",
                       parents=[_common()])
    p.add_argument("--model", required=True, help="config.json path, model directory, shipped config name "
                   "(configs/llm/models: llama2_7b, llama3_8b, ...) or hub name")
    p.add_argument("--method", default="adalora", help="lora | adalora | sora | increlora | prilora")
    p.add_argument("--engine", default="zero3", help="ddp | zero2 | zero3 | fsdp1 | fsdp2 (default zero3)")
    p.add_argument("--gpus", type=int, default=1, help="data-parallel GPUs (default 1)")
    p.add_argument("--bits", type=int, default=16, help="base weights: 16, 8 (int8) or 4 (nf4)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per GPU per forward")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                   help="full activation checkpointing of every block (default on)")
    p.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU (default 80)")
    p.add_argument("--adapter-dtype", default="fp32", help="fp32 (default) or bf16")
    p.add_argument("--targets", help="comma-separated module-name suffixes to adapt (default: per model type)")
    p.add_argument("--total-steps", type=int, default=1000, help="run length the method options are checked "
                   "against (default 1000)")
    p.add_argument("-o", "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="method.KEY=VALUE, model.targets=[...] or model.double_quant=true (repeatable)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scale-rank", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _export_parser(sub)
    _report_parser(sub)
    _plan_parser(sub)
    return parser


def _train(args) -> int:
    overrides = list(args.assignments) + list(args.overrides)
    shortcuts = {"method.name": args.method, "train.output_dir": args.output_dir, "data.task": args.task,
                 "data.data_dir": args.data_dir, "train.deepspeed_config": args.deepspeed,
                 "train.report_to": f"[{args.report_to}]" if args.report_to else None}
    overrides += [f"{key}={value}" for key, value in shortcuts.items() if value is not None]
    cfg = load_config(args.config, _method_first(overrides))
    from .train import train
    result = train(cfg, resume=args.resume, progress=not args.no_progress, overwrite=args.overwrite)
    if result.adapter_dir is not None:
        print_summary(result)
    return 0


def _method_first(overrides: list[str]) -> list[str]:
    """method.name must be applied before other method options (they are checked against its fields)."""
    return sorted(overrides, key=lambda item: not item.startswith("method.name="))


def print_summary(result) -> None:
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items())
    print(f"\nfinal metric: {metrics}")
    print(f"ranks per module (total {sum(result.ranks.values())}):")
    for name, rank in result.ranks.items():
        print(f"  {rank:3d}  {name}")
    print(f"PEFT adapter: {result.adapter_dir}")
    print(f"run directory: {result.run_dir}")


def _export(args) -> int:
    from .export import export_run
    summary = export_run(args.run_dir, args.out, merge=args.merge, overwrite=args.overwrite)
    print(f"exported {args.run_dir} -> {args.out}")
    return 0 if summary is not None else 1


def _report(args) -> int:
    from .telemetry import report
    try:
        print(report(args.run_dir, pictures=not args.no_pictures))
    except FileNotFoundError as error:
        print(f"scale-rank: error: {error}", file=sys.stderr)
        return 2
    return 0


def _plan(args) -> int:
    import json

    from .planning import PlanInputs, format_plan, make_plan
    allowed = ("method.", "model.targets=", "model.double_quant=")
    stray = [item for item in args.overrides if not item.startswith(allowed)]
    if stray:
        raise ConfigError(f"plan reads only method.*, model.targets and model.double_quant overrides, got {stray}")
    if args.adapter_dtype not in ("fp32", "bf16"):
        raise ConfigError(f"--adapter-dtype must be fp32 or bf16, got {args.adapter_dtype!r}")
    cfg = load_config(None, _method_first([f"method.name={args.method}", *args.overrides]))
    inputs = PlanInputs(engine=args.engine, gpus=args.gpus, bits=args.bits, seq_len=args.seq_len,
                        micro_batch=args.micro_batch, gradient_checkpointing=args.gradient_checkpointing,
                        gpu_memory_gib=args.gpu_memory, adapter_bytes=4 if args.adapter_dtype == "fp32" else 2,
                        double_quant=cfg.model.double_quant)
    targets = args.targets.split(",") if args.targets else cfg.model.targets
    plan = make_plan(args.model, cfg.method, inputs, targets, args.total_steps)
    print(json.dumps(plan.to_dict(), indent=2) if args.json else format_plan(plan))
    if not plan.fits:
        print(f"scale-rank: error: {plan.advice()}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("SCALE_RANK_LOG", "WARNING"), format="%(levelname)s %(message)s")
    # bitsandbytes warns on every CPU import that an optional kernel package is missing: nothing to act on
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    stray = [item for item in extra if item.startswith("-") or "=" not in item]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra and args.command != "train":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.assignments += extra  # SECTION.KEY=VALUE items given after options
    try:
        return {"train": _train, "export": _export, "report": _report, "plan": _plan}[args.command](args)
    except (ConfigError, TimeoutError, TrainingDiverged) as error:
        if args.debug:
            raise
        main_process = os.environ.get("RANK", "0") == "0"
        if isinstance(error, TimeoutError) or main_process:  # config errors: one line, from the main process
            print(f"scale-rank: error: {error}", file=sys.stderr)
        if not main_process:
            time.sleep(ERROR_GRACE_S)  # a launcher stops every process when the first one fails: let main report
        return 2


if __name__ == "__main__":
    sys.exit(main())
