"""Dense bf16 / fp16 tensor-core peaks of the GPUs the benchmarks know, for model FLOP utilisation."""
from __future__ import annotations

# TFLOP/s without sparsity, from the vendor's data sheets; fp16 equals bf16 on these parts
PEAK_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0}


def peak_tflops(gpu_name: str | None, amp: str) -> float | None:
    """The peak for a GPU named `gpu_name` (torch.cuda.get_device_name) under `amp` bf16 / fp16; None
    for fp32, the CPU, or a GPU not listed (pass --peak-tflops then)."""
    if not gpu_name or amp not in ("bf16", "fp16"):
        return None
    return next((peak for part, peak in PEAK_TFLOPS.items() if part in gpu_name), None)
