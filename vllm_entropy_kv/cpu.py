"""What this CPU offers vLLM's CPU backend: its model, its vector ISA and the dtype it serves
fastest. Read from /proc/cpuinfo, so the launcher need not import torch or vLLM."""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass
from pathlib import Path

# The ISAs, best first, by the /proc/cpuinfo flags that name them.
_ISA_FLAGS: tuple[tuple[str, frozenset[str]], ...] = (
    ("AMX", frozenset({"amx_tile", "amx_bf16"})),
    ("AVX-512 BF16", frozenset({"avx512f", "avx512_bf16"})),
    ("AVX-512", frozenset({"avx512f"})),
    ("AVX2", frozenset({"avx2"})),
)
# Native bf16 dot products: vLLM's bf16 kernels and oneDNN's matmuls are the fast path.
# Without them a bf16 matmul of prefill's shape took 4.8 s against 0.09 s in float32 (AVX2,
# one thread, 3000x576 @ 576x1536).
BF16_ISAS = frozenset({"AMX", "AVX-512 BF16"})


@dataclass(frozen=True)
class CpuInfo:
    model: str
    flags: frozenset[str]

    @property
    def isa(self) -> str:
        """The best vector ISA the CPU has ("AMX", "AVX-512 BF16", "AVX-512", "AVX2")."""
        for name, needed in _ISA_FLAGS:
            if needed <= self.flags:
                return name
        return platform.machine()

    def fast_dtype(self) -> tuple[str, str]:
        """The dtype to serve, and why."""
        if self.isa in BF16_ISAS:
            return "bfloat16", f"this CPU has {self.isa}: bf16 kernels are native"
        return "float32", (f"this CPU has {self.isa}, no native bf16: bf16 matmuls are "
                           "emulated and far slower than float32")

    def describe(self) -> str:
        return f"{self.model} ({self.isa})"


@functools.cache
def cpu_info(cpuinfo: Path = Path("/proc/cpuinfo")) -> CpuInfo:
    model, flags = platform.processor() or platform.machine(), frozenset[str]()
    try:
        text = cpuinfo.read_text()
    except OSError:
        return CpuInfo(model, flags)
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
            model = value.strip()
        elif key.strip() == "flags":
            flags = frozenset(value.split())
            break
    return CpuInfo(model, flags)
