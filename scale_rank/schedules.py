"""Budget and threshold schedules (pure functions of the optimizer step)."""
from __future__ import annotations

import math

import torch


def cubic_budget(step: int, total_steps: int, b0: int, b_target: int, t_init: int, t_final: int) -> int:
    """AdaLoRA's total kept components b(t) (the official code's form).

    b0 until t_init; then bT + (b0 - bT)(1 - (t - t_init)/(T - t_final - t_init))^3 until T - t_final;
    bT afterwards.
    """
    if step <= t_init:
        return b0
    end = total_steps - t_final
    if step > end:
        return b_target
    progress = 1 - (step - t_init) / (end - t_init)
    return int(b_target + (b0 - b_target) * progress ** 3)


def staged_linear(step: int, total_steps: int, start: float, end: float | None, stages: int) -> float:
    """A value raised from `start` to `end` over training (SoRA's sparsifying xi).

    stages <= 1: a continuous linear ramp; stages = n > 1: n equal plateaus, the first at `start` and the
    last at `end`. `end` None: constant `start`.
    """
    if end is None:
        return start
    fraction = min(step / max(total_steps, 1), 1.0)
    if stages > 1:
        fraction = min(math.floor(fraction * stages), stages - 1) / (stages - 1)
    return start + (end - start) * fraction


def restarted_warmup(step: int, since: torch.Tensor, length: int) -> torch.Tensor:
    """Per-item linear warmup factor, each restarted at its own step `since` (0: never restarted -> 1)."""
    if length <= 0:
        return torch.ones(since.shape)
    ramp = torch.clamp((step - since).float() / length, max=1.0)
    return torch.where(since > 0, ramp, torch.ones(()))  # no boolean indexing: nothing is read back


def even_interval(start: int, end: int, events: int) -> int:
    """The interval that spreads `events` events over steps (start, end]."""
    return max(1, math.floor((end - start) / max(events, 1)))
