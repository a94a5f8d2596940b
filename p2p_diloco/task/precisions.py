"""The forward pass's arithmetic a trainer may ask for (`task.device` resolves it; the CLI offers it without
importing torch, so a bad flag is refused in a fraction of a second)."""

PRECISIONS = ("auto", "fp32", "bf16")
