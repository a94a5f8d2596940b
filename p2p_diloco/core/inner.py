"""The inner optimizer: AdamW with linear warmup and a cosine decay, one step at a time.

Its state (moments, step count) lives across outer syncs; only the parameters
are changed from outside (by the merge). The loss is the task's (`task.model.lm_loss`
for the embedded model): the optimizer step does not know what it trains.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from .config import DiLoCoConfig

Loss = Callable[[nn.Module, torch.Tensor], torch.Tensor]  # (model, a batch) -> a scalar to minimize


def inner_lr(config: DiLoCoConfig, step: int) -> float:
    """Learning rate for inner step `step` (0-based): warmup, then cosine to min_lr_ratio."""
    if step < config.warmup_steps:
        return config.inner_lr * (step + 1) / config.warmup_steps
    span = max(config.total_steps - config.warmup_steps, 1)
    progress = min((step - config.warmup_steps) / span, 1.0)
    floor = config.min_lr_ratio
    return config.inner_lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


class InnerTrainer:
    def __init__(self, model: nn.Module, config: DiLoCoConfig, loss: Loss):
        self.model = model
        self.loss = loss
        self.config = config
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=config.inner_lr, betas=config.inner_betas,
                                           weight_decay=config.inner_weight_decay)
        self.step_count = 0

    def step(self, tokens: torch.Tensor, schedule_step: int | None = None) -> float:
        """One forward/backward/AdamW step on a batch (for the embedded task a [batch, seq_len + 1] token window);
        returns the loss.

        `schedule_step`: where the lr schedule stands (the swarm's global step);
        a peer that joins late still warms its fresh AdamW state up over its own
        first `warmup_steps` steps.
        """
        lr = inner_lr(self.config, self.step_count)
        if schedule_step is not None:
            lr = min(inner_lr(self.config, max(schedule_step, self.config.warmup_steps)), lr) \
                if self.step_count < self.config.warmup_steps else inner_lr(self.config, schedule_step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss = self.loss(self.model, tokens)
        loss.backward()
        if self.config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
        return loss.item()
