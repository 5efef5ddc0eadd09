"""Rank allocation inside a Hugging Face `transformers.Trainer`, without writing a training loop.

    method = scale_rank.adapt(model, "adalora", total_steps=max_steps, r_init=12, r_target=8)
    controller = scale_rank.RankController(model, method)
    trainer = Trainer(model=model, args=args, train_dataset=..., callbacks=[ScaleRankCallback(controller)])
    trainer.train()

Where the controller's calls go (transformers 5.x `Trainer._run_epoch`, once per optimizer step):

    for each micro-batch: forward, backward (gradients accumulate; Trainer syncs them on the last one)
    clip_grad_norm_ (also unscales fp16 gradients)    -> grads now are what the optimizer will use
    on_pre_optimizer_step                             -> controller.observe()
    optimizer.step()                                  -> guarded: raises if observe() did not run
    on_optimizer_step                                 -> controller.apply()
    lr_scheduler.step(); model.zero_grad(); on_step_end

So statistics see the clipped, unscaled, accumulated gradients of each optimizer step exactly once, and
decisions act after the optimizer step and before zero_grad (docs/design.md, contract 6).

Gradient accumulation: the regularizer's gradient rides on every micro-batch's layer outputs, so at train
begin the controller gets `set_grad_scale(1 / gradient_accumulation_steps)` (times the fp16 loss scale,
refreshed every step, when Trainer uses a GradScaler). Steps a GradScaler skips (inf/nan gradients) are
observed as skipped, so they never reach the sensitivity EMAs.

Engines: Trainer with DeepSpeed runs the engine's optimizer step inside `accelerator.backward`, before any
callback sees the gradients, and Trainer with FSDP re-wraps the parameters after the controller has bound
them; both are refused at train begin (use scale_rank's own loop, `scale-rank train` / launch/train.py,
which sets the engine up first). One process and DDP work.

The reverse trap (a Trainer built with an adapted model but without this callback) is caught by the
controller itself: its forward pre-hook warns after 64 training forward passes without observe()/apply(),
and `check_trainer(trainer)` says the same up front.
"""
from __future__ import annotations

import logging
import math
import os
import warnings

import torch
from transformers import TrainerCallback

from .controller import RankController
from .inject import adapter_layers
from .methods import METHODS

log = logging.getLogger(__name__)

STATE_FILE = "scale_rank_controller.pt"


