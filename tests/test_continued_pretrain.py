"""Continued pretraining (pretrain/continued.py, pretrain/redpajama.py --initial_checkpoint_dir): the
run starts from the checkpoint's weights, as evaluate/full.py's perplexity code scores them, resumes
exactly after kill -9, and refuses data prepared with another tokenizer."""

import importlib.util
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, run_script
from lit_llama.data.packed import open_dataset
from lit_llama.data.records import tokenizer_fingerprint
from lit_llama.eval.perplexity import perplexity
from lit_llama.io.checkpoint import load_config, load_model, save_checkpoint
from lit_llama.model import Config, LLaMA
from lit_llama.tokenizer import Tokenizer
from lit_llama.utils import run_cli
import test_packed_dataset
from test_packed_dataset import _one_error_line, make_documents, write_corpus
from test_pretrain import losses

small_tokenizer, other_tokenizer = test_packed_dataset.small_tokenizer, test_packed_dataset.other_tokenizer
ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
BLOCK = 16


@pytest.fixture(scope="module")
def base(tmp_path_factory, small_tokenizer):
    """A 'released' model: random weights, its head scaled up so that its loss lies far above a
    freshly initialised model's ln(320) (a run that reinitialised it would show), context 64."""
    torch.manual_seed(3)
    model = LLaMA(Config(name="base", n_layer=2, n_head=2, n_embd=32, intermediate_size=64, block_size=64,
                         vocab_size=320))
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    d = tmp_path_factory.mktemp("base") / "base"
    save_checkpoint(d, model, small_tokenizer)
    return d


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, base):
    tmp = tmp_path_factory.mktemp("corpus")
    src = write_corpus(tmp / "src", make_documents(300, seed=7))
    r = run_script("scripts/prepare_text_files.py", "--source_path", src, "--checkpoint_dir", base,
                   "--destination_path", tmp / "data", "--block_size", BLOCK, "--blocks_per_shard", "16",
                   "--val_fraction", "0.1", "--num_workers", "1", env=ENV)
    assert r.returncode == 0, r.stderr
    return tmp / "data"


def args(base, corpus, out, *extra, script="pretrain/continued.py"):
    return [script, "--initial_checkpoint_dir", base, "--train_data_dir", corpus / "train", "--val_data_dir",
            corpus / "val", "--out_dir", out, "--block_size", BLOCK, "--max_iters", "12", "--save_interval", "4",
            "--eval_interval", "4", "--eval_iters", "1", "--micro_batch_size", "2", "--global_batch_size", "2",
            "--learning_rate", "1e-2", "--warmup_iters", "2", "--log_interval", "1", "--num_workers", "1",
            "--activation_checkpointing", "false", *extra]


def base_loss(base, corpus, windows) -> float:
    """ln(perplexity) of the base model on these windows of the training stream, by evaluate/full.py's code."""
    data = open_dataset(corpus / "train", BLOCK, tokenizer_fingerprint(base), base, seed=1337, shuffle=True)
    tokens = torch.cat([torch.from_numpy(data.window_at(p).astype("int64")) for p in windows])
    return math.log(perplexity(load_model(base).float(), tokens, BLOCK + 1, "cpu"))


