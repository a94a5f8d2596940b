"""The embedded default model: a small Llama built from a transformers config, byte-level.

No weights are downloaded: the model is initialised from the run's seed. Presets
are named: `tiny` (tests), `small` (0.2M parameters, the default), `base` (0.8M),
`large` (4.8M).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import ConfigError

VOCAB_SIZE = 256  # bytes


@dataclass(frozen=True)
class ModelSpec:
    hidden_size: int
    layers: int
    heads: int
    intermediate_size: int
    seq_len: int

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, ModelSpec] = {
    "tiny": ModelSpec(hidden_size=32, layers=2, heads=2, intermediate_size=64, seq_len=32),
    "small": ModelSpec(hidden_size=64, layers=4, heads=4, intermediate_size=172, seq_len=128),
    "base": ModelSpec(hidden_size=128, layers=4, heads=4, intermediate_size=344, seq_len=128),
    "large": ModelSpec(hidden_size=256, layers=6, heads=8, intermediate_size=688, seq_len=256),
}


def model_spec(name: str) -> ModelSpec:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"model={name!r}: unknown preset; choose one of {', '.join(PRESETS)}") from None


def build_model(spec: ModelSpec, seed: int) -> nn.Module:
    """A LlamaForCausalLM initialised deterministically from `seed`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.heads,
        intermediate_size=spec.intermediate_size,
        max_position_embeddings=spec.seq_len,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model


def init_sha256(spec: ModelSpec, seed: int) -> str:
    """The sha256 of the parameters `build_model(spec, seed)` starts from (names, shapes and fp32 bytes, in name
    order): the run config carries the host's, and a peer whose libraries initialise differently refuses to train
    a run it cannot reproduce."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(build_model(spec, seed).state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:".encode())
        digest.update(tensor.detach().to(torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def built_with() -> str:
    """The libraries that decide a model's initial weights, as `init_sha256` saw them."""
    import transformers

    return f"torch {torch.__version__}, transformers {transformers.__version__}"


def lm_loss(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross-entropy (nats) of `tokens` [batch, seq_len]."""
    logits = model(input_ids=tokens[:, :-1]).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1))


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[torch.Tensor]) -> float:
    """Mean loss over fixed held-out batches."""
    was_training = model.training
    model.eval()
    total = sum(lm_loss(model, b).item() for b in batches) / len(batches)
    model.train(was_training)
    return total
