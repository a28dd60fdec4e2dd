"""Model FLOPs utilisation: achieved TFLOP/s from the analytic FLOPs (model/flops.py)
over the device's dense bf16 peak."""
from __future__ import annotations

import torch

from trainer.hardware import GPUS

# Dense (no sparsity) bf16 tensor-core peak per GPU, from NVIDIA's data sheets (the
# planner's GPUs from its table, trainer/hardware.py).
PEAK_BF16_DENSE_TFLOPS: dict[str, float] = {
    "H100 SXM": GPUS["h100"].peak_bf16_tflops,
    "H100 PCIe": 756.0,
    "H800": GPUS["h800"].peak_bf16_tflops,
    "H200": GPUS["h200"].peak_bf16_tflops,
    "A100": 312.0,
}

# torch.cuda.get_device_name() -> table key: every listed substring must occur (case-insensitive).
# First match wins; a name matching no rule (e.g. "H100 NVL") gets no peak, hence no MFU.
_DEVICE_NAME_RULES: tuple[tuple[tuple[str, ...], str], ...] = (
    (("H200",), "H200"),  # H200 and GH200
    (("H800", "HBM3"), "H800"),  # "NVIDIA H800 80GB HBM3", the SXM part (not the PCIe)
    (("H100", "PCIE"), "H100 PCIe"),
    (("H100", "HBM3"), "H100 SXM"),  # "NVIDIA H100 80GB HBM3" is the SXM part
    (("H100", "SXM"), "H100 SXM"),
    (("A100",), "A100"),  # SXM4 and PCIe share the 312 TFLOP/s peak
)


# ---------------------------------------------------------------- throughput and MFU


def achieved_tflops(flops: float, seconds: float) -> float:
    if not seconds > 0:
        raise ValueError(f"seconds={seconds} must be positive (the measured step time)")
    return flops / seconds / 1e12


def mfu(achieved: float, peak_tflops: float) -> float:
    """Model FLOPs utilisation: achieved TFLOP/s over the device's dense peak (a fraction)."""
    if not peak_tflops > 0:
        raise ValueError(f"peak_tflops={peak_tflops} must be positive")
    return achieved / peak_tflops


def peak_tflops_for(device_name: str) -> float | None:
    """Dense bf16 peak of a GPU named as `torch.cuda.get_device_name` names it; None if unknown."""
    name = device_name.upper()
    for needles, key in _DEVICE_NAME_RULES:
        if all(needle in name for needle in needles):
            return PEAK_BF16_DENSE_TFLOPS[key]
    return None


def device_peak_tflops() -> float | None:
    """Peak of this process's CUDA device, or None on CPU (no meaningful tensor-core peak)."""
    if not torch.cuda.is_available():
        return None
    return peak_tflops_for(torch.cuda.get_device_name())


def throughput_metrics(flops: float, seconds: float, peak_tflops: float | None) -> dict[str, float]:
    """Fields for a metrics record: `tflops` always, `mfu` only when a peak is known."""
    achieved = achieved_tflops(flops, seconds)
    record = {"tflops": achieved}
    if peak_tflops is not None:
        record["mfu"] = mfu(achieved, peak_tflops)
    return record
