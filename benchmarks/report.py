"""Write a benchmark's table into docs/benchmarks.md under its own heading, with the machine named."""

import datetime
import platform
import re
from pathlib import Path

import torch

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


# the instruction sets that change which kernels run (and how fast): llama.cpp's, oneDNN's and
# bitsandbytes' CPU paths differ between AVX2-only, AVX-512 (BF16) and AMX machines
CPU_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def machine() -> str:
    """The CPU with its kernel-relevant flags and torch's CPU capability, the GPU, torch, the date."""
    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        lines = open("/proc/cpuinfo").read().splitlines()
        names = [l.split(":", 1)[1].strip() for l in lines if l.startswith("model name")]
        cpu = f"{names[0]} x{len(names)}" if names else cpu
        flags = next((set(l.split(":", 1)[1].split()) for l in lines if l.startswith("flags")), set())
    except OSError:
        pass
    shown = " ".join(f for f in CPU_FLAGS if f in flags) or "flags unknown"
    cpu = f"{cpu} ({shown}; torch CPU capability {torch.backends.cpu.get_cpu_capability()})"
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu}{gpu}; torch {torch.__version__}; {datetime.date.today().isoformat()}"


def write_section(title: str, table: str, command: str) -> None:
    """Replace (or append) the `## title` section of docs/benchmarks.md."""
    DOC.parent.mkdir(exist_ok=True)
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n\nEach section is written by the command it names.\n"
    section = f"## {title}\n\nMachine: {machine()}. Command: `{command}`\n\n{table}\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: section + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    DOC.write_text(text)