class ScaleRankCallback(TrainerCallback):
    """Calls `controller.observe()` before and `controller.apply()` after every optimizer step of Trainer."""

    def __init__(self, controller: RankController):
        if not isinstance(controller, RankController):
            raise TypeError(f"ScaleRankCallback needs a scale_rank.RankController, got {type(controller).__name__}")
        self.controller = controller
        self._scaler = None
        self._accum = 1
        self._guarded: list[torch.optim.Optimizer] = []
        self._trainer_step = 0  # Trainer's global_step the controller is in step with
        self._restore: dict | None = None  # a checkpoint's controller state, applied at train begin

    # -- setup -------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        controller = self.controller
        _refuse_unsupported_engines(args)
        if model is not None:
            _check_same_model(controller, model)
        total = controller.method.total_steps
        if total is not None and total != state.max_steps:
            raise ValueError(
                f"the {controller.method.name} schedule was built for total_steps={total} but Trainer will run "
                f"{state.max_steps} optimizer steps: pass total_steps={state.max_steps} to scale_rank.adapt "
                "(or set TrainingArguments.max_steps to match)")
        if controller._pending is not None:
            raise RuntimeError("RankController has an observe() without apply() pending: it was stepped by "
                               "hand outside the Trainer; use a fresh controller")
        self._rebind_if_fresh(optimizer)
        self._sync_with_trainer(args, state)
        self._accum = max(1, int(args.gradient_accumulation_steps))
        self.controller.set_accumulation(self._accum)
        self._scaler = getattr(optimizer, "scaler", None)  # accelerate's AcceleratedOptimizer (fp16)
        self._sync_grad_scale()
        if optimizer is None:
            raise RuntimeError("Trainer gave no optimizer to callbacks at train begin; cannot guard it")
        self._guard(optimizer)

    def _rebind_if_fresh(self, optimizer) -> None:
        """Bind the method again now that Trainer has placed the model (Trainer moves it to the GPU in its
        constructor, after the controller was built on the CPU), as the engine-set-up step of the life cycle
        asks (Method.bind: "once the engine has placed the parameters"). Only a controller that has not
        stepped yet is rebound: that is idempotent apart from the device of the method's statistics."""
        controller = self.controller
        if controller.step_count or controller.history:
            return
        controller.rebind()
        inner = _innermost_optimizer(optimizer) if optimizer is not None else None
        if inner is not None:
            controller.method.track_optimizer(inner)  # e.g. SoRA's xi_mode "lr" follows the gate group's lr

    def _guard(self, optimizer) -> None:
        inner = _innermost_optimizer(optimizer)
        if any(inner is seen for seen in self._guarded):
            return  # a second train() call reuses Trainer's optimizer
        self.controller.guard(inner)
        self._guarded.append(inner)

    def _sync_grad_scale(self) -> None:
        loss_scale = float(self._scaler.get_scale()) if self._scaler is not None else 1.0
        self.controller.set_grad_scale(loss_scale / self._accum)

    # -- per optimizer step ------------------------------------------------------------------------
    def on_step_begin(self, args, state, control, **kwargs):
        if self._scaler is not None:  # the fp16 loss scale changes at every scaler.update()
            self._sync_grad_scale()

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        skipped = self._scaler is not None and _has_nonfinite_grad(optimizer)
        self.controller.observe(skipped=skipped)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.controller.apply()

    def on_step_end(self, args, state, control, **kwargs):
        self._trainer_step = state.global_step

    # -- checkpoints -------------------------------------------------------------------------------
    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        os.makedirs(folder, exist_ok=True)
        torch.save({"controller": self.controller.state_dict(), "global_step": state.global_step},
                   os.path.join(folder, self._state_name()))

    def load(self, checkpoint_dir: str) -> None:
        """Restore the controller saved with a Trainer checkpoint, at the next train begin (automatic on
        resume when the checkpoint lies in `output_dir`; call this before train() for one elsewhere)."""
        self._restore = torch.load(os.path.join(checkpoint_dir, self._state_name()), map_location="cpu",
                                   weights_only=False)

    def _state_name(self) -> str:
        comm = self.controller.comm
        return STATE_FILE if comm.world_size == 1 else STATE_FILE.replace(".pt", f"_rank{comm.rank}.pt")

    def _sync_with_trainer(self, args, state) -> None:
        """The controller must be where Trainer is: fresh for a new run, restored for a resumed one.

        Trainer's global_step counts the steps an fp16 scaler skipped, the controller's step does not, so
        the callback keeps Trainer's step beside the controller state.
        """
        def in_sync() -> bool:
            fresh = self.controller.step_count == 0 and not self.controller.history
            return state.global_step == self._trainer_step and (state.global_step > 0 or fresh)

        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if self._restore is None and not in_sync() and state.global_step > 0 and os.path.isfile(
                os.path.join(folder, self._state_name())):
            self.load(folder)
        if self._restore is not None:  # after the rebind, so the statistics land on the model's device
            self.controller.load_state_dict(self._restore["controller"])
            self._trainer_step = self._restore["global_step"]
            self._restore = None
            log.info("restored the %s controller at Trainer step %d", self.controller.method.name,
                     self._trainer_step)
        if not in_sync():
            raise RuntimeError(
                f"Trainer starts at optimizer step {state.global_step} but the RankController has already run "
                f"{self.controller.step_count} steps of another run: resuming needs the controller state saved "
                "with the checkpoint (callback.load(checkpoint_dir) before train(); automatic when the checkpoint "
                "is in output_dir), and a new run needs a fresh model, adapters and controller")



