import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, run_script
from lit_llama.io.checkpoint import load_model
import test_packed_dataset
from test_packed_dataset import _one_error_line, make_documents, write_corpus

# the session fixtures of the dataset tests: the same small tokenizers
small_tokenizer, other_tokenizer = test_packed_dataset.small_tokenizer, test_packed_dataset.other_tokenizer

# one thread per process: the test machine has two cores, and oversubscribed threads crawl
ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, small_tokenizer):
    tmp = tmp_path_factory.mktemp("corpus")
    src = write_corpus(tmp / "src", make_documents(300, seed=5))
    r = run_script("scripts/prepare_text_files.py", "--source_path", src, "--checkpoint_dir", small_tokenizer,
                   "--destination_path", tmp / "data", "--block_size", "16", "--blocks_per_shard", "16",
                   "--val_fraction", "0.1", "--num_workers", "2")
    assert r.returncode == 0, r.stderr
    return tmp / "data"


def train_args(corpus, tok, out, *extra, script="pretrain/tiny.py"):
    return [script, "--train_data_dir", corpus / "train", "--val_data_dir", corpus / "val", "--tokenizer_dir", tok,
            "--out_dir", out, "--model_name", "tiny", "--block_size", "16", "--max_iters", "12", "--save_interval", "4",
            "--eval_interval", "4", "--eval_iters", "2", "--micro_batch_size", "2", "--global_batch_size", "4",
            "--learning_rate", "1e-2", "--warmup_iters", "2", "--log_interval", "1", *extra]


def losses(stdout):
    return {int(line.split()[1].split("/")[0]): float(line.split("loss ")[1].split()[0])
            for line in stdout.splitlines() if line.startswith("step ") and "/" in line.split()[1]}


