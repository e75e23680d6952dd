"""CPU attention for decoding: one query per sequence over the KV cache (decode_attention.cpp).

Built on first use with torch's C++ extension loader (a C++ compiler and ninja, what torch.compile
on CPU needs already), once per machine, and registered as the operator
`torch.ops.lit_llama.decode_attention`, which compiled graphs call directly. Where it cannot be
built, `available()` says so once and decoding keeps scaled_dot_product_attention.
"""

import hashlib
import platform
import sys
from pathlib import Path

import torch

_SOURCE = Path(__file__).with_name("decode_attention.cpp")
_state: dict = {}


def available() -> bool:
    """Build and load the kernel once per process; False (after one warning line) where it cannot."""
    if "ok" not in _state:
        _state["ok"] = _load()
    return _state["ok"]


def _load() -> bool:
    try:
        from torch.utils.cpp_extension import load

        # -march=native: the build is for this CPU and this torch, so its name carries both (a cache
        # directory shared by different machines then holds one build for each)
        load(name=f"lit_llama_decode_attention_{_build_key()}", sources=[str(_SOURCE)], is_python_module=False,
             extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # no compiler, no ninja: the model still runs, on SDPA
        print(f"warning: the CPU decode attention kernel could not be built ({type(e).__name__}: "
              f"{str(e).splitlines()[0] if str(e) else ''}); using scaled_dot_product_attention", file=sys.stderr)
        return False

    @torch.library.register_fake("lit_llama::decode_attention")
    def _(q, k, v, mask):
        return torch.empty_like(q, memory_format=torch.contiguous_format)

    return True


def _build_key() -> str:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu += next((line for line in f if line.startswith("flags")), "")
    except OSError:
        pass
    return hashlib.sha1(f"{torch.__version__} {cpu}".encode()).hexdigest()[:12]
