"""Worker: a 2-process run that is either uninterrupted, crashed after a step, or resumed.
Usage (under torchrun): resume_worker.py OUT_DIR ENGINE MODEL_DIR RUN_NAME [--resume]
Saves the trained model's logits on fixed sentences (rank 0) to OUT_DIR/RUN_NAME_logits.pt.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from scale_rank.config import load_config
from scale_rank.engine import exit_processes
from scale_rank.train import train
from tests.distributed.equivalence_worker import engine_overrides
from tests.support.tiny import overrides

SENTENCES = ["the film was not good.", "i thought the plot was superb.", "honestly, the cast is dull."]
STEPS, SAVE_EVERY = 12, 4


def main() -> int:
    out_dir, engine, model_dir, name, *flags = sys.argv[1:]
    items = overrides(Path(model_dir), Path(out_dir) / name, "adalora", steps=STEPS, save_every=SAVE_EVERY)
    result = train(load_config(None, items + engine_overrides(engine)), resume="--resume" in flags,
                   progress=False)
    from transformers import AutoTokenizer
    batch = dict(AutoTokenizer.from_pretrained(model_dir)(SENTENCES, return_tensors="pt", padding=True))
    result.engine.train(False)
    with torch.no_grad():
        logits = result.engine.forward(batch).logits.float().cpu()
    if not dist.is_initialized() or dist.get_rank() == 0:
        torch.save({"logits": logits, "batch": batch}, Path(out_dir) / f"{name}_logits.pt")
    return 0


if __name__ == "__main__":
    exit_processes(main())
