"""Where the stages compute: the device a run names, its peak FLOP/s, and FLOPs per token.

The trainer, the two evaluate stages and the throughput benchmark resolve a device the same
way, so a run's ``device`` (``auto``, ``cpu`` or ``cuda``) means one thing everywhere.
"""

from __future__ import annotations

import numpy as np
import torch

from workflow.errors import TrainError

# Dense bf16 peak TFLOP/s by GPU name (first match), for the MFU of the log when the engine
# settings give no peak_tflops.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """The device a run's ``device`` names; process ``local_rank`` of a node gets that GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise TrainError("device is 'cuda' but torch sees no GPU; use 'auto' or 'cpu'")
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    return device


def peak_tflops(device: torch.device, configured: float | None) -> float | None:
    """Peak TFLOP/s of one device for the MFU: as configured, or known by the GPU's name."""
    if configured or device.type != "cuda":
        return configured
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def flops_per_token(shape: dict, n_params: int) -> int:
    """Training FLOPs per token: 6N for the weights plus 12 L d T for attention's products."""
    return 6 * n_params + 12 * shape["n_layers"] * shape["d_model"] * shape["context_length"]


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on ``device``; to a GPU through pinned memory, without waiting for it."""
    tensor = torch.from_numpy(array)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor


def configure(device: torch.device, threads: int) -> None:
    """This process's math settings: ``threads`` CPU threads, or TF32 matmuls on a GPU."""
    if device.type == "cpu":
        torch.set_num_threads(threads)
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
