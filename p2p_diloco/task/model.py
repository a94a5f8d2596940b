"""The model: any transformers causal LM, from a preset, a config file or a local model directory.

* **presets** (`tiny` (tests), `small` (0.2M parameters, the default), `base`
  (0.8M), `large` (4.8M), and Llama-style sizes for real hardware: `llama-20m`
  (19.4M), `llama-150m` (154M), `llama-1b` (1.03B)) and **our five fields**
  (hidden_size, layers, heads, intermediate_size, seq_len) in a JSON file are a
  byte-level Llama that we build;
* **a transformers config JSON** (`PretrainedConfig.to_json_file` output) of any
  architecture `AutoModelForCausalLM` knows: a plain Llama of ours becomes the
  five fields, anything else (GPT-2, Qwen, grouped-query attention, another
  vocabulary) is carried whole in the run config (`ModelSpec.config`);
* **a local HF model directory** (`config.json`, and weights as `*.safetensors`
  or `pytorch_model*.bin` to continue pre-training or fine-tune from them): the
  run config carries its config and the weights' name; every peer needs its own
  copy of the directory (`join --model DIR`), and the run's `init_sha256` (the
  hash of the initial parameters) makes a peer with other weights refuse the run.

Without weights a model is initialised from the run's seed: nothing is downloaded.
The vocabulary is byte-level (256) unless the run names a tokenizer
(`task.tokenizer`), whose vocabulary must fit the model's.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

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
    # beyond a byte-level Llama of ours (defaults: absent from the dict, so older records and checkpoints still read)
    vocab_size: int = VOCAB_SIZE
    config: str = ""  # a transformers config as canonical JSON (any causal LM); "": the Llama the fields describe
    weights: str = ""  # the pretrained weights' name (a model directory's); "": initialised from the run's seed
    tokenizer: str = ""  # sha256 of the run's tokenizer (`task.tokenizer.Tokenizer.sha256`); "": byte-level

    def to_dict(self) -> dict:
        d = asdict(self)
        for name, default in EXTRA_DEFAULTS.items():
            if d[name] == default:
                del d[name]
        return d

    def describe(self) -> str:
        """For people: the architecture (and the weights it starts from)."""
        kind = json.loads(self.config).get("model_type", "?") if self.config else "llama"
        return f"{kind}{f' from {self.weights}' if self.weights else ''}"


EXTRA_DEFAULTS = {"vocab_size": VOCAB_SIZE, "config": "", "weights": "", "tokenizer": ""}
MAX_SEQ_LEN = 2048  # training windows of a model whose positions reach further are this long
MAX_CONFIG_CHARS = 12 << 10  # a carried config: it travels in the run config, a DHT record of at most 16 KiB
WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin")


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
    """A preset by name, the model a JSON file describes (`name` ends in .json), or a local model directory."""
    if os.path.isdir(name):
        return spec_from_directory(name)
    if name.endswith(".json"):
        return spec_from_file(name)
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"model={name!r}: unknown preset; choose one of {', '.join(PRESETS)}, a transformers "
                          "config .json file or a model directory") from None


def _read_json(path: str, where: str) -> dict:
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"{where}: cannot read it ({e.strerror or e})") from None
    try:
        if len(raw) > MAX_CONFIG_BYTES:
            raise ValueError(f"over {MAX_CONFIG_BYTES} bytes")
        obj = json.loads(raw)
        if not isinstance(obj, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        raise ConfigError(f"{where}: not a model config ({e})") from None
    return obj


def spec_from_file(path: str) -> ModelSpec:
    """The model of a JSON file: a transformers config (a plain Llama of ours as the five fields, anything else
    carried whole), or our five fields; ConfigError naming the file and what is wrong."""
    obj = _read_json(path, f"--model {path}")
    hf = "model_type" in obj or "num_hidden_layers" in obj
    values = {}
    for ours, theirs in HF_NAMES.items():
        key = theirs if hf else ours
        value = obj.get(key)
        if key in obj or not hf:
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1 << 20:
                raise ConfigError(f"--model {path}: {key} must be a positive integer, got {value!r}")
        values[ours] = value
    if values["hidden_size"] and values["heads"] and values["hidden_size"] % values["heads"]:
        raise ConfigError(f"--model {path}: hidden_size {values['hidden_size']} is not a multiple of the "
                          f"{values['heads']} attention heads")
    if not hf:
        return ModelSpec(**values)
    if obj.get("model_type", "llama") == "llama" and None not in values.values():
        spec = ModelSpec(**values)
        built = json.loads(json.dumps(llama_config(spec).to_dict()))  # as a saved file holds it (string keys)
        if all(value == built[key] for key, value in obj.items() if key in built and key not in NOT_COMPARED):
            return spec  # the Llama we build from the five fields
    return spec_from_config(obj, f"--model {path}")


def spec_from_config(obj: dict, where: str) -> ModelSpec:
    """Any causal LM transformers knows, its config carried whole; ConfigError naming what is wrong."""
    from transformers import AutoConfig, AutoModelForCausalLM

    obj = dict(obj, model_type=obj.get("model_type", "llama"))
    try:
        config = AutoConfig.for_model(**obj)
    except Exception as e:  # an unknown model_type, a field of the wrong type: transformers' many error types
        raise ConfigError(f"{where}: not a config transformers can build ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if type(config) not in AutoModelForCausalLM._model_mapping:
        raise ConfigError(f"{where}: model_type {obj['model_type']!r} is not a causal language model "
                          "(AutoModelForCausalLM has no class for it)")
    canonical = {k: v for k, v in json.loads(config.to_json_string(use_diff=False)).items() if k not in NOT_COMPARED}
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"))
    if len(text) > MAX_CONFIG_CHARS:
        raise ConfigError(f"{where}: its config takes {len(text)} characters, over the {MAX_CONFIG_CHARS} a run "
                          "config can carry")
    inter = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
    values = {"hidden_size": getattr(config, "hidden_size", None), "layers": getattr(config, "num_hidden_layers", None),
              "heads": getattr(config, "num_attention_heads", None),
              "intermediate_size": inter or 4 * (getattr(config, "hidden_size", 0) or 0),
              "seq_len": min(getattr(config, "max_position_embeddings", None) or MAX_SEQ_LEN, MAX_SEQ_LEN),
              "vocab_size": getattr(config, "vocab_size", None)}
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1 << 24:
            raise ConfigError(f"{where}: {name} must be a positive integer, got {value!r}")
    spec = ModelSpec(**values, config=text)
    try:
        with torch.device("meta"):  # a config transformers accepts but cannot build (heads not dividing, ...)
            _from_config(spec)
    except Exception as e:
        raise ConfigError(f"{where}: transformers cannot build it ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''})") from None
    return spec


def weight_files(directory: str) -> list[str]:
    return sorted(str(p) for pattern in WEIGHT_FILES for p in Path(directory).glob(pattern))


def spec_from_directory(directory: str) -> ModelSpec:
    """A local HF model directory: its config.json (any causal LM), and the weights' name when it holds weights."""
    where = f"--model {directory}"
    config_path = os.path.join(directory, "config.json")
    if not os.path.isfile(config_path):
        raise ConfigError(f"{where}: no config.json in it (a model directory as `save_pretrained` writes it)")
    spec = spec_from_config(_read_json(config_path, f"{where}/config.json"), where)
    if weight_files(directory):
        spec = replace(spec, weights=os.path.basename(os.path.normpath(directory)) or directory)
    return spec