def check_trainer(trainer) -> None:
    """Warn loudly if `trainer` trains scale_rank adapters that no ScaleRankCallback allocates.

    Build the Trainer, then call this. The same warning comes from the controller's forward hook after 64
    training forward passes without observe()/apply(); this one comes before the first step.
    """
    model = trainer.model
    layers = adapter_layers(model)
    if not layers:
        return
    called = {id(cb.controller) for cb in trainer.callback_handler.callbacks if isinstance(cb, ScaleRankCallback)}
    controllers = [c for c in _controllers_of(model) if c.method.allocates_ranks]
    if any(id(c) not in called for c in controllers):
        problem = "has no ScaleRankCallback for their RankController"
    elif not controllers and not called and any(_needs_controller(layer) for layer in layers):
        problem = "has no RankController (nor ScaleRankCallback) for them"
    else:
        return
    message = (f"this Trainer trains scale_rank adapters but {problem}: ranks are never allocated (adaptive "
               "methods train as plain LoRA). Pass callbacks=[scale_rank.hf_trainer.ScaleRankCallback(controller)] "
               "to Trainer")
    log.error(message)
    warnings.warn(message, RuntimeWarning, stacklevel=2)


def _controllers_of(model) -> list[RankController]:
    """The RankControllers attached to `model` (each registers a forward pre-hook on the model it was given)."""
    found = []
    for module in model.modules():
        for hook in module._forward_pre_hooks.values():
            owner = getattr(hook, "__self__", None)
            if isinstance(owner, RankController) and all(owner is not c for c in found):
                found.append(owner)
    return found


def _needs_controller(layer) -> bool:
    """An adapter whose method allocates ranks (every method but plain LoRA), which needs a controller."""
    return layer.method in METHODS and METHODS[layer.method].allocates_ranks


# -- helpers ---------------------------------------------------------------------------------------
def _innermost_optimizer(optimizer):
    """The torch optimizer inside accelerate's AcceleratedOptimizer (whose own step is not hooked)."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def _has_nonfinite_grad(optimizer) -> bool:
    """Whether the GradScaler will skip this step: any inf/nan among the optimizer's gradients."""
    grads = [p.grad for group in _innermost_optimizer(optimizer).param_groups for p in group["params"]
             if p.grad is not None]
    if not grads:
        return False
    norms = torch._foreach_norm(grads, math.inf)
    return not bool(torch.stack([n.float().to(norms[0].device) for n in norms]).isfinite().all())


def _check_same_model(controller: RankController, model) -> None:
    layer = controller.layers[0]
    if not any(module is layer for module in model.modules()):
        raise ValueError("the RankController was built for another model than the one Trainer trains; build "
                         "the controller on the model you pass to Trainer")


def _refuse_unsupported_engines(args) -> None:
    deepspeed, fsdp = bool(getattr(args, "deepspeed", None)), bool(getattr(args, "fsdp", None))
    from accelerate.state import AcceleratorState, is_initialized
    if is_initialized():  # what accelerate launch / the Trainer actually set up
        state = AcceleratorState()
        deepspeed = deepspeed or getattr(state, "deepspeed_plugin", None) is not None
        fsdp = fsdp or getattr(state, "fsdp_plugin", None) is not None
    if deepspeed:
        raise RuntimeError(
            "ScaleRankCallback cannot run under Trainer + DeepSpeed: accelerate runs the engine's optimizer step "
            "inside backward, before any callback can score the gradients. Train with scale_rank's own loop "
            "(scale-rank train, or launch/train.py under `deepspeed` / `accelerate launch`)")
    if fsdp:
        raise RuntimeError(
            "ScaleRankCallback cannot run under Trainer + FSDP: Trainer wraps the model after the controller has "
            "bound its parameters, so the controller would score stale tensors. Train with scale_rank's own "
            "loop (scale-rank train, or launch/train.py), which sets up FSDP before the controller")
