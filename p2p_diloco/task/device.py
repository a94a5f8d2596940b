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


def describe_device(device: torch.device) -> str:
    """For people watching the run: "cpu (N threads)", or the GPU's name."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"{device.type} ({torch.get_num_threads()} threads)"
