"""The inner optimizer: AdamW with linear warmup and a cosine decay, one step at a time.

Its state (moments, step count) lives across outer syncs; only the parameters
are changed from outside (by the merge). The loss is the task's (`task.model.lm_loss`
for the embedded model): the optimizer step does not know what it trains.

How a step is computed is the trainer's business, not the run's: a batch may be
cut into micro-batches whose gradients add up to the whole batch's (a small GPU
follows a run whose batch does not fit in its memory), and the forward pass may
run under an autocast context (bf16 on a GPU; the parameters, gradients and
AdamW state stay fp32).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Callable, ContextManager

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
    def __init__(self, model: nn.Module, config: DiLoCoConfig, loss: Loss, micro_batch: int | None = None,
                 autocast: Callable[[], ContextManager] | None = None):
        """`micro_batch`: rows of a batch per forward/backward (None: the whole batch at once); `autocast`: a
        context for the forward pass (e.g. `torch.autocast("cuda", torch.bfloat16)`); None: none."""
        if micro_batch is not None and micro_batch < 1:
            raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
        self.model = model
        self.loss = loss
        self.config = config
        self.micro_batch = micro_batch
        self.autocast = autocast or nullcontext
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
        loss = self._backward(tokens)
        if self.config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
        return loss

    def _backward(self, tokens: torch.Tensor) -> float:
        """The batch's mean loss, its gradient accumulated in the parameters' .grad: one micro-batch at a time,
        each weighted by its share of the rows (equal to the whole batch's loss when every row has as many
        tokens, as the embedded task's windows do)."""
        rows = tokens.shape[0]
        size = min(self.micro_batch or rows, rows)
        total = torch.zeros((), device=tokens.device)
        for start in range(0, rows, size):
            part = tokens[start:start + size]
            with self.autocast():
                loss = self.loss(self.model, part)
            (loss * (part.shape[0] / rows)).backward()
            total += loss.detach() * (part.shape[0] / rows)
        return total.item()
