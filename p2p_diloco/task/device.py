"""Where the model trains: the one place that decides the device."""

import torch


def pick_device(preferred: str | None = None) -> torch.device:
    """CUDA when present (or asked for), else CPU; an unavailable request is an error."""
    if preferred:
        device = torch.device(preferred)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {preferred!r} requested but CUDA is not available")
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
