"""Which reduced precision a device runs natively, so that ``auto`` settings never pick an emulated one."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

__all__ = ["native_bf16", "resolve_mixed_precision"]


@functools.cache
def _cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no way to tell cheaply, assume no native bf16
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` computes bf16 matrix products in hardware.

    CUDA: compute capability ≥ 8.0 (Ampere and later). CPU: the ``avx512_bf16`` or ``amx_bf16`` instruction
    sets (oneDNN uses them for bf16 convolutions; without them bf16 is emulated and slower than fp32).
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] >= 8
    if device.type == "cpu":
        return bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())
    return False


def resolve_mixed_precision(value: str, device: torch.device | str) -> str:
    """``auto`` → ``bf16`` where :func:`native_bf16`, else ``no``; other values unchanged."""
    if value != "auto":
        return value
    return "bf16" if native_bf16(device) else "no"
