"""A peer's checkpoint: model, inner and outer optimizer state, anchors, steps; atomic, verified on load.

A checkpoint directory holds:

* `state-<global step>.safetensors`: every tensor — the working parameters
  (`model/<name>`), each fragment's anchor, outer momentum and error-feedback
  residual (`anchor/<k>`, `momentum/<k>`, `residual/<k>`), the AdamW moments
  (`adam/<i>/exp_avg`, `adam/<i>/exp_avg_sq`, `adam/<i>/step`) and, in a run
  whose inner optimizer is Muon, the momentum buffer of every parameter Muon
  trains (`muon/<i>/momentum_buffer`, zeros before its first step, which is what
  Muon starts from); `<i>` is the parameter's position in `model.parameters()`;
* `checkpoint.json`: what the tensors are (format version, run id, model spec,
  Streaming DiLoCo config, global and inner step, the round and state hash each
  fragment holds, tokens since each fragment's last round, AdamW's param groups
  and, with Muon, Muon's with the positions of its parameters), the name of the
  state file and its sha256.

Rounds in flight are not part of a checkpoint: a resumed peer holds the last
rounds it applied, and the swarm's newer state wins at its next round (catch-up).

Saving writes the state file under a temporary name, renames it, then replaces
`checkpoint.json` (write + fsync + rename), and only then deletes older state
files: a crash at any moment leaves either the old or the new checkpoint whole.
Loading checks the metadata, the file's hash, every tensor's name, shape and
dtype against the model being resumed, and that the anchors hash to the recorded
digests; anything wrong raises `CheckpointError` naming it, and nothing on disk
is touched. `check_checkpoint_dir` checks what can be checked without the run
(the metadata, the state file's hash), so that `join --resume` refuses a bad
checkpoint before it touches the network.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..core.config import ConfigError, DiLoCoConfig
from ..core.inner import InnerTrainer
from ..core.state_hash import state_hash
from ..core.streaming import StreamingDiLoCo
from ..task.model import ModelSpec

FORMAT_VERSION = 1
META_NAME = "checkpoint.json"
ADAM_KEYS = ("exp_avg", "exp_avg_sq", "step")


class CheckpointError(ValueError):
    """A checkpoint cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class CheckpointInfo:
    path: str
    run_id: str
    global_step: float
    inner_step: int
    rounds: list[int]  # the round each fragment's anchor comes from (-1: the run's seed)
    data_position: dict | None = None  # where this peer's `--dataset` reading stood (`task.dataset`); None: none


