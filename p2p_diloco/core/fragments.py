"""Split any torch causal LM into Streaming DiLoCo fragments.

The transformer blocks are found generically: the largest `nn.ModuleList` whose
children are all of one type. Block i goes to fragment i mod P (strided, as in
the paper); every other parameter (embeddings, final norm, head; tied weights
counted once) forms fragment P. A fragment is an ordered list of parameters and
flattens to one fp32 vector in that order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import ConfigError


@dataclass(frozen=True)
class Fragment:
    index: int
    names: tuple[str, ...]
    params: tuple[nn.Parameter, ...]

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)

    def flat(self) -> torch.Tensor:
        """The fragment's current values as one new fp32 CPU vector. From a GPU: concatenated there, then one
        non-blocking copy into pinned memory (one transfer at full bus speed, not one per parameter)."""
        device = self.params[0].device if self.params else torch.device("cpu")
        if device.type != "cuda":
            return torch.cat([p.detach().reshape(-1).to("cpu", torch.float32) for p in self.params])
        on_gpu = torch.cat([p.detach().reshape(-1).to(torch.float32) for p in self.params])
        out = torch.empty(on_gpu.numel(), dtype=torch.float32, pin_memory=True)
        out.copy_(on_gpu, non_blocking=True)
        torch.cuda.current_stream(device).synchronize()
        return out

    def assign(self, flat: torch.Tensor) -> None:
        """Copy a flat fp32 vector into the fragment's parameters (on their device and dtype)."""
        if flat.numel() != self.numel:
            raise ValueError(f"fragment {self.index}: got {flat.numel()} values, expected {self.numel}")
        device = self.params[0].device if self.params else torch.device("cpu")
        if device.type == "cuda":  # one pinned, non-blocking transfer, then the copies on the GPU
            flat = flat.to(torch.float32).pin_memory().to(device, non_blocking=True)
        offset = 0
        with torch.no_grad():
            for p in self.params:
                n = p.numel()
                p.copy_(flat[offset:offset + n].view_as(p))
                offset += n


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's transformer blocks: the largest ModuleList of modules of one type."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if len({type(m) for m in module}) == 1 and (best is None or len(module) > len(best[1])):
                best = (name, module)
    if best is None:
        raise ConfigError(f"{type(model).__name__} has no nn.ModuleList of identical blocks to fragment")
    return best


def split_fragments(model: nn.Module, num_block_fragments: int) -> list[Fragment]:
    """Fragments 0..P-1 hold blocks i with i % P == k; fragment P holds everything else.

    With P = 0 the whole model is one fragment (plain DiLoCo).
    """
    if num_block_fragments == 0:
        named = list(model.named_parameters())
        return [Fragment(0, tuple(n for n, _ in named), tuple(p for _, p in named))]
    blocks_name, blocks = find_blocks(model)
    if num_block_fragments > len(blocks):
        raise ConfigError(f"fragments={num_block_fragments}: the model has only {len(blocks)} transformer "
                          "blocks, so at most that many block fragments")
    groups: list[list[tuple[str, nn.Parameter]]] = [[] for _ in range(num_block_fragments + 1)]
    seen: set[int] = set()
    for i, block in enumerate(blocks):
        for pname, p in block.named_parameters():
            if id(p) not in seen:
                seen.add(id(p))
                groups[i % num_block_fragments].append((f"{blocks_name}.{i}.{pname}", p))
    for pname, p in model.named_parameters():  # named_parameters already skips tied duplicates
        if id(p) not in seen:
            seen.add(id(p))
            groups[num_block_fragments].append((pname, p))
    return [Fragment(k, tuple(n for n, _ in g), tuple(p for _, p in g)) for k, g in enumerate(groups)]