@pytest.fixture(scope="module")
def run_a(tmp_path_factory, base, corpus):
    out = tmp_path_factory.mktemp("a") / "out"
    r = run_script(*args(base, corpus, out), env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    return r, out


def test_first_loss_is_the_base_models_then_falls(base, corpus, run_a):
    r, out = run_a
    loss = losses(r.stdout)
    # step 1's batch: windows 0 and 1 of the stream, scored by the untouched base weights
    assert loss[1] == pytest.approx(base_loss(base, corpus, [0, 1]), abs=2e-4)
    assert loss[1] > math.log(320) + 1  # not a reinitialised model's ln(vocabulary)
    assert loss[12] < loss[1] - 0.5, loss
    # the saved model folders keep the base's config (its context too) and tokenizer
    assert load_config(out / "step-000012") == load_config(base)
    assert (out / "step-000012" / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()
    state = torch.load(out / "step-000012.ckpt", weights_only=True)
    torch.testing.assert_close(load_model(out / "step-000012").transformer.wte.weight,
                               state["model"]["transformer.wte.weight"])
    assert Tokenizer(out / "step-000012").decode(Tokenizer(base).encode("the river", bos=False)) == "the river"


def test_sigkill_then_resume_is_exact(tmp_path, base, corpus, run_a):
    out, log = tmp_path / "b", tmp_path / "b.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, *map(str, args(base, corpus, out))], cwd=ROOT, stdout=f,
                                stderr=subprocess.DEVNULL, env={**os.environ, **ENV})
    deadline = time.monotonic() + 300
    while "step 6/" not in log.read_text():  # past the step-4 checkpoint, before the step-8 one
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    r = run_script(*args(base, corpus, out, "--resume", "true"), env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    resumed_at = int(r.stdout.split("at step ")[1].split()[0])
    assert 4 <= resumed_at < max(losses(log.read_text()))
    expected = {s: v for s, v in losses(run_a[0].stdout).items() if s > resumed_at}
    assert losses(r.stdout) == pytest.approx(expected, abs=1e-5)
    a, b = load_model(run_a[1] / "step-000012"), load_model(out / "step-000012")
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(pb, pa, rtol=1e-5, atol=1e-6, msg=name)


def test_two_sharded_processes_start_from_the_base(tmp_path, base, corpus):
    """--devices 2 (FSDP over two CPU processes) from a bfloat16 copy of the base (each block is cast
    to float32 as it is sharded): rank 0's first loss is that model's on its windows (micro-batches
    0 and 2 of rank 0: windows 0 and 2, with one window per micro-batch)."""
    out, bf16 = tmp_path / "out", tmp_path / "bf16"
    save_checkpoint(bf16, load_model(base).to(torch.bfloat16), base)
    r = run_script(*args(bf16, corpus, out, "--devices", "2", "--micro_batch_size", "1", "--global_batch_size", "4",
                         "--max_iters", "2", "--save_interval", "2", "--eval_interval", "2",
                         script="pretrain/redpajama.py"), env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    assert losses(r.stdout)[1] == pytest.approx(base_loss(bf16, corpus, [0, 2]), abs=2e-4)
    assert load_config(out / "step-000002") == load_config(base)
    assert load_model(out / "step-000002").transformer.wte.weight.dtype == torch.float32


def test_data_of_another_tokenizer_one_line_nothing_written(tmp_path, base, corpus, other_tokenizer):
    """The same model with another tokenizer than the one the data was prepared with, as a user runs it."""
    other = tmp_path / "other"
    save_checkpoint(other, load_model(base), other_tokenizer)
    r = run_script(*args(other, corpus, tmp_path / "out"), env=ENV)
    assert "was written with another tokenizer than" in _one_error_line(r)
    assert not (tmp_path / "out").exists()


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "pretrain" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("case, expected", [
    ("no_tokenizer", "missing tokenizer.json or tokenizer.model"),
    ("model_name", "exclude each other"),
    ("tokenizer_dir", "holds another tokenizer than --initial_checkpoint_dir"),
    ("block_size", "--block_size 65 does not fit"),
])
def test_bad_input_in_process(tmp_path, base, corpus, other_tokenizer, capsys, case, expected):
    """The other checks, through the scripts' run_cli in this process: all come before any work."""
    ckpt = base
    if case == "no_tokenizer":
        ckpt = tmp_path / "notok"
        save_checkpoint(ckpt, load_model(base))
    script = "redpajama" if case in ("model_name", "tokenizer_dir") else "continued"
    a = [str(x) for x in args(ckpt, corpus, tmp_path / "out")[1:]]
    a += {"model_name": ["--model_name", "tiny"], "tokenizer_dir": ["--tokenizer_dir", str(other_tokenizer)],
          "block_size": ["--block_size", "65"]}.get(case, [])
    with pytest.raises(SystemExit) as e:
        run_cli(load_script(script).main, a)
    assert e.value.code == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], errors
    assert not (tmp_path / "out").exists()
