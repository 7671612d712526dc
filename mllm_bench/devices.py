"""Peak dense FLOP/s of accelerators (no structured sparsity), for MFU.

Sources: NVIDIA data sheets (A100: 312 TFLOP/s bf16/fp16 tensor, 19.5 fp32; H100 SXM: 989 bf16,
67 fp32; H100 PCIe: 756 bf16, 51 fp32; H200: same chip as H100 SXM, 989 bf16, 67 fp32; L40S: 362
bf16, 91.6 fp32; L4: 121 bf16, 30.3 fp32; V100 SXM2: 125 fp16 tensor, 15.7 fp32), as in torchtitan.
"""

from __future__ import annotations

from .workload import dtype_name, parse_dtype

# name -> dtype -> peak dense FLOP/s
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "NVIDIA A100": {"bfloat16": 312e12, "float16": 312e12, "float32": 19.5e12},
    "NVIDIA H100 SXM": {"bfloat16": 989e12, "float16": 989e12, "float32": 67e12},
    "NVIDIA H100 PCIe": {"bfloat16": 756e12, "float16": 756e12, "float32": 51e12},
    "NVIDIA H200": {"bfloat16": 989e12, "float16": 989e12, "float32": 67e12},
    "NVIDIA L40S": {"bfloat16": 362e12, "float16": 362e12, "float32": 91.6e12},
    "NVIDIA L4": {"bfloat16": 121e12, "float16": 121e12, "float32": 30.3e12},
    "NVIDIA V100": {"float16": 125e12, "float32": 15.7e12},
}


def canonical_device(device_name: str) -> str | None:
    """The :data:`PEAK_FLOPS` key for a ``torch.cuda.get_device_name()`` string, or None."""
    name = device_name.upper()
    if "H200" in name:
        return "NVIDIA H200"
    if "H100" in name:
        return "NVIDIA H100 PCIe" if "PCIE" in name else "NVIDIA H100 SXM"
    for key in ("A100", "L40S", "V100"):
        if key in name:
            return f"NVIDIA {key}"
    if "L4" in name.split() or name.endswith(" L4"):
        return "NVIDIA L4"
    return None


def peak_flops(device_name: str, dtype: str = "bfloat16") -> float | None:
    """Peak dense FLOP/s of ``device_name`` at ``dtype``; None when unknown (e.g. CPUs)."""
    key = canonical_device(device_name)
    if key is None:
        return None
    return PEAK_FLOPS[key].get(dtype_name(parse_dtype(dtype)))