def save_checkpoint(directory: str, run_id: str, spec: ModelSpec, outer: StreamingDiLoCo, trainer: InnerTrainer,
                    global_step: float, data_position: dict | None = None) -> str:
    """Write a checkpoint of this peer into `directory` (created if missing); returns the state file's path.
    `data_position`: where its dataset reading stands (`DatasetStream.position`), kept in the metadata."""
    os.makedirs(directory, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for name, p in trainer.model.named_parameters():
        tensors[f"model/{name}"] = p.detach().cpu()
    for k, (a, m) in enumerate(zip(outer.anchors, outer.momenta)):
        tensors[f"anchor/{k}"], tensors[f"momentum/{k}"] = a, m
    if outer.residuals is not None:
        for k, r in enumerate(outer.residuals):
            tensors[f"residual/{k}"] = r
    optimizer = trainer.optimizer.state_dict()  # parameters by their position in model.parameters()
    for i, state in optimizer["state"].items():
        for key in ADAM_KEYS:
            if key in state:
                tensors[f"adam/{i}/{key}"] = torch.as_tensor(state[key]).detach().cpu()
    adam_groups, muon_groups = _split_groups(optimizer, trainer)
    params = list(trainer.model.parameters())
    for i in (i for g in muon_groups for i in g["params"]):
        buffer = optimizer["state"].get(i, {}).get("momentum_buffer")
        tensors[f"muon/{i}/momentum_buffer"] = (torch.zeros(params[i].shape, dtype=params[i].dtype) if buffer is None
                                                else buffer.detach().cpu())
    tensors = {k: v.contiguous().clone() for k, v in tensors.items()}  # safetensors refuses shared storage
    name = f"state-{int(global_step)}.safetensors"
    final = os.path.join(directory, name)
    tmp = final + f".tmp{os.getpid()}"
    save_file(tensors, tmp)
    _fsync(tmp)
    os.replace(tmp, final)
    meta = {
        "format": FORMAT_VERSION, "run_id": run_id, "model": spec.to_dict(), "diloco": outer.config.to_dict(),
        "global_step": float(global_step), "inner_step": trainer.step_count, "rounds": list(outer.base_round),
        "digests": list(outer.digests), "tokens_since_sync": list(outer.tokens_since_sync),
        "adam_param_groups": [{k: v for k, v in g.items() if k != "params"} for g in adam_groups],
        "state_file": name, "state_sha256": _sha256(final),
    }
    if trainer.muon is not None:
        meta["muon_param_groups"] = muon_groups
    if data_position is not None:
        meta["data_position"] = data_position
    meta_tmp = os.path.join(directory, META_NAME + f".tmp{os.getpid()}")
    with open(meta_tmp, "w") as f:
        json.dump(meta, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(meta_tmp, os.path.join(directory, META_NAME))
    for old in os.listdir(directory):
        if old.startswith("state-") and old.endswith(".safetensors") and old != name:
            os.remove(os.path.join(directory, old))
    return final


def read_checkpoint(directory: str, run_id: str, spec: ModelSpec, config: DiLoCoConfig
                    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Metadata and tensors of the checkpoint in `directory`, checked against this run; raises CheckpointError."""
    meta, state_path = _whole_checkpoint(directory, run_id)
    meta_path = os.path.join(directory, META_NAME)
    if meta.get("model") != spec.to_dict():
        raise CheckpointError(f"{meta_path}: model {meta.get('model')} differs from the run's {spec.to_dict()}")
    try:
        saved = DiLoCoConfig.from_dict(meta.get("diloco"))
    except (ConfigError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{meta_path}: bad diloco config ({e})") from None
    if saved.fragments != config.fragments:
        raise CheckpointError(f"{meta_path}: saved with {saved.fragments} fragments, the run has {config.fragments}")
    if saved.inner_optimizer != config.inner_optimizer:
        raise CheckpointError(f"{meta_path}: saved with inner_optimizer {saved.inner_optimizer}, the run has "
                              f"{config.inner_optimizer}")
    try:
        tensors = load_file(state_path)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{state_path}: not a readable safetensors file ({e})") from None
    return meta, tensors


def load_checkpoint(directory: str, run_id: str, spec: ModelSpec, outer: StreamingDiLoCo,
                    trainer: InnerTrainer) -> CheckpointInfo:
    """Restore this peer from `directory`. Everything is checked before anything is changed."""
    meta, tensors = read_checkpoint(directory, run_id, spec, outer.config)
    where = os.path.join(directory, meta["state_file"])

    def take(name: str, like: torch.Tensor) -> torch.Tensor:
        t = tensors.get(name)
        if t is None:
            raise CheckpointError(f"{where}: no tensor {name!r}")
        if t.shape != like.shape or t.dtype != like.dtype:
            raise CheckpointError(f"{where}: {name} is {tuple(t.shape)} {t.dtype}, expected "
                                  f"{tuple(like.shape)} {like.dtype}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{where}: {name} holds non-finite values")
        return t

    n = len(outer.fragments)
    for key in ("rounds", "digests", "tokens_since_sync"):
        if not isinstance(meta.get(key), list) or len(meta[key]) != n:
            raise CheckpointError(f"{directory}/{META_NAME}: {key} must list {n} fragments")
    params = {name: take(f"model/{name}", p.detach()) for name, p in trainer.model.named_parameters()}
    anchors = [take(f"anchor/{k}", a) for k, a in enumerate(outer.anchors)]
    momenta = [take(f"momentum/{k}", m) for k, m in enumerate(outer.momenta)]
    for k, (a, m) in enumerate(zip(anchors, momenta)):
        if state_hash(a, m) != meta["digests"][k]:
            raise CheckpointError(f"{where}: fragment {k}'s anchor and momentum do not match their recorded hash")
    residuals = None
    if outer.residuals is not None:
        residuals = [take(f"residual/{k}", r) if f"residual/{k}" in tensors else torch.zeros_like(r)
                     for k, r in enumerate(outer.residuals)]
    current = trainer.optimizer.state_dict()
    current_adam, current_muon = _split_groups(current, trainer)
    all_params = list(trainer.model.parameters())
    adam_state = {}
    for i in (i for g in current_adam for i in g["params"]):
        if f"adam/{i}/exp_avg" in tensors:
            p = all_params[i].detach()
            adam_state[i] = {"exp_avg": take(f"adam/{i}/exp_avg", p), "exp_avg_sq": take(f"adam/{i}/exp_avg_sq", p),
                             "step": tensors.get(f"adam/{i}/step", torch.tensor(0.0))}
    groups = meta.get("adam_param_groups")
    if not isinstance(groups, list) or len(groups) != len(current_adam):
        raise CheckpointError(f"{directory}/{META_NAME}: adam_param_groups do not match the optimizer")
    muon_groups = meta.get("muon_param_groups", [])
    if (not isinstance(muon_groups, list) or len(muon_groups) != len(current_muon)
            or any(not isinstance(g, dict) or g.get("params") != cg["params"]
                   for g, cg in zip(muon_groups, current_muon))):
        raise CheckpointError(f"{directory}/{META_NAME}: muon_param_groups do not name the parameters this run "
                              "trains with Muon")
    muon_state = {i: {"momentum_buffer": take(f"muon/{i}/momentum_buffer", all_params[i].detach())}
                  for g in current_muon for i in g["params"]}
    # everything checked: now change the peer
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            p.copy_(params[name].to(p.device))
    outer.restore(anchors, momenta, residuals, [int(r) for r in meta["rounds"]], list(meta["digests"]),
                  [int(t) for t in meta["tokens_since_sync"]])
    trainer.optimizer.load_state_dict({
        "state": {**adam_state, **muon_state},
        "param_groups": [{**g, "params": cg["params"]}
                         for g, cg in zip(groups + muon_groups, current["param_groups"])]})
    trainer.step_count = int(meta["inner_step"])
    position = meta.get("data_position")
    return CheckpointInfo(where, run_id, float(meta["global_step"]), int(meta["inner_step"]), list(outer.base_round),
                          position if isinstance(position, dict) else None)


@dataclass(frozen=True)
class CheckpointSummary:
    """What `check_checkpoint_dir` found: a checkpoint that is whole, of some run, not yet matched to a model."""

    path: str  # the state file
    run_id: str
    global_step: float
    inner_step: int


def check_checkpoint_dir(directory: str, run_id: str | None = None) -> CheckpointSummary:
    """Check what can be checked of the checkpoint in `directory` before the run config is known (before a peer
    touches the network): the directory, `checkpoint.json` (readable, its format version, the run, the steps),
    the state file it names (present, its sha256). `load_checkpoint` checks the rest against the run's model.
    Raises CheckpointError naming the file; reads the state file once, changes nothing."""
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory}: {'not a directory' if os.path.exists(directory) else 'no such directory'}"
                              " (nothing to resume from)")
    meta, state_path = _whole_checkpoint(directory, run_id)
    return CheckpointSummary(state_path, meta["run_id"], float(meta["global_step"]), int(meta["inner_step"]))


def _whole_checkpoint(directory: str, run_id: str | None) -> tuple[dict[str, Any], str]:
    """(metadata, state file path) of the checkpoint in `directory`: `checkpoint.json` readable, of this format
    and run (any run: None), with sane steps, naming a state file that is present and hashes as recorded."""
    meta_path = os.path.join(directory, META_NAME)
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{meta_path}: missing, so no checkpoint here") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{meta_path}: unreadable ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{meta_path}: format {meta.get('format') if isinstance(meta, dict) else meta!r}, "
                              f"expected {FORMAT_VERSION}")
    saved_run = meta.get("run_id")
    if not isinstance(saved_run, str):
        raise CheckpointError(f"{meta_path}: bad run_id {saved_run!r}")
    if run_id is not None and saved_run != run_id:
        raise CheckpointError(f"{meta_path}: a checkpoint of run {saved_run!r}, not {run_id!r}")
    for key in ("global_step", "inner_step"):
        value = meta.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise CheckpointError(f"{meta_path}: bad {key} {value!r}")
    name = meta.get("state_file")
    if not isinstance(name, str) or os.path.basename(name) != name or not name.endswith(".safetensors"):
        raise CheckpointError(f"{meta_path}: bad state_file {name!r}")
    state_path = os.path.join(directory, name)
    if not os.path.isfile(state_path):
        raise CheckpointError(f"{state_path}: missing (named by {META_NAME})")
    digest = _sha256(state_path)
    if digest != meta.get("state_sha256"):
        raise CheckpointError(f"{state_path}: sha256 {digest[:12]} does not match the recorded "
                              f"{str(meta.get('state_sha256'))[:12]} (truncated or changed)")
    return meta, state_path


def check_checkpoint_target(directory: str) -> None:
    """`directory` can take checkpoints: a writable directory, or one `save_checkpoint` can create (its nearest
    existing ancestor is a writable directory). Raises CheckpointError naming it."""
    path = os.path.abspath(directory)
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise CheckpointError(f"{directory}: a file, not a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise CheckpointError(f"{directory}: not writable by this user")
        return
    ancestor = os.path.dirname(path)
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise CheckpointError(f"{directory}: cannot be created, {ancestor} is a file")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise CheckpointError(f"{directory}: cannot be created, {ancestor} is not writable by this user")


def _split_groups(optimizer: dict, trainer: InnerTrainer) -> tuple[list[dict], list[dict]]:
    """(AdamW's, Muon's) param groups of the inner optimizer's state dict (AdamW's come first; no Muon: [])."""
    split = len(trainer.adamw.param_groups)
    return optimizer["param_groups"][:split], optimizer["param_groups"][split:]


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())
