"""--device for every command: one rule for the default and one line for a device this host cannot use."""

from __future__ import annotations

import torch

from lmconvert.errors import UserError


def resolve_device(name: str | torch.device | None) -> torch.device:
    """None / "auto": cuda when a GPU is visible, else cpu. A CUDA device on a CPU-only torch build or a host
    without that GPU is a UserError (torch's own message is a long traceback from deep inside the first copy)."""
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise UserError(f"--device {name}: choose cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: choose cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.backends.cuda.is_built():
            raise UserError(f"--device {name}: this torch ({torch.__version__}) is a CPU-only build; "
                            "install a CUDA build of torch to use a GPU")
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: no CUDA GPU is visible on this host")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: this host has {torch.cuda.device_count()} GPU(s)")
    return device
