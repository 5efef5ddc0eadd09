"""ScaleRankCallback: Trainer + callback decides exactly like a hand-written loop; forgetting it is loud.

The reference loop below is written from Trainer's documented step order, not from the callback:
forward/backward per micro-batch -> clip_grad_norm_ -> observe -> optimizer.step -> apply ->
lr_scheduler.step -> zero_grad, with the same model, seed, data order, batch and optimizer settings.
"""
from __future__ import annotations

import dataclasses
import logging
import warnings

import pytest
import torch
from transformers import (BertConfig, BertForSequenceClassification, Trainer, TrainingArguments,
                          get_linear_schedule_with_warmup)
from transformers.utils import logging as hf_logging

import scale_rank as sr
from scale_rank.hf_trainer import ScaleRankCallback, check_trainer

hf_logging.set_verbosity_error()

STEPS, BATCH, N_EXAMPLES, SEQ, LR = 30, 8, 64, 10, 1e-2
ADALORA = dict(r_init=6, r_target=2, t_init=4, t_final=6, delta_t=3, gamma=0.1)


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, num_labels=2, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, max_position_embeddings=32)
    return BertForSequenceClassification(config)


def adapted(total_steps: int = STEPS, method: str = "adalora", **options):
    model = tiny_bert()
    torch.manual_seed(1)
    strategy = sr.adapt(model, method, total_steps=total_steps, **(options or ADALORA))
    return model, sr.RankController(model, strategy)


