"""Where the model trains and how: the one place that decides the device, the precision and the GPU's figures.

* `pick_device`: CUDA when present (or the one asked for), else the CPU;
* `resolve_precision` / `autocast_for`: "auto" is bf16 autocast on a GPU that
  supports it, fp32 elsewhere; the parameters, gradients, optimizer state and
  everything sent to the swarm stay fp32 either way;
* `peak_flops` / `memory_used`: what the progress line's MFU and memory come from.
"""

from __future__ import annotations

from contextlib import nullcontext
from functools import partial
from typing import Callable, ContextManager

import torch

from .precisions import PRECISIONS

# dense bf16 tensor-core peak (FLOP/s) of GPUs people train on, by a substring of torch's device name; first match
# wins (so "H100 PCIe" before "H100"). MFU is reported only for a GPU listed here.
BF16_PEAK = (
    ("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("GH200", 989e12), ("B200", 2250e12),
    ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12), ("A6000", 155e12),
    ("A10G", 70e12), ("A10", 125e12), ("RTX 4090", 165e12), ("RTX 3090", 71e12), ("V100", 125e12),
    ("T4", 65e12),
)


def pick_device(preferred: str | None = None) -> torch.device:
    """CUDA when present (or asked for), else CPU; an unavailable request is an error."""
    if preferred:
        try:
            device = torch.device(preferred)
        except RuntimeError:
            raise ValueError(f"device {preferred!r} is not a device name (cpu, cuda, cuda:1, ...)") from None
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(f"device {preferred!r} requested but CUDA is not available")
            if device.index is not None and device.index >= torch.cuda.device_count():
                raise ValueError(f"device {preferred!r} requested but this machine has "
                                 f"{torch.cuda.device_count()} CUDA device(s)")
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def describe_device(device: torch.device) -> str:
    """For people watching the run: "cpu (N threads)", or the GPU's name."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"{device.type} ({torch.get_num_threads()} threads)"


def resolve_precision(precision: str, device: torch.device) -> str:
    """"fp32" or "bf16" for `precision` on `device`; ValueError for one it cannot run."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"precision bf16: {torch.cuda.get_device_name(device)} does not support bfloat16; "
                         "use fp32")
    return precision


def autocast_for(precision: str, device: torch.device) -> Callable[[], ContextManager]:
    """The forward pass's context: bf16 autocast on `device`, or nothing for fp32."""
    if precision == "bf16":
        return partial(torch.autocast, device_type=device.type, dtype=torch.bfloat16)
    return nullcontext


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak in FLOP/s when known (GPUs of `BF16_PEAK`), else None. MFU is measured
    against it whatever the run's precision, as is usual (PaLM's definition)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for part, peak in BF16_PEAK if part in name), None)


def memory_used(device: torch.device) -> int | None:
    """Bytes of GPU memory this process's tensors have used at most (torch's allocator), None on the CPU."""
    if device.type != "cuda":
        return None
    return int(torch.cuda.max_memory_allocated(device))