def parameter_count(spec: ModelSpec) -> int:
    """The model's parameters, counted on the meta device (nothing allocated)."""
    with torch.device("meta"):
        model = build_model(replace(spec, weights=""), 0)
    return sum(p.numel() for p in model.parameters())


def flops_per_token(spec: ModelSpec, parameters: int) -> float:
    """Training FLOPs per token (forward and backward): 6 per parameter plus attention's 12 * layers * hidden *
    seq_len (PaLM's MFU accounting; the tied embedding counted once, as the output projection)."""
    return 6.0 * parameters + 12.0 * spec.layers * spec.hidden_size * spec.seq_len


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


def _from_config(spec: ModelSpec) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(AutoConfig.for_model(**json.loads(spec.config)), dtype=torch.float32)


def build_model(spec: ModelSpec, seed: int, weights_dir: str | None = None) -> nn.Module:
    """The model, fp32: a Llama of ours or any carried config initialised deterministically from `seed`, or (a
    spec with `weights`) the pretrained model of this peer's copy `weights_dir`; ConfigError when that is missing
    or holds another model."""
    if spec.weights:
        if weights_dir is None:
            raise ConfigError(f"the run starts from the pretrained weights {spec.weights!r}: give this peer its own "
                              "copy of that model directory with --model DIR")
        mine = spec_from_directory(weights_dir)
        if replace(mine, weights="", tokenizer="") != replace(spec, weights="", tokenizer=""):
            raise ConfigError(f"--model {weights_dir}: its config.json describes another model than the run's "
                              f"({spec.weights})")
        if not mine.weights:
            raise ConfigError(f"--model {weights_dir}: it holds no weights ({' or '.join(WEIGHT_FILES)})")
        from transformers import AutoModelForCausalLM

        try:
            return AutoModelForCausalLM.from_pretrained(weights_dir, dtype=torch.float32)
        except Exception as e:  # a truncated or foreign weights file: transformers' and safetensors' error types
            raise ConfigError(f"--model {weights_dir}: cannot load its weights ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if spec.config:
            return _from_config(spec)
        from transformers import LlamaForCausalLM

        return LlamaForCausalLM(llama_config(spec))


def init_sha256(spec: ModelSpec, seed: int, weights_dir: str | None = None) -> str:
    """The sha256 of the parameters `build_model(spec, seed, weights_dir)` starts from (names, shapes and fp32
    bytes, in name order): the run config carries the host's, and a peer whose libraries initialise differently
    (or whose copy of the weights differs) refuses to train a run it cannot reproduce."""
    return weights_sha256(build_model(spec, seed, weights_dir))


def weights_sha256(model: nn.Module) -> str:
    """`init_sha256` of a model already built."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
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