def dataset() -> list[dict[str, torch.Tensor]]:
    """In memory, already in training order: label 1 when most token ids are below 50."""
    gen = torch.Generator().manual_seed(123)
    ids = torch.randint(1, 100, (N_EXAMPLES, SEQ), generator=gen)
    labels = ((ids < 50).sum(-1) > SEQ // 2).long()
    return [{"input_ids": i, "attention_mask": torch.ones(SEQ, dtype=torch.long), "labels": y}
            for i, y in zip(ids, labels)]


# Data order: the dataset is used as listed (Trainer's "sequential" sampler; a subclass where that option is
# missing, in transformers older than 5.x's train_sampling_strategy).
_HAS_SAMPLING_OPTION = "train_sampling_strategy" in {f.name for f in dataclasses.fields(TrainingArguments)}


class InOrderTrainer(Trainer):
    def _get_train_sampler(self, *args, **kwargs):
        if _HAS_SAMPLING_OPTION:
            return super()._get_train_sampler(*args, **kwargs)
        return torch.utils.data.SequentialSampler(self.train_dataset)


def training_args(tmp_path, grad_accum: int = 1, max_steps: int = STEPS) -> TrainingArguments:
    order = {"train_sampling_strategy": "sequential"} if _HAS_SAMPLING_OPTION else {}
    return TrainingArguments(
        output_dir=str(tmp_path), report_to=[], max_steps=max_steps, per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=grad_accum, learning_rate=LR, weight_decay=0.0, lr_scheduler_type="linear",
        warmup_steps=0, max_grad_norm=1.0, optim="adamw_torch", use_cpu=True, save_strategy="no",
        logging_strategy="no", eval_strategy="no", seed=0, disable_tqdm=True, dataloader_num_workers=0,
        **order)


def reference_loop(grad_accum: int, data_loss_divided_by_accum: bool):
    """The same run by hand: identical model, data order (sequential), batch, AdamW, linear lr, clipping."""
    model, controller = adapted()
    data = dataset()
    batches = [{k: torch.stack([ex[k] for ex in data[i:i + BATCH]]) for k in data[0]}
               for i in range(0, N_EXAMPLES, BATCH)]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    schedule = get_linear_schedule_with_warmup(optimizer, 0, STEPS)
    controller.set_grad_scale(1 / grad_accum)
    controller.guard(optimizer)
    model.train()
    micro = 0
    for _ in range(STEPS):
        for _ in range(grad_accum):
            loss = model(**batches[micro % len(batches)]).loss
            (loss / grad_accum if data_loss_divided_by_accum else loss).backward()
            micro += 1
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        controller.observe()
        optimizer.step()
        controller.apply()
        schedule.step()
        model.zero_grad()
    return model, controller


def trainer_run(tmp_path, grad_accum: int):
    model, controller = adapted()
    trainer = InOrderTrainer(model=model, args=training_args(tmp_path, grad_accum), train_dataset=dataset(),
                      callbacks=[ScaleRankCallback(controller)])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # check_trainer / the forward hook must stay quiet
        check_trainer(trainer)
        trainer.train()
    return trainer, model, controller


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_trainer_callback_matches_hand_written_loop(tmp_path, grad_accum):
    trainer, model, controller = trainer_run(tmp_path, grad_accum)
    # Trainer 5.x divides the data loss by the accumulation steps unless the model takes **kwargs (then it
    # passes num_items_in_batch and trusts the model to normalise; BERT's classification loss ignores it).
    divided = not (trainer.model_accepts_loss_kwargs and grad_accum > 1)
    ref_model, ref = reference_loop(grad_accum, divided)

    assert controller.step_count == ref.step_count == STEPS
    recorded = {entry["step"] for entry in ref.history}
    assert {6, 9, 12, 15, 18, 21, 24} <= recorded  # t_init < t <= T - t_final, every delta_t, and T - t_final
    assert controller.history == ref.history
    assert controller.ranks() == ref.ranks()
    final = list(ref.ranks().values())
    assert sum(final) == ADALORA["r_target"] * len(final) and len(set(final)) > 1  # a real reallocation
    assert torch.equal(controller.method.tracker.i_bar, ref.method.tracker.i_bar)
    assert torch.equal(controller.method.tracker.u_bar, ref.method.tracker.u_bar)
    for (name, p), (_, q) in zip(model.named_parameters(), ref_model.named_parameters()):
        assert torch.equal(p, q), name
    expected_coef = ADALORA["gamma"] / (2 * len(controller.layers)) / grad_accum  # mean over A and B matrices
    assert float(controller.method.regularizer.coef) == pytest.approx(expected_coef)


def test_optimizer_is_guarded(tmp_path):
    model, controller = adapted(total_steps=4, **dict(ADALORA, t_init=1, t_final=1, delta_t=1))
    trainer = InOrderTrainer(model=model, args=training_args(tmp_path, max_steps=4), train_dataset=dataset(),
                      callbacks=[ScaleRankCallback(controller)])
    trainer.train()
    with pytest.raises(RuntimeError, match="without RankController.observe"):
        trainer.optimizer.step()  # a step the callback did not see: refused, never silently plain LoRA


def test_schedule_length_mismatch_is_refused(tmp_path):
    model, controller = adapted(total_steps=STEPS + 10)
    trainer = InOrderTrainer(model=model, args=training_args(tmp_path), train_dataset=dataset(),
                      callbacks=[ScaleRankCallback(controller)])
    with pytest.raises(ValueError, match="total_steps=40 but Trainer will run 30"):
        trainer.train()


def test_trainer_without_callback_warns(tmp_path, caplog):
    model, controller = adapted(total_steps=64)
    trainer = InOrderTrainer(model=model, args=training_args(tmp_path, max_steps=64), train_dataset=dataset())
    with pytest.warns(RuntimeWarning, match="no ScaleRankCallback"):
        check_trainer(trainer)
    with caplog.at_level(logging.ERROR, logger="scale_rank"), \
            pytest.warns(RuntimeWarning, match="64 training forward passes without RankController"):
        trainer.train()  # the controller's forward hook fires inside Trainer's loop
    assert any("ScaleRankCallback" in r.getMessage() for r in caplog.records)  # also logged, if warnings are off
    assert controller.step_count == 0 and controller.history == []


def test_resume_from_trainer_checkpoint(tmp_path):
    """The controller is saved with each Trainer checkpoint and restored on resume: same decisions."""
    def run(resume: bool):
        model, controller = adapted()
        args = training_args(tmp_path)
        args.save_strategy, args.save_steps = "steps", 13
        trainer = InOrderTrainer(model=model, args=args, train_dataset=dataset(),
                          callbacks=[ScaleRankCallback(controller)])
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-13") if resume else None)
        return model, controller

    model, whole = run(resume=False)
    resumed_model, resumed = run(resume=True)
    assert (tmp_path / "checkpoint-13" / "scale_rank_controller.pt").is_file()
    assert resumed.history == whole.history and resumed.ranks() == whole.ranks()
    for (name, p), (_, q) in zip(model.named_parameters(), resumed_model.named_parameters()):
        assert torch.equal(p, q), name


def test_fp16_overflow_step_is_not_scored(tmp_path):
    """With a GradScaler (Trainer fp16), an inf/nan gradient step is observed as skipped and the regularizer's
    gradient carries the loss scale. Driven through the callback's hooks as Trainer calls them."""
    from types import SimpleNamespace
    model, controller = adapted()
    callback = ScaleRankCallback(controller)
    inner = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    accelerated = SimpleNamespace(optimizer=inner, scaler=scaler)  # accelerate's AcceleratedOptimizer shape
    args = SimpleNamespace(gradient_accumulation_steps=2, output_dir=str(tmp_path), deepspeed=None, fsdp=None)
    state = SimpleNamespace(max_steps=STEPS, global_step=0)
    callback.on_train_begin(args, state, None, model=model, optimizer=accelerated)
    assert float(controller.method.regularizer.coef) == pytest.approx(ADALORA["gamma"] / (2 * len(controller.layers)) * 1024 / 2)

    batch = {k: torch.stack([ex[k] for ex in dataset()[:BATCH]]) for k in ("input_ids", "labels")}
    model(**batch).loss.backward()
    controller.layers[0].lora_B.grad[0, 0] = float("inf")
    callback.on_pre_optimizer_step(args, state, None, optimizer=accelerated)
    callback.on_optimizer_step(args, state, None, optimizer=accelerated)
    assert controller.step_count == 0
    assert not controller.method.tracker.i_bar.any()  # nothing scored

    model.zero_grad()
    model(**batch).loss.backward()
    callback.on_pre_optimizer_step(args, state, None, optimizer=accelerated)
    inner.step()
    callback.on_optimizer_step(args, state, None, optimizer=accelerated)
    assert controller.step_count == 1 and controller.method.tracker.i_bar.isfinite().all()


def test_check_trainer_without_controller(tmp_path):
    """adapt() without any RankController: adaptive adapters warn up front, plain LoRA needs nothing."""
    for method, options, loud in (("adalora", ADALORA, True), ("lora", {"r": 4}, False)):
        model = tiny_bert()
        sr.adapt(model, method, total_steps=STEPS, **options)
        trainer = InOrderTrainer(model=model, args=training_args(tmp_path), train_dataset=dataset())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            check_trainer(trainer)
        assert any("has no RankController" in str(w.message) for w in caught) == loud, method
