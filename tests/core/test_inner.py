"""The inner step: micro-batches add up to the whole batch, bf16 autocast keeps fp32 state, torch.compile trains;
Muon (MuLoCo) trains the blocks' matrices and AdamW the rest, under one lr schedule."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest
import torch

from p2p_diloco.core.config import ConfigError, DiLoCoConfig
from p2p_diloco.core.inner import InnerTrainer, block_matrices, inner_lr
from p2p_diloco.task.device import autocast_for, resolve_precision
from p2p_diloco.task.model import build_model, lm_loss, model_spec, spec_from_config

CONFIG = DiLoCoConfig(fragments=2, warmup_steps=2, total_steps=10, grad_clip=0.0)
MUON = replace(CONFIG, inner_optimizer="muon")


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


def _hf_model(kind: str) -> torch.nn.Module:
    """A tiny model of another architecture, built from its config as a run builds it (`spec_from_config`)."""
    from transformers import GPT2Config, LlamaConfig

    if kind == "gpt2":  # Conv1D matrices in its blocks, the head tied to the input embedding
        config = GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=64, vocab_size=256, bos_token_id=None,
                            eos_token_id=None)
    else:  # a Llama whose head is an nn.Linear of its own (untied)
        config = LlamaConfig(vocab_size=256, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                             intermediate_size=64, max_position_embeddings=64, tie_word_embeddings=False,
                             bos_token_id=None, eos_token_id=None)
    return build_model(spec_from_config(json.loads(config.to_json_string()), kind), 0)


# the block matrices each architecture has, by name (the reference the rule is checked against)
MATRICES = {"llama": r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight",
            "gpt2": r"transformer\.h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight"}


@pytest.mark.parametrize("kind", ["tiny", "small", "gpt2", "llama-untied"])
def test_muon_trains_the_blocks_matrices_and_adamw_everything_else(kind):
    model = build_model(model_spec(kind), 0) if kind in ("tiny", "small") else _hf_model(kind)
    trainer = InnerTrainer(model, MUON, lm_loss)
    muon = {id(p) for g in trainer.muon.param_groups for p in g["params"]}
    adamw = {id(p) for g in trainer.adamw.param_groups for p in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert muon.isdisjoint(adamw) and muon | adamw == set(names)  # every parameter trained, by one optimizer
    pattern = MATRICES["gpt2" if kind == "gpt2" else "llama"]
    assert sorted(names[i] for i in muon) == sorted(n for n in names.values() if re.fullmatch(pattern, n))
    per_block = 4 if kind == "gpt2" else 7
    assert len(muon) == per_block * model.config.num_hidden_layers
    embeddings = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    assert embeddings <= adamw  # the input embedding and the head (tied or a Linear of its own)
    assert kind != "llama-untied" or len(embeddings) == 2
    assert all(i in adamw for i, n in names.items() if "norm" in n or "ln_" in n or n.endswith(".bias"))
    group = trainer.muon.param_groups[0]
    assert (group["momentum"], group["nesterov"], group["adjust_lr_fn"], group["weight_decay"]) == \
        (0.95, True, "match_rms_adamw", MUON.inner_weight_decay)
    plain = InnerTrainer(model, CONFIG, lm_loss)  # the default: AdamW for every parameter, as before
    assert plain.muon is None and plain.optimizer is plain.adamw and isinstance(plain.optimizer, torch.optim.AdamW)
    assert [p for g in plain.optimizer.param_groups for p in g["params"]] == list(model.parameters())


def test_muon_never_takes_an_embedding_and_needs_blocks():
    class Tied(torch.nn.Module):  # a head that is one of the blocks' Linears
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(16, 8)
            self.layers = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(3))

        def get_input_embeddings(self):
            return self.embed

        def get_output_embeddings(self):
            return self.layers[-1]

    model = Tied()
    assert block_matrices(model) == [model.layers[0].weight, model.layers[1].weight]
    with pytest.raises(ConfigError, match="inner_optimizer=muon: .* no nn.ModuleList of identical blocks"):
        InnerTrainer(torch.nn.Sequential(torch.nn.Linear(4, 4)), MUON, lm_loss)


def test_a_few_muon_steps_lower_the_loss_on_a_fixed_batch():
    model = build_model(model_spec("tiny"), 0)
    trainer = InnerTrainer(model, replace(MUON, inner_lr=3e-3), lm_loss)
    batch = _batch(8)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = [trainer.step(batch) for _ in range(8)]
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < losses[0] - 0.1, losses
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters())  # both optimizers stepped
    buffers = [trainer.muon.state[p]["momentum_buffer"] for g in trainer.muon.param_groups for p in g["params"]]
    assert buffers and all(b.dtype == torch.float32 and b.abs().sum() > 0 for b in buffers)
    state = trainer.optimizer.state_dict()  # one state dict, by position in model.parameters()
    positions = {id(p): i for i, p in enumerate(model.parameters())}
    for g, opt in zip(state["param_groups"], trainer.adamw.param_groups + trainer.muon.param_groups):
        assert g["params"] == [positions[id(p)] for p in opt["params"]]
    assert sorted(state["state"]) == list(range(len(positions)))


def test_the_lr_schedule_reaches_both_optimizers():
    config = replace(MUON, inner_weight_decay=0.0, warmup_steps=4, total_steps=12)
    trainer = InnerTrainer(build_model(model_spec("tiny"), 0), config, lm_loss)
    assert len(trainer.optimizer.param_groups) == 2
    for step in range(6):
        trainer.step(_batch(2, step))
        assert [g["lr"] for g in trainer.optimizer.param_groups] == [inner_lr(config, step)] * 2
    trainer.step(_batch(2), schedule_step=10)  # a peer following the swarm's schedule
    assert [g["lr"] for g in trainer.muon.param_groups + trainer.adamw.param_groups] == [inner_lr(config, 10)] * 2
    trainer.step(_batch(2), schedule_step=10, lr_scale=4.0)  # the simulator's Rescaled ASGD what-if
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [4.0 * inner_lr(config, 10)] * 2
    # the lr the schedule sets is the one each optimizer steps with: the first step of a half-as-long warmup moves
    # every parameter (Muon's and AdamW's, no weight decay) twice as far, its direction the same
    moves = []
    for warmup in (1, 2):
        model = build_model(model_spec("tiny"), 0)
        before = [p.detach().clone() for p in model.parameters()]
        InnerTrainer(model, replace(config, warmup_steps=warmup), lm_loss).step(_batch(4))
        moves.append([p.detach() - b for p, b in zip(model.parameters(), before)])
    for full, half in zip(*moves):
        assert torch.allclose(full, 2 * half, rtol=1e-3, atol=1e-7)


def test_muon_orthogonalizes_in_fp32_on_a_cpu_like_torchs_own_in_bf16():
    import torch.optim._muon as torch_muon

    from p2p_diloco.core.inner import fp32_orthogonalization, newton_schulz_fp32

    torch.manual_seed(0)
    original = torch_muon._zeropower_via_newtonschulz
    for shape in ((172, 64), (64, 172), (64, 64)):
        g = torch.randn(shape)
        before = g.clone()
        ours = newton_schulz_fp32(g, (3.4445, -4.7750, 2.0315), 5, 1e-7)
        theirs = original(g, (3.4445, -4.7750, 2.0315), 5, 1e-7).float()
        assert ours.dtype == torch.float32 and ours.shape == shape and torch.equal(g, before)
        assert (ours - theirs).norm() < 0.03 * theirs.norm()  # (bf16 keeps 8 bits, over 5 iterations)
        # orthogonalized: the singular values are near 1 (the quintic iteration's 0.5..1.5 band)
        singular = torch.linalg.svdvals(ours)
        assert singular.min() > 0.3 and singular.max() < 1.6
    with fp32_orthogonalization():
        assert torch_muon._zeropower_via_newtonschulz is newton_schulz_fp32
    assert torch_muon._zeropower_via_newtonschulz is original
