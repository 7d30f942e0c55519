"""The machine a benchmark ran on, named the same way by every script in bench/ (figures agree only on
the same CPU model, so each result carries it)."""
from __future__ import annotations

import os
import platform
from pathlib import Path


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def cpu_model() -> str:
    """The CPU's model name as the kernel reports it (what `lscpu` calls Model name), else the machine type."""
    name = next((x.split(":", 1)[1].strip() for x in _cpuinfo() if x.startswith("model name")), "")
    return name or platform.processor() or platform.machine()


def cpu_description() -> str:
    """The CPU's model name, core count and bf16 instruction sets: what decides a CPU's bf16 speed."""
    flags = next((set(x.split(":", 1)[1].split()) for x in _cpuinfo() if x.startswith("flags")), set())
    bf16 = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    return f"{cpu_model()}, {os.cpu_count()} cores, bf16 instructions: {', '.join(bf16) or 'none'}"
