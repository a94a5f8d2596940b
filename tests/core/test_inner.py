"""The inner step: micro-batches add up to the whole batch, bf16 autocast keeps fp32 state, torch.compile trains."""

from __future__ import annotations

import torch

from p2p_diloco.core.config import DiLoCoConfig
from p2p_diloco.core.inner import InnerTrainer
from p2p_diloco.task.device import autocast_for, resolve_precision
from p2p_diloco.task.model import build_model, lm_loss, model_spec

CONFIG = DiLoCoConfig(fragments=2, warmup_steps=2, total_steps=10, grad_clip=0.0)


def _batch(rows: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (rows, model_spec("tiny").seq_len + 1), generator=torch.Generator().manual_seed(seed))


def _trained(micro_batch=None, autocast=None, steps=2) -> tuple[list[float], dict]:
    model = build_model(model_spec("tiny"), 0)
    trainer = InnerTrainer(model, CONFIG, lm_loss, micro_batch=micro_batch, autocast=autocast)
    losses = [trainer.step(_batch(8, seed)) for seed in range(steps)]
    return losses, {k: v.clone() for k, v in model.state_dict().items()}


def test_micro_batches_accumulate_to_the_whole_batch_s_step():
    whole_losses, whole = _trained()
    for micro in (1, 3):  # (3: an uneven last micro-batch)
        losses, state = _trained(micro_batch=micro)
        assert max(abs(a - b) for a, b in zip(losses, whole_losses)) < 1e-5, (micro, losses, whole_losses)
        for name, value in whole.items():
            assert torch.allclose(state[name], value, atol=2e-5, rtol=1e-4), (micro, name)
    try:
        InnerTrainer(build_model(model_spec("tiny"), 0), CONFIG, lm_loss, micro_batch=0)
    except ValueError as e:
        assert "micro_batch" in str(e)
    else:
        raise AssertionError("micro_batch=0 accepted")


def test_bf16_autocast_trains_with_fp32_parameters_and_optimizer_state():
    device = torch.device("cpu")
    assert resolve_precision("auto", device) == "fp32"  # no GPU: fp32 unless asked
    assert resolve_precision("bf16", device) == "bf16"
    fp32_losses, fp32 = _trained()
    bf16_losses, bf16 = _trained(autocast=autocast_for("bf16", device))
    assert all(v.dtype == torch.float32 for v in bf16.values())
    assert bf16_losses != fp32_losses  # bf16 arithmetic did run ...
    assert max(abs(a - b) for a, b in zip(bf16_losses, fp32_losses)) < 0.05  # ... and trains the same model
    init = build_model(model_spec("tiny"), 0).state_dict()
    moved = [torch.cat([(state[k] - init[k]).reshape(-1) for k in sorted(init)]) for state in (fp32, bf16)]
    assert torch.nn.functional.cosine_similarity(moved[0], moved[1], dim=0) > 0.9  # the same update, roughly
    try:
        resolve_precision("fp8", device)
    except ValueError as e:
        assert "fp8" in str(e) and "bf16" in str(e)
    else:
        raise AssertionError("fp8 accepted")


def test_a_compiled_forward_trains_the_model_s_own_parameters():
    model = build_model(model_spec("tiny"), 0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    compiled = torch.compile(model, backend="eager")  # (the wrapping, not inductor's C++ build, is what is ours)
    trainer = InnerTrainer(model, CONFIG, lambda m, tokens: lm_loss(compiled, tokens))
    losses = [trainer.step(_batch(4, seed)) for seed in range(2)]
    eager = build_model(model_spec("tiny"), 0)
    eager_trainer = InnerTrainer(eager, CONFIG, lm_loss)
    eager_losses = [eager_trainer.step(_batch(4, seed)) for seed in range(2)]
    assert max(abs(a - b) for a, b in zip(losses, eager_losses)) < 1e-5
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    for k, v in eager.state_dict().items():
        assert torch.allclose(model.state_dict()[k], v, atol=1e-6)
