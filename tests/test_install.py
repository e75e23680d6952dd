"""scripts/install_llama_cpp.sh: the llama.cpp build flags for each kind of CPU our machines have,
whatever this machine is (the script reads the flags of a cpuinfo file the test writes)."""

import os
import platform
import subprocess

import pytest

from conftest import ROOT

INTEL_AMX = ("fpu sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c bmi2 avx2 avx512f avx512dq avx512bw avx512vl "
             "avx512vbmi avx_vnni avx512_bf16 avx512_vnni amx_bf16 avx512_fp16 amx_tile amx_int8")
AMD_AVX2 = "fpu sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c bmi2 avx2"


def flags(tmp_path, cpu_flags: str) -> set:
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nflags\t\t: {cpu_flags}\n")
    env = {k: v for k, v in os.environ.items() if k != "CMAKE_ARGS"}
    r = subprocess.run(["bash", str(ROOT / "scripts" / "install_llama_cpp.sh"), "--print-flags"], capture_output=True,
                       text=True, env={**env, "CPUINFO": str(info)}, timeout=60)
    assert r.returncode == 0, r.stderr
    return set(r.stdout.split())


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the flags are chosen on x86_64 only")
def test_amx_cpu_gets_avx512_kernels_without_amx(tmp_path):
    got = flags(tmp_path, INTEL_AMX)
    assert {"-DGGML_NATIVE=OFF", "-DGGML_AVX2=ON", "-DGGML_AVX512=ON", "-DGGML_AVX512_BF16=ON",
            "-DGGML_AVX512_VNNI=ON"} <= got
    # the AMX kernels segfault on Q8_0 / Q4_x matrices: never built
    assert {"-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"} <= got


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the flags are chosen on x86_64 only")
def test_avx2_cpu_gets_no_avx512(tmp_path):
    got = flags(tmp_path, AMD_AVX2)
    assert {"-DGGML_NATIVE=OFF", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON"} <= got
    assert {"-DGGML_AVX512=OFF", "-DGGML_AVX512_BF16=OFF", "-DGGML_AMX_TILE=OFF"} <= got

