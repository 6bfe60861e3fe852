"""The Lightning precision a run trains in: 'auto' resolved from what the hardware computes natively."""
from __future__ import annotations

from pathlib import Path

import torch

# The x86 flags Linux lists for bf16 arithmetic in hardware. Without them (Skylake-SP to Ice Lake,
# AMD before Zen 4) bf16 is emulated: no faster than float32, only less precise.
NATIVE_BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
# Ampere and later: bf16 tensor cores; older GPUs get float16 mixed precision instead.
NATIVE_BF16_CUDA_CAPABILITY = (8, 0)


def choose_precision(requested: str | int, accelerator: str, cpu_flags: set[str],
                     cuda_capability: tuple[int, int] | None) -> tuple[str, str]:
    """(Lightning precision, a one-line reason) for the `requested` precision.

    'auto' is bf16 mixed precision where the hardware computes bf16 natively: on CUDA (an `accelerator`
    of auto, gpu or cuda, with `cuda_capability` given) from compute capability 8.0, else float16 mixed
    precision; on the CPU when `cpu_flags` hold avx512_bf16 or amx_bf16, else float32. Anything else
    is returned as given.
    """
    if str(requested) != "auto":
        return str(requested), f"precision {requested} as configured"
    if str(accelerator) in ("auto", "gpu", "cuda") and cuda_capability is not None:
        capability = ".".join(map(str, cuda_capability))
        if tuple(cuda_capability) >= NATIVE_BF16_CUDA_CAPABILITY:
            return "bf16-mixed", f"auto: bf16-mixed, the GPU (compute capability {capability}) computes bf16 natively"
        return "16-mixed", f"auto: 16-mixed, the GPU (compute capability {capability}, below 8.0) has no native bf16"
    native = sorted(NATIVE_BF16_CPU_FLAGS & set(cpu_flags))
    if native:
        return "bf16-mixed", f"auto: bf16-mixed, the CPU computes bf16 natively ({', '.join(native)})"
    return "32-true", "auto: 32-true, the CPU has no native bf16 (neither avx512_bf16 nor amx_bf16)"


def read_cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU's feature flags as Linux lists them; empty where there is no /proc/cpuinfo."""
    try:
        text = cpuinfo.read_text()
    except FileNotFoundError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


def detect_precision(requested: str | int, accelerator: str) -> tuple[str, str]:
    """choose_precision on this machine's facts: the CPU's flags, and the capability of CUDA device 0
    when the run would go to CUDA."""
    if str(requested) != "auto":
        # Asking CUDA its capability initialises it in this process, which a forked DDP start cannot have.
        return choose_precision(requested, accelerator, set(), None)
    on_cuda = str(accelerator) in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    capability = torch.cuda.get_device_capability(0) if on_cuda else None
    return choose_precision(requested, accelerator, read_cpu_flags(), capability)
