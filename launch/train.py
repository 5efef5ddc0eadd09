"""Entry point for every launcher, on CPU and GPU alike:

    python launch/train.py --config configs/demo.yaml
    torchrun --nproc_per_node 2 launch/train.py --config ...
    accelerate launch --config_file launch/accelerate/fsdp2.yaml launch/train.py --config ...
    deepspeed launch/train.py --deepspeed ds_configs/zero3.json --config ...

The engine is built by scale_rank itself from the config or the launcher's environment (DESIGN.md).
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scale_rank.cli import main  # noqa: E402


def run() -> None:
    import torch.distributed as dist

    code = main(["train", *sys.argv[1:]])
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip C++ teardown, which can abort multi-process CPU runs after all work is done


if __name__ == "__main__":
    run()
