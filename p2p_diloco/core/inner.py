"""The inner optimizer, one step at a time: AdamW, or Muon and AdamW (MuLoCo), under linear warmup and a cosine decay.

`inner_optimizer="adamw"` trains every parameter with AdamW. `"muon"` (MuLoCo,
arXiv 2505.23725) trains the transformer blocks' 2-D weight matrices (the blocks
`fragments.find_blocks` finds; nn.Linear, GPT-2's Conv1D, ...) with Muon
(momentum 0.95, Nesterov, its update scaled to AdamW's RMS so that `inner_lr` and
`inner_weight_decay` mean the same) and everything else (embeddings, the head,
norms, biases) with AdamW; the two step together as one optimizer, and the lr
schedule sets both. On a CPU, Muon's Newton-Schulz orthogonalization runs in fp32
rather than torch's bf16 (emulated there: 4x slower; `newton_schulz_fp32`). The state (moments, momentum buffers, step count) lives
across outer syncs; only the parameters are changed from outside (by the merge).
The loss is the task's (`task.model.lm_loss` for the embedded model): the
optimizer step does not know what it trains.

How a step is computed is the trainer's business, not the run's: a batch may be
cut into micro-batches whose gradients add up to the whole batch's (a small GPU
follows a run whose batch does not fit in its memory), and the forward pass may
run under an autocast context (bf16 on a GPU; the parameters, gradients and
optimizer state stay fp32).
"""

from __future__ import annotations

import math
import sys
from contextlib import contextmanager, nullcontext
from typing import Callable, ContextManager

import torch
from torch import nn

from .config import ConfigError, DiLoCoConfig
from .fragments import find_blocks

Loss = Callable[[nn.Module, torch.Tensor], torch.Tensor]  # (model, a batch) -> a scalar to minimize


def inner_lr(config: DiLoCoConfig, step: int) -> float:
    """Learning rate for inner step `step` (0-based): warmup, then cosine to min_lr_ratio."""
    if step < config.warmup_steps:
        return config.inner_lr * (step + 1) / config.warmup_steps
    span = max(config.total_steps - config.warmup_steps, 1)
    progress = min((step - config.warmup_steps) / span, 1.0)
    floor = config.min_lr_ratio
    return config.inner_lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


MUON_MOMENTUM = 0.95  # MuLoCo's and Muon's default, with Nesterov momentum


def block_matrices(model: nn.Module) -> list[nn.Parameter]:
    """The parameters Muon trains: the 2-D weights inside the transformer blocks (`find_blocks`, the rule that
    cuts the model into fragments), in `model.parameters()` order; never the input or output embedding (even
    tied into a block). Everything else (1-D, >2-D, outside the blocks) is AdamW's. ConfigError: no blocks."""
    try:
        _, blocks = find_blocks(model)
    except ConfigError as e:
        raise ConfigError(f"inner_optimizer=muon: {e} (Muon trains the blocks' matrices)") from None
    embeddings = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, getter, lambda: None)()
        if module is not None:
            embeddings |= {id(p) for p in module.parameters()}
    chosen = {id(p) for p in blocks.parameters() if p.ndim == 2 and id(p) not in embeddings}
    return [p for p in model.parameters() if id(p) in chosen]


