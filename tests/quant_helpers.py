"""Helpers shared by the quantization, GPTQ and evaluation tests."""

import importlib.util
from pathlib import Path

import pytest
import torch

from conftest import ROOT


def tiny_checkpoint(tmp: Path, default_checkpoint: Path, seed: int = 0, **overrides) -> Path:
    """A random tiny model with the embedded model's tokenizer (so that real text can calibrate it)."""
    from lit_llama.io.checkpoint import save_checkpoint
    from lit_llama.model import Config, LLaMA

    torch.manual_seed(seed)
    config = Config(**{**dict(name="tiny-smol", block_size=256, vocab_size=49152, n_layer=2, n_head=4, n_embd=128,
                              n_query_groups=2, intermediate_size=256, tie_embeddings=True), **overrides})
    out = tmp / f"tiny-{seed}"
    save_checkpoint(out, LLaMA(config), tokenizer_dir=default_checkpoint)
    return out


def calibration_file(tmp: Path, chars: int = 20000) -> Path:
    from lit_llama.quant.gptq import default_calibration_text

    path = tmp / "calibration.txt"
    path.write_text(default_calibration_text()[:chars])
    return path


def run_main(script: str, args, monkeypatch, capsys, env=None, expect_exit=True):
    """Run a script's main through run_cli in this process, as its command line would: (exit code,
    stderr) when it must fail, else (stdout, stderr). Any exception but run_cli's SystemExit fails
    the test with its traceback."""
    from lit_llama.utils import run_cli

    for k, v in (env or {}).items():
        monkeypatch.setenv(k, v)
    spec = importlib.util.spec_from_file_location(f"script_{Path(script).stem}", ROOT / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not expect_exit:
        run_cli(module.main, args=[str(a) for a in args])
        captured = capsys.readouterr()
        return captured.out, captured.err
    with pytest.raises(SystemExit) as exit_info:
        run_cli(module.main, args=[str(a) for a in args])
    return exit_info.value.code, capsys.readouterr().err


def assert_one_error_line(code, stderr, *words):
    assert code != 0
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for w in words:
        assert w in lines[0], lines[0]
