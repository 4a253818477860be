"""The two halves of model FLOPs utilisation: the FLOPs of a training step, and the device's peak.

FLOPs are counted by torch.utils.flop_counter (convolutions and matrix products) on
"meta" tensors, with this module's own formula for grouped convolutions' weight
gradients, which torch overcounts. Peaks are the dense figures from NVIDIA's datasheets
for the GPUs in :data:`GPU_PEAKS`; on the CPU an estimate from cores, clock and vector
width, which says that it is one.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from alexnet.runtime import cpu_cores
from alexnet.train.step import cpu_flags

# Dense peak FLOP/s per GPU and dtype, from NVIDIA's datasheets (no sparsity).
# "tf32" is what cuDNN uses for float32 convolutions by default (torch.backends.cudnn.allow_tf32).
GPU_PEAKS: dict[str, dict[str, float]] = {
    "H100 SXM": {"fp32": 66.9e12, "tf32": 494.7e12, "bf16": 989.4e12, "fp16": 989.4e12},
    "H100 NVL": {"fp32": 60.0e12, "tf32": 417.5e12, "bf16": 835.0e12, "fp16": 835.0e12},
    "H100 PCIe": {"fp32": 51.2e12, "tf32": 378.0e12, "bf16": 756.0e12, "fp16": 756.0e12},
    "H200": {"fp32": 66.9e12, "tf32": 494.7e12, "bf16": 989.4e12, "fp16": 989.4e12},
    "A100": {"fp32": 19.5e12, "tf32": 156.0e12, "bf16": 312.0e12, "fp16": 312.0e12},
}


def gpu_peak_key(name: str) -> str | None:
    """The GPU_PEAKS row for a CUDA device name such as 'NVIDIA H100 80GB HBM3'."""
    if "H200" in name:
        return "H200"
    if "H100" in name:
        return "H100 PCIe" if "PCIe" in name else "H100 NVL" if "NVL" in name else "H100 SXM"
    if "A100" in name:
        return "A100"
    return None


def cpu_peak(dtype: str) -> tuple[float, str]:
    """An estimate of the CPU's dense peak: cores x clock x FLOPs per cycle for its widest unit.

    Per core and cycle: two FMA ports of 16 float32 lanes (AVX-512) = 64 FLOPs, or 32 with
    AVX2. bf16: AMX tiles do 1024 bf16 FLOPs per cycle (16x AVX-512 float32), AVX512-BF16
    doubles float32. Clock from /proc/cpuinfo (the nominal, not the turbo, frequency).
    """
    flags, mhz = cpu_flags(), 0.0
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                mhz = float(line.split(":", 1)[1])
                break
    except (OSError, ValueError):
        pass
    cores = cpu_cores()
    ghz = mhz / 1000 if mhz else 2.0
    fp32 = 64 if "avx512f" in flags else 32 if "fma" in flags else 8
    per_cycle = fp32
    if dtype == "bf16":
        per_cycle = 16 * fp32 if "amx_bf16" in flags else 2 * fp32 if "avx512_bf16" in flags else fp32
    unit = {64: "AVX-512", 32: "AVX2 FMA", 8: "SSE"}[fp32]
    if dtype == "bf16" and "amx_bf16" in flags:
        unit = "AMX-BF16"
    return cores * ghz * 1e9 * per_cycle, f"estimate: {cores} cores x {ghz:.2f} GHz x {per_cycle} FLOPs/cycle ({unit})"


def device_peak(device: torch.device, dtype: str, override_tflops: float | None) -> tuple[float | None, str]:
    """The peak FLOP/s for ``dtype`` on device and where the figure comes from; None for an unknown GPU."""
    if override_tflops:
        return override_tflops * 1e12, "given with --peak-tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        key = gpu_peak_key(name)
        if key is None:
            return None, f"unknown peak for {name}: pass --peak-tflops"
        return GPU_PEAKS[key][dtype], f"{key} datasheet, dense {dtype}"
    return cpu_peak(dtype)


def fp32_kind(device: torch.device) -> str:
    """float32 on CUDA runs its convolutions in TF32 unless cuDNN is told otherwise (PyTorch's default)."""
    return "tf32" if device.type == "cuda" and torch.backends.cudnn.allow_tf32 else "fp32"


def _conv_backward_flops(
    grad_out_shape: Any, x_shape: Any, w_shape: Any, *args: Any, out_shape: Any = None, **kwargs: Any
) -> int:
    """torch.utils.flop_counter's convolution backward, with grouped weight gradients counted once.

    torch (2.14) counts the weight gradient of a grouped convolution as if it were not
    grouped: ``groups`` times too many (for the paper net: +17% FLOPs, a flattered MFU).
    For an ordinary convolution each of the two gradients costs what the forward does,
    2 * batch * output pixels * weight elements; transposed ones keep torch's formula.
    """
    from torch.utils import flop_counter

    transposed, groups, output_mask = args[4], args[6], args[7]
    if transposed or groups == 1:
        formula = getattr(flop_counter.conv_backward_flop, "__wrapped__", flop_counter.conv_backward_flop)
        return formula(grad_out_shape, x_shape, w_shape, *args, out_shape=out_shape, **kwargs)
    per_gradient = 2 * grad_out_shape[0] * math.prod(grad_out_shape[2:]) * math.prod(w_shape)
    return per_gradient * (int(output_mask[0]) + int(output_mask[1]))


def step_flops(model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor) -> int:
    """FLOPs of a forward and backward pass (convolutions and matrix products), counted by PyTorch.

    Run on "meta" copies of the parameters and inputs: shapes only, so counting costs no
    compute and no device memory, and the model's own gradients are left alone.
    """
    from torch.utils.flop_counter import FlopCounterMode

    meta = {n: torch.empty_like(p, device="meta").requires_grad_(p.requires_grad) for n, p in model.named_parameters()}
    meta.update({n: torch.empty_like(b, device="meta") for n, b in model.named_buffers()})
    mapping = {torch.ops.aten.convolution_backward: _conv_backward_flops}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        logits = torch.func.functional_call(model, meta, (torch.empty_like(x, device="meta"),))
        F.cross_entropy(logits, torch.empty_like(labels, device="meta")).backward()
    return int(counter.get_total_flops())
