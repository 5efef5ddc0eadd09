"""A tiny decoder fine-tuned by transformers.Trainer and by TRL's SFTTrainer through ScaleRankCallback, with
every method: the decisions equal those of a hand-written loop that follows Trainer's documented step order
(forward/backward -> clip_grad_norm_ -> observe -> optimizer.step -> apply -> lr_scheduler.step -> zero_grad)
on the very batches the trainer's own data loader yields."""
from __future__ import annotations

import warnings

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments
from transformers import get_linear_schedule_with_warmup
from transformers.utils import logging as hf_logging

import scale_rank as sr
from scale_rank.hf_trainer import ScaleRankCallback
from tests.support.tiny import FAST_METHODS, tiny_decoder_dir

hf_logging.set_verbosity_error()

STEPS, BATCH, N_EXAMPLES, SEQ, LR = 12, 4, 48, 16, 5e-3
MAX_NORM = 0.05  # below every step's gradient norm: clipping acts, and scores must see it


@pytest.fixture(scope="module")
def decoder_dir(tmp_path_factory):
    return tiny_decoder_dir(tmp_path_factory.mktemp("llama"), hidden=32)


def adapted(decoder_dir, method: str):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(decoder_dir))
    torch.manual_seed(1)
    strategy = sr.adapt(model, method, total_steps=STEPS, **FAST_METHODS[method])
    return model, sr.RankController(model, strategy)


def token_rows() -> list[list[int]]:
    """Token sequences with a pattern to learn: each row counts up from a random start."""
    gen = torch.Generator().manual_seed(7)
    starts = torch.randint(1000, 2000, (N_EXAMPLES,), generator=gen)
    return [list(range(int(s), int(s) + SEQ)) for s in starts]


def common_args(tmp_path) -> dict:
    return dict(output_dir=str(tmp_path), report_to=[], max_steps=STEPS, per_device_train_batch_size=BATCH,
                learning_rate=LR, weight_decay=0.0, lr_scheduler_type="linear", warmup_steps=0,
                max_grad_norm=MAX_NORM, optim="adamw_torch", use_cpu=True, save_strategy="no",
                logging_strategy="no", eval_strategy="no", seed=0, disable_tqdm=True, dataloader_num_workers=0,
                train_sampling_strategy="sequential")


def plain_trainer(model, tmp_path, callbacks):
    rows = [{"input_ids": torch.tensor(r), "attention_mask": torch.ones(SEQ, dtype=torch.long),
             "labels": torch.tensor(r)} for r in token_rows()]
    return Trainer(model=model, args=TrainingArguments(**common_args(tmp_path)), train_dataset=rows,
                   callbacks=callbacks)


def sft_trainer(model, tmp_path, callbacks, tokenizer):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer
    # SFTConfig turns bf16 autocast on by default; float32 here, like the plain Trainer and the hand loop
    args = SFTConfig(**common_args(tmp_path), max_length=SEQ, packing=False, bf16=False)
    return SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": token_rows()}),
                      processing_class=tokenizer, callbacks=callbacks)


def hand_loop(model, controller, trainer):
    """Trainer's step order on the batches `trainer`'s data loader yields (a trainer without the callback),
    each loss from its compute_loss normalised by the batch's label tokens, as Trainer does."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    schedule = get_linear_schedule_with_warmup(optimizer, 0, STEPS)
    controller.guard(optimizer)
    batches = list(trainer.get_train_dataloader())
    assert {"input_ids", "labels"} <= set(batches[0]) and len(batches) >= STEPS
    model.train()
    for batch in batches[:STEPS]:
        tokens = (batch["labels"][..., 1:] != -100).sum()
        trainer.compute_loss(model, batch, num_items_in_batch=tokens).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        controller.observe()
        optimizer.step()
        controller.apply()
        schedule.step()
        model.zero_grad()


@pytest.mark.parametrize("kind", ["trainer", "sft"])
@pytest.mark.parametrize("method", sorted(FAST_METHODS))
def test_trainer_on_a_decoder_decides_like_the_hand_written_loop(kind, method, decoder_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(decoder_dir)
    build = (lambda m, cb: plain_trainer(m, tmp_path, cb)) if kind == "trainer" else \
        (lambda m, cb: sft_trainer(m, tmp_path, cb, tokenizer))
    model, controller = adapted(decoder_dir, method)
    trainer = build(model, [ScaleRankCallback(controller)])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the forgotten-call guard must stay quiet
        trainer.train()

    ref_model, ref = adapted(decoder_dir, method)
    hand_loop(ref_model, ref, build(ref_model, []))

    assert controller.step_count == ref.step_count == STEPS
    assert controller.history == ref.history
    assert controller.ranks() == ref.ranks()
    if method != "lora":
        assert len(ref.history) > 1, f"{method} made no decision in {STEPS} steps"