def newton_schulz_fp32(grad: torch.Tensor, ns_coefficients: tuple[float, float, float], ns_steps: int,
                       eps: float) -> torch.Tensor:
    """torch's Muon orthogonalization (`torch.optim._muon._zeropower_via_newtonschulz`: the quintic Newton-Schulz
    iteration, same coefficients and steps) in fp32. torch runs it in bf16, which a CPU without bf16 units
    emulates: measured here, a Muon step of the embedded model took 4x an AdamW step (0.40 s against 0.10)."""
    a, b, c = ns_coefficients
    tall = grad.size(0) > grad.size(1)
    x = grad.to(torch.float32, copy=True)
    if tall:
        x = x.T
    x.div_(x.norm().clamp(min=eps))
    for _ in range(ns_steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


@contextmanager
def fp32_orthogonalization():
    """While inside, torch's Muon orthogonalizes in fp32 (`newton_schulz_fp32`): for parameters on a CPU. (It
    replaces a private function of torch's Muon module; where a torch has none by that name, nothing changes.)"""
    module = sys.modules.get("torch.optim._muon")
    original = getattr(module, "_zeropower_via_newtonschulz", None)
    if original is None:
        yield
        return
    module._zeropower_via_newtonschulz = newton_schulz_fp32
    try:
        yield
    finally:
        module._zeropower_via_newtonschulz = original


class MuonWithAdamW:
    """Muon for some parameters, AdamW for the rest, used as one torch optimizer: `param_groups` (AdamW's, then
    Muon's; the dicts are the optimizers' own, so setting their "lr" reaches both), `step`, `zero_grad`, and a
    `state_dict` / `load_state_dict` in torch's format whose parameter indices are `model.parameters()`
    positions (AdamW's entries hold exp_avg, exp_avg_sq, step; Muon's a momentum_buffer)."""

    def __init__(self, model: nn.Module, adamw: torch.optim.AdamW, muon: torch.optim.Muon):
        self.adamw, self.muon = adamw, muon
        position = {id(p): i for i, p in enumerate(model.parameters())}
        self._indices = [[position[id(p)] for g in opt.param_groups for p in g["params"]] for opt in (adamw, muon)]

    @property
    def param_groups(self) -> list[dict]:
        return self.adamw.param_groups + self.muon.param_groups

    def step(self) -> None:
        self.adamw.step()
        cpu = all(p.device.type == "cpu" for g in self.muon.param_groups for p in g["params"])
        with fp32_orthogonalization() if cpu else nullcontext():
            self.muon.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.adamw.zero_grad(set_to_none=set_to_none)
        self.muon.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        state, groups = {}, []
        for opt, indices in zip((self.adamw, self.muon), self._indices):
            own = opt.state_dict()
            state.update({indices[i]: s for i, s in own["state"].items()})
            groups += [{**g, "params": [indices[i] for i in g["params"]]} for g in own["param_groups"]]
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        """`state_dict` as `state_dict()` gives it: AdamW's groups first; each group's "params" name the
        parameters (by position) in the order the optimizer holds them."""
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"{len(groups)} param groups, expected {len(self.param_groups)}")
        split = len(self.adamw.param_groups)
        for opt, own in ((self.adamw, groups[:split]), (self.muon, groups[split:])):
            held = {i for g in own for i in g["params"]}
            opt.load_state_dict({"state": {i: s for i, s in state_dict["state"].items() if i in held},
                                 "param_groups": own})


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
        # AdamW alone (every parameter), or Muon for the blocks' matrices and AdamW for the rest (blocks without
        # a 2-D weight: AdamW alone)
        muon_params = block_matrices(model) if config.inner_optimizer == "muon" else []
        chosen = {id(p) for p in muon_params}
        self.adamw = torch.optim.AdamW([p for p in model.parameters() if id(p) not in chosen], lr=config.inner_lr,
                                       betas=config.inner_betas, weight_decay=config.inner_weight_decay)
        self.muon: torch.optim.Muon | None = None
        self.optimizer: torch.optim.AdamW | MuonWithAdamW = self.adamw
        if muon_params:
            self.muon = torch.optim.Muon(muon_params, lr=config.inner_lr, weight_decay=config.inner_weight_decay,
                                         momentum=MUON_MOMENTUM, nesterov=True, adjust_lr_fn="match_rms_adamw")
            self.optimizer = MuonWithAdamW(model, self.adamw, self.muon)
        self.step_count = 0

    def step(self, tokens: torch.Tensor, schedule_step: int | None = None, lr_scale: float = 1.0) -> float:
        """One forward/backward/optimizer step on a batch (for the embedded task a [batch, seq_len + 1] token window);
        returns the loss.

        `schedule_step`: where the lr schedule stands (the swarm's global step);
        a peer that joins late still warms its fresh optimizer state up over its own
        first `warmup_steps` steps. `lr_scale`: the schedule's lr times this (the simulator's Rescaled ASGD
        what-if: a slow worker's lr grown by its slowness).
        """
        lr = inner_lr(self.config, self.step_count)
        if schedule_step is not None:
            lr = min(inner_lr(self.config, max(schedule_step, self.config.warmup_steps)), lr) \
                if self.step_count < self.config.warmup_steps else inner_lr(self.config, schedule_step)
        lr *= lr_scale
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
