"""CPU kernels for decoding (lit_llama/csrc): attention of one query over the KV cache
(decode_attention.cpp), products with 4- and 8-bit weights (lowbit_matmul.cpp) and with
half-precision weights (dense_matvec.cpp).

Built on first use with torch's C++ extension loader (a C++ compiler and ninja, what torch.compile
on CPU needs already), once per machine and torch version, and registered as operators
`torch.ops.lit_llama.*`, which compiled graphs call directly. Where they cannot be built,
`available()` says so once and the model keeps torch's own operators.
"""

import hashlib
import platform
import sys
from pathlib import Path
from typing import Sequence

import torch

SOURCES = sorted((Path(__file__).parent / "csrc").glob("*.cpp"))
_state: dict = {}


def available() -> bool:
    """Build and load the kernels once per process; False (after one warning line) where they cannot be."""
    if "ok" not in _state:
        _state["ok"] = _load()
    return _state["ok"]


def build(name: str, sources: Sequence[Path], flags: Sequence[str] = ()) -> None:
    """Compile `sources` for this CPU (-march=native) and load them into the process. The build's
    name carries the CPU's flags, the torch version and `flags`: a cache directory shared by
    different machines then holds one build for each."""
    from torch.utils.cpp_extension import load

    key = hashlib.sha1(f"{torch.__version__} {_cpu()} {' '.join(flags)}".encode()).hexdigest()[:12]
    load(name=f"{name}_{key}", sources=[str(s) for s in sources], is_python_module=False,
         extra_cflags=["-O3", "-march=native", "-fopenmp", *flags], extra_ldflags=["-fopenmp"], verbose=False)


def _load() -> bool:
    try:
        build("lit_llama_cpu_kernels", SOURCES)
    except Exception as e:  # no compiler, no ninja: the model still runs, on torch's operators
        print(f"warning: the CPU decoding kernels could not be built ({type(e).__name__}: "
              f"{str(e).splitlines()[0] if str(e) else ''}); using torch's operators", file=sys.stderr)
        return False

    @torch.library.register_fake("lit_llama::decode_attention")
    def _(q, k, v, mask):
        return torch.empty_like(q, memory_format=torch.contiguous_format)

    # codes (N/16, K * bits / 32, 64): see lowbit_matmul.cpp
    @torch.library.register_fake("lit_llama::lowbit_matmul")
    def _(x, codes, sm, groupsize, bits):
        return x.new_empty((x.size(0), codes.size(0) * 16), dtype=torch.float32)

    @torch.library.register_fake("lit_llama::dense_matvec")
    def _(x, w):
        return x.new_empty((x.size(0), w.size(0)), dtype=torch.float32)

    @torch.library.register_fake("lit_llama::lowbit_dequantize")
    def _(codes, sm, groupsize, bits):
        return codes.new_empty((codes.size(0) * 16, codes.size(1) * 32 // bits), dtype=torch.float32)

    return True


def _cpu() -> str:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu += next((line for line in f if line.startswith("flags")), "")
    except OSError:
        pass
    return cpu