@pytest.fixture(scope="module")
def run_a(tmp_path_factory, corpus, small_tokenizer):
    """An uninterrupted 12-step run, checkpoints every 4 steps."""
    out = tmp_path_factory.mktemp("a") / "out"
    r = run_script(*train_args(corpus, small_tokenizer, out), env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    return r, out


def test_tiny_script_loss_falls_then_samples(tmp_path):
    """pretrain/tiny.py as a user runs it: learns a tokenizer from pydoc's topics, packs them, trains."""
    r = subprocess.run([sys.executable, str(ROOT / "pretrain" / "tiny.py"), "--max_iters", "40", "--eval_interval",
                        "40", "--save_interval", "40", "--warmup_iters", "5", "--log_interval", "1"],
                       cwd=tmp_path, capture_output=True, text=True, env={**os.environ, **ENV}, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    loss = losses(r.stdout)
    assert len(loss) == 40 and loss[40] < loss[1] - 0.8, loss  # from ln(1024) = 6.93 at the start
    assert "val loss" in r.stdout and "sample: 'The " in r.stdout
    assert (tmp_path / "out" / "tiny" / "step-000040" / "lit_model.safetensors").is_file()
    assert (tmp_path / "data" / "pydoc" / "packed" / "val").is_dir()


def test_checkpoints_and_logs(run_a):
    r, out = run_a
    loss = losses(r.stdout)
    assert sorted(loss) == list(range(1, 13)) and loss[12] < loss[1] - 1.0
    assert r.stdout.count("val loss") == 3 and "tokens/s" in r.stdout and "ETA" in r.stdout
    # keep_last 2: the newest two training states and model folders
    assert sorted(p.name for p in out.glob("step-*")) == ["step-000008", "step-000008.ckpt", "step-000012",
                                                          "step-000012.ckpt"]
    state = torch.load(out / "step-000012.ckpt", weights_only=True)
    model = load_model(out / "step-000012")
    assert torch.equal(model.transformer.h[1].mlp.c_proj.weight, state["model"]["transformer.h.1.mlp.c_proj.weight"])
    import csv

    with open(out / "logs" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows if r["loss"]] == list(range(1, 13))
    assert [int(r["step"]) for r in rows if r["val_loss"]] == [4, 8, 12]
    assert any((out / "tensorboard" / "version_0").glob("events.out.tfevents.*"))


def test_sigkill_between_checkpoints_then_resume_is_exact(tmp_path, corpus, small_tokenizer, run_a):
    out, log = tmp_path / "b", tmp_path / "b.log"
    cmd = [sys.executable, *map(str, train_args(corpus, small_tokenizer, out))]
    with open(log, "w") as f:  # a file, not a pipe: all that was printed can be read after the kill
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.DEVNULL, env={**os.environ, **ENV})
    deadline = time.monotonic() + 300
    while "step 6/" not in log.read_text():  # past the step-4 checkpoint, before the step-8 one
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    last_step = max(losses(log.read_text()))
    # whatever was on disk at the kill is whole: every training state and model folder loads
    for state in out.glob("step-*.ckpt"):
        assert torch.load(state, weights_only=True)["step"] == int(state.stem.split("-")[1])
    for folder in (p for p in out.glob("step-*") if p.is_dir()):
        load_model(folder)
    # leftovers of a kill during a save: they carry no final name and the resume clears them
    (out / "step-000012.ckpt.tmp").write_bytes(b"half")
    (out / ".step-000012.tmp-x").mkdir()
    r = run_script(*train_args(corpus, small_tokenizer, out, "--resume", "true"), env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    resumed_at = int(r.stdout.split("at step ")[1].split()[0])
    assert resumed_at < last_step  # work since the last checkpoint was lost, and is redone
    expected = {s: v for s, v in losses(run_a[0].stdout).items() if s > resumed_at}
    assert losses(r.stdout) == pytest.approx(expected, abs=1e-5)
    assert not list(out.glob("*.tmp")) and not list(out.glob(".step-*"))
    a, b = load_model(run_a[1] / "step-000012"), load_model(out / "step-000012")
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(pb, pa, rtol=1e-5, atol=1e-6, msg=name)


def test_flops_per_token_and_device_peaks(monkeypatch):
    from lit_llama.model import Config, LLaMA
    from lit_llama.train.loop import flops_per_token, peak_flops
    from lit_llama.utils import format_duration

    config = Config.from_name("tiny-gqa", vocab_size=512)
    weights = sum(p.numel() for p in LLaMA(config).parameters() if p.dim() == 2)  # the (tied) embedding once
    assert flops_per_token(config, 0) == 6 * weights  # 2 per multiply-add, forward + twice that backward
    assert flops_per_token(config, 100) - flops_per_token(config, 0) == 12 * 2 * 64 * 100  # attention
    assert peak_flops(torch.device("cpu"), "bf16-mixed") is None
    for name, precision, peak in [("NVIDIA H100 80GB HBM3", "bf16-mixed", 989e12),
                                  ("NVIDIA H100 PCIe", "bf16-true", 756e12),
                                  ("NVIDIA A100-SXM4-80GB", "32-true", 19.5e12), ("Tesla T4", "16-mixed", None)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, n=name: n)
        assert peak_flops(torch.device("cuda"), precision) == peak
    assert format_duration(90061) == "1d 01:01:01" and format_duration(59) == "00:00:59"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_sharded_processes_then_two_nodes(tmp_path, corpus, small_tokenizer):
    """--devices 2: FSDP over two CPU processes (with activation checkpointing) writes a sharded
    training state and a model folder generate.py loads; then the same script, resumed on two
    'nodes' started by `fabric run` and `torchrun`, continues it."""
    out = tmp_path / "out"
    args = train_args(corpus, small_tokenizer, out, "--max_iters", "4", "--save_interval", "2", "--eval_interval", "2",
                      "--eval_iters", "1", "--micro_batch_size", "1", "--activation_checkpointing", "true",
                      "--num_workers", "1", script="pretrain/redpajama.py")
    r = run_script(*args, "--devices", "2", env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 process(es)" in r.stdout and (out / "step-000004.ckpt").is_dir()  # one shard file per rank
    g = run_script("generate.py", "--checkpoint_dir", out / "step-000004", "--prompt", "the", "--max_new_tokens", "5",
                   env=ENV)
    assert g.returncode == 0 and "tokens/s" in g.stderr, g.stderr
    # node 0 started by `fabric run`, node 1 by `torchrun` (which `fabric run` calls): either launcher works
    port = str(free_port())
    launchers = [[sys.executable, "-m", "lightning.fabric.cli", "--accelerator", "cpu", "--devices", "1",
                  "--num-nodes", "2", "--node-rank", "0", "--main-address", "127.0.0.1", "--main-port", port],
                 [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--nnodes", "2",
                  "--node-rank", "1", "--master-addr", "127.0.0.1", "--master-port", port]]
    nodes = [subprocess.Popen([*launcher, *map(str, args), "--max_iters", "6", "--resume", "true"], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **ENV})
             for launcher in launchers]
    results = [n.communicate(timeout=300) for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], results[0][1][-3000:] + results[1][1][-3000:]
    assert "at step 4" in results[0][0] and "step 6/6" in results[0][0]
    assert torch.isfinite(load_model(out / "step-000006")(torch.tensor([[1, 2, 3]]))).all()


@pytest.mark.parametrize("case, expected", [
    ("tokenizer", "another tokenizer"),
    ("block_size", "does not fit model tiny"),
    ("empty", "holds no .bin shards"),
    ("exists", "already holds training checkpoints"),
    ("corrupt", "cannot resume from"),
])
def test_pretrain_rejects_bad_input(tmp_path, corpus, small_tokenizer, other_tokenizer, run_a, case, expected):
    tok, out, extra = small_tokenizer, tmp_path / "out", []
    if case == "tokenizer":
        tok = other_tokenizer
    elif case == "block_size":
        extra = ["--block_size", "1000"]
    elif case == "empty":
        (tmp_path / "empty").mkdir()
        corpus = tmp_path / "empty"
        (corpus / "train").mkdir()
    elif case in ("exists", "corrupt"):
        shutil.copytree(run_a[1], out)
        if case == "corrupt":
            data = (out / "step-000012.ckpt").read_bytes()
            (out / "step-000012.ckpt").write_bytes(data[: len(data) // 2])
            extra = ["--resume", "true"]
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    r = run_script(*train_args(corpus, tok, out, *extra), env=ENV)
    assert expected in _one_error_line(r)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before  # nothing written or lost
