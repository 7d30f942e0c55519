"""Which reduced precision this machine runs fast: the one place that resolves ``amp="auto"``.

Extraction and training both accept ``auto``: bf16 where the hardware has bf16 arithmetic (a CUDA
GPU that supports it, a CPU with AVX-512 BF16 or AMX), float32 elsewhere, because emulated bf16 is
slower than float32. The resolved mode is what runs and what files and logs record.
"""
from __future__ import annotations

import functools

import torch

AUTO = "auto"


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX-512 BF16 or AMX, per torch's cpuinfo; on Linux also the
    kernel's flags, which name ARM's bf16 too): elsewhere bf16 is emulated, slower than float32. Asked
    once per process: `amp="auto"` resolves it at every training step."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if any(check is not None and check() for check in checks):
        return True
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            words = set(f.read().split())
    except OSError:
        return False
    return bool(words & {"avx512_bf16", "amx_bf16", "bf16"})


def device_has_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 natively (a CUDA device that supports it, or a CPU with bf16 instructions)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        return cpu_has_bf16()
    return False


def resolve_amp(amp: str, device: torch.device) -> str:
    """`amp` with ``auto`` replaced by ``bf16`` or ``none`` for `device`; other values are returned as given."""
    if amp != AUTO:
        return amp
    return "bf16" if device_has_bf16(device) else "none"
