"""The model: a Llama built from a transformers config, byte-level.

No weights are downloaded: the model is initialised from the run's seed. Presets
are named: `tiny` (tests), `small` (0.2M parameters, the default), `base` (0.8M),
`large` (4.8M), and Llama-style sizes for real hardware: `llama-20m` (19.4M),
`llama-150m` (154M), `llama-1b` (1.03B). `--model FILE.json` takes a transformers
Llama config (`model_type` "llama", as `LlamaConfig.to_json_file` writes it; the
vocabulary stays byte-level, 256) or our own five fields (hidden_size, layers,
heads, intermediate_size, seq_len).
"""

from __future__ import annotations

import json
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
    # Llama-style proportions (intermediate ~2.75x hidden, head size 64-128) at the sizes people train for real
    "llama-20m": ModelSpec(hidden_size=512, layers=6, heads=8, intermediate_size=1408, seq_len=512),
    "llama-150m": ModelSpec(hidden_size=1024, layers=12, heads=16, intermediate_size=2816, seq_len=1024),
    "llama-1b": ModelSpec(hidden_size=2048, layers=20, heads=16, intermediate_size=5632, seq_len=2048),
}
MAX_CONFIG_BYTES = 1 << 20
# a transformers LlamaConfig's names for our fields
HF_NAMES = {"hidden_size": "hidden_size", "layers": "num_hidden_layers", "heads": "num_attention_heads",
            "intermediate_size": "intermediate_size", "seq_len": "max_position_embeddings"}


# fields of a saved transformers config that do not change the model's parameters or its forward pass
NOT_COMPARED = {"transformers_version", "architectures", "torch_dtype", "dtype", "use_cache", "_name_or_path",
                "output_attentions", "output_hidden_states", "return_dict"}


def model_spec(name: str) -> ModelSpec:
    """A preset by name, or the model described by a JSON file (`name` ends in .json)."""
    if name.endswith(".json"):
        return spec_from_file(name)
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"model={name!r}: unknown preset; choose one of {', '.join(PRESETS)}, "
                          "or a Llama config .json file") from None


def spec_from_file(path: str) -> ModelSpec:
    """The model of a JSON file: a transformers Llama config, or our five fields; ConfigError naming the file and
    what is wrong."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"--model {path}: cannot read it ({e.strerror or e})") from None
    try:
        if len(raw) > MAX_CONFIG_BYTES:
            raise ValueError(f"over {MAX_CONFIG_BYTES} bytes")
        obj = json.loads(raw)
        if not isinstance(obj, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        raise ConfigError(f"--model {path}: not a model config ({e})") from None
    hf = "model_type" in obj or "num_hidden_layers" in obj
    if hf and obj.get("model_type", "llama") != "llama":
        raise ConfigError(f"--model {path}: model_type {obj.get('model_type')!r}; only Llama-family configs "
                          "(model_type \"llama\") are supported")
    if hf and obj.get("num_key_value_heads", obj.get("num_attention_heads")) != obj.get("num_attention_heads"):
        raise ConfigError(f"--model {path}: num_key_value_heads must equal num_attention_heads (grouped-query "
                          "attention is not supported yet)")
    if hf and obj.get("vocab_size", VOCAB_SIZE) != VOCAB_SIZE:
        raise ConfigError(f"--model {path}: vocab_size {obj.get('vocab_size')}; the tokenizer is byte-level, so "
                          f"it must be {VOCAB_SIZE} (or left out)")
    values = {}
    for ours, theirs in HF_NAMES.items():
        key = theirs if hf else ours
        value = obj.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1 << 20:
            raise ConfigError(f"--model {path}: {key} must be a positive integer, got {value!r}")
        values[ours] = value
    if values["hidden_size"] % values["heads"]:
        raise ConfigError(f"--model {path}: hidden_size {values['hidden_size']} is not a multiple of the "
                          f"{values['heads']} attention heads")
    spec = ModelSpec(**values)
    if hf:  # what the run does not carry must be what every peer builds: refused rather than silently dropped
        built = json.loads(json.dumps(llama_config(spec).to_dict()))  # as a saved file holds it (string keys)
        for key, value in obj.items():
            if key in built and key not in NOT_COMPARED and value != built[key]:
                raise ConfigError(f"--model {path}: {key} = {value!r}, but a run builds its Llama with "
                                  f"{built[key]!r}; the run config carries only {', '.join(HF_NAMES.values())}")
    return spec


def parameter_count(spec: ModelSpec) -> int:
    """The model's parameters, counted on the meta device (nothing allocated)."""
    with torch.device("meta"):
        model = build_model(spec, 0)
    return sum(p.numel() for p in model.parameters())


def llama_config(spec: ModelSpec):
    """The transformers LlamaConfig every peer builds `spec` from."""
    from transformers import LlamaConfig

    return LlamaConfig(
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


def build_model(spec: ModelSpec, seed: int) -> nn.Module:
    """A LlamaForCausalLM initialised deterministically from `seed`."""
    from transformers import LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(llama_config(spec))
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
