"""Entry point for every launcher, on CPU and GPU alike:

    python launch/train.py --config configs/demo.yaml
    torchrun --nproc_per_node 2 launch/train.py --config ...
    accelerate launch --config_file launch/accelerate/fsdp2.yaml launch/train.py --config ...
    deepspeed launch/train.py --deepspeed ds_configs/zero3.json --config ...

The engine is built by scale_rank itself from the config or the launcher's environment (docs/design.md).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scale_rank.cli import main  # noqa: E402


from scale_rank.engine import exit_processes  # noqa: E402

if __name__ == "__main__":
    exit_processes(main(["train", *sys.argv[1:]]))
