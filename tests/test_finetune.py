import json
import shutil

import pytest
import torch

from conftest import ROOT, run_script
from lit_llama.io.checkpoint import load_model, save_checkpoint
from lit_llama.data.instruction import IGNORE_INDEX, InstructionBatches, collate
from lit_llama.model import Config, LLaMA
from lit_llama.tokenizer import Tokenizer

WORDS = ["apple", "river", "stone", "cloud", "green", "piano", "tiger", "lemon"]
# Stanford Alpaca's template, written out here independently of lit_llama/templates.py
ALPACA = ("Below is an instruction that describes a task. Write a response that appropriately completes "
          "the request.\n\n### Instruction:\n{}\n\n### Response:\n")


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, default_checkpoint):
    """A tiny random model with the embedded model's tokenizer."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ft") / "tiny"
    save_checkpoint(path, LLaMA(Config.from_name("tiny", vocab_size=49152)), tokenizer_dir=default_checkpoint)
    return path


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    recs = [{"instruction": f"Repeat the word {w}.", "input": "", "output": f"{w} {w} {w}"} for w in WORDS * 4]
    path = tmp_path_factory.mktemp("raw") / "data.json"
    path.write_text(json.dumps(recs))
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, tiny_ckpt, data_file):
    out = tmp_path_factory.mktemp("prepared") / "data"
    r = run_script("scripts/prepare_alpaca.py", "--checkpoint_dir", tiny_ckpt, "--data_file_path", data_file,
                   "--destination_path", out, "--mask_inputs", "true", "--val_fraction", "0.125")
    assert r.returncode == 0, r.stderr
    return out


def test_prepare_masks_the_prompt(data_dir, tiny_ckpt):
    tok = Tokenizer(tiny_ckpt)
    train = torch.load(data_dir / "train.pt", weights_only=True)
    assert len(train) == 28 and json.loads((data_dir / "meta.json").read_text())["n_val"] == 4
    for ex in train:
        text = tok.decode(ex["input_ids"])
        word = text.rsplit("### Response:\n", 1)[1].split()[0]
        prompt_len = len(tok.encode(ALPACA.format(f"Repeat the word {word}.")))
        assert text == ALPACA.format(f"Repeat the word {word}.") + f"{word} {word} {word}" + "<|im_end|>"
        assert (ex["labels"][:prompt_len] == IGNORE_INDEX).all()
        assert torch.equal(ex["labels"][prompt_len:], ex["input_ids"][prompt_len:])


def test_unmasked_and_dolly_fields(tmp_path, tiny_ckpt):
    recs = [{"instruction": "Say hi.", "context": "to Bob", "response": "Hi Bob"}] * 3
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    r = run_script("scripts/prepare_dolly.py", "--checkpoint_dir", tiny_ckpt, "--data_file_path", tmp_path / "d.jsonl",
                   "--destination_path", tmp_path / "out", "--val_fraction", "0")
    assert r.returncode == 0, r.stderr
    ex = torch.load(tmp_path / "out" / "train.pt", weights_only=True)[0]
    assert torch.equal(ex["labels"], ex["input_ids"])
    assert "### Input:\nto Bob\n\n### Response:\nHi Bob" in Tokenizer(tiny_ckpt).decode(ex["input_ids"])


def test_batches_are_deterministic_and_cover_each_epoch():
    examples = [{"input_ids": torch.tensor([i, i, i]), "labels": torch.tensor([i, i, i])} for i in range(10)]
    batches = InstructionBatches(examples, micro_batch_size=5, seed=3)
    seen = torch.cat([batches(s)[0][:, 0] for s in range(2)])
    assert sorted(seen.tolist()) == list(range(10))  # one epoch = every example once
    assert torch.equal(batches(7)[0], InstructionBatches(examples, 5, seed=3)(7)[0])
    x, y = collate([examples[0], {"input_ids": torch.tensor([1, 2]), "labels": torch.tensor([1, 2])}])
    assert y.tolist() == [[0, 0], [2, IGNORE_INDEX]] and x.tolist() == [[0, 0], [1, 2]]


METHOD_FLAGS = {"full": [], "adapter": ["--adapter_start_layer", "1"], "adapter_v2": ["--adapter_start_layer", "1"],
                "lora": ["--lora_r", "4"]}


def _run(method, ckpt, data_dir, out_dir, *extra):
    return run_script(f"finetune/{method}.py", "--checkpoint_dir", ckpt, "--data_dir", data_dir, "--out_dir", out_dir,
                      "--max_iters", "4", "--global_batch_size", "4", "--micro_batch_size", "2", "--learning_rate",
                      "1e-2", "--warmup_iters", "1", "--eval_interval", "100", "--save_interval", "2",
                      *METHOD_FLAGS[method], *extra)


def _full(ckpt, data_dir, out_dir, *extra):
    return _run("full", ckpt, data_dir, out_dir, *extra)


def _losses(stdout):
    return [float(line.split("loss ")[1].split()[0]) for line in stdout.splitlines() if line.startswith("step ") and "/" in line.split()[1]]


@pytest.mark.parametrize("method", list(METHOD_FLAGS))
def test_finetune_lowers_loss_and_resumes_exactly(tmp_path, tiny_ckpt, data_dir, method):
    a = _run(method, tiny_ckpt, data_dir, tmp_path / "a")
    assert a.returncode == 0, a.stderr
    losses = _losses(a.stdout)
    assert len(losses) == 4
    if method in ("full", "lora"):  # adapters start from a zero gate: too slow to show in 4 steps
        assert losses[-1] < losses[0]  # (test_adapter.py shows their loss falling on a fixed batch)
    # stop after step 2: keep only that checkpoint, resume, and compare with the uninterrupted run
    shutil.copytree(tmp_path / "a", tmp_path / "b", ignore=shutil.ignore_patterns("step-000004.ckpt", "final", "lit_*"))
    b = _run(method, tiny_ckpt, data_dir, tmp_path / "b", "--resume", "true")
    assert b.returncode == 0, b.stderr
    assert "resumed from" in b.stdout and "at step 2" in b.stdout
    assert _losses(b.stdout) == pytest.approx(losses[2:], abs=1e-4)
    sa = torch.load(tmp_path / "a" / "step-000004.ckpt", weights_only=True)
    sb = torch.load(tmp_path / "b" / "step-000004.ckpt", weights_only=True)
    assert sa["step"] == sb["step"] == 4
    assert sa["model"].keys() == sb["model"].keys() and len(sa["model"]) > 0
    for k, v in sa["model"].items():
        torch.testing.assert_close(sb["model"][k], v, rtol=1e-5, atol=1e-6)
    ea, eb = sa["optimizer"]["state"], sb["optimizer"]["state"]
    for i in ea:
        torch.testing.assert_close(eb[i]["exp_avg_sq"], ea[i]["exp_avg_sq"], rtol=1e-5, atol=1e-9)
    if method == "full":
        final = load_model(tmp_path / "a" / "final")
        assert torch.equal(final.transformer.h[0].attn.c_attn.weight, sa["model"]["transformer.h.0.attn.c_attn.weight"])
    else:  # only the trainable weights are saved, and the generate/ script answers with them
        trainable = sa["model"].keys()
        assert all(("lora_" in k or "adapter" in k or "gating" in k or "rms" in k or "ln_f" in k) for k in trainable)
        path_flag = {"lora": "--lora_path"}.get(method, "--adapter_path")
        g = run_script(f"generate/{method}.py", "--checkpoint_dir", tiny_ckpt, path_flag, tmp_path / "a",
                       "--prompt", "Repeat the word apple.", "--max_new_tokens", "3")
        assert g.returncode == 0 and "tokens/s" in g.stderr, g.stderr


def test_full_finetune_sharded_on_two_processes(tmp_path, tiny_ckpt, data_dir):
    r = _full(tiny_ckpt, data_dir, tmp_path / "out", "--devices", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "out" / "step-000004.ckpt").is_dir()  # a sharded (distributed) checkpoint
    model = load_model(tmp_path / "out" / "final")  # loads in one process
    base = load_model(tiny_ckpt)
    assert not torch.equal(model.transformer.h[0].mlp.c_fc1.weight, base.transformer.h[0].mlp.c_fc1.weight)
    x = torch.randint(0, 49152, (1, 8))
    assert torch.isfinite(model(x)).all()


@pytest.mark.parametrize("script", ["full", "lora", "adapter", "adapter_v2"])
def test_help(script):
    r = run_script(f"finetune/{script}.py", "--help")
    assert r.returncode == 0 and "--checkpoint_dir" in r.stdout and "--max_iters" in r.stdout
    r = run_script(f"generate/{script}.py", "--help")
    assert r.returncode == 0 and "--checkpoint_dir" in r.stdout and "--temperature" in r.stdout


def _one_error_line(r):
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, r.stderr
    return errors[0]


@pytest.mark.parametrize("content, expected", [
    ("", "no records"), ("{oops", "not JSON"), ("[]", "no records"),
    ('[{"question": "a", "answer": "b"}]', "lacks the fields"),
])
def test_prepare_rejects_bad_data(tmp_path, tiny_ckpt, content, expected):
    (tmp_path / "d.json").write_text(content)
    r = run_script("scripts/prepare_alpaca.py", "--checkpoint_dir", tiny_ckpt, "--data_file_path", tmp_path / "d.json",
                   "--destination_path", tmp_path / "out")
    assert expected in _one_error_line(r)
    assert not (tmp_path / "out").exists()


def test_finetune_bad_input(tmp_path, tiny_ckpt, data_dir, default_checkpoint, data_file):
    # data prepared with another tokenizer: the tiny model gets a different tokenizer file
    other = tmp_path / "other"
    shutil.copytree(tiny_ckpt, other)
    tok = json.loads((other / "tokenizer.json").read_text())
    tok["added_tokens"][0]["content"] = "<|changed|>"
    (other / "tokenizer.json").write_text(json.dumps(tok))
    assert "another tokenizer" in _one_error_line(_full(other, data_dir, tmp_path / "o1"))
    # max_seq_length above the model's context (tiny: 256)
    long = tmp_path / "long"
    assert run_script("scripts/prepare_alpaca.py", "--checkpoint_dir", tiny_ckpt, "--data_file_path", data_file,
                      "--destination_path", long, "--max_seq_length", "1000").returncode == 0
    assert "context" in _one_error_line(_full(tiny_ckpt, long, tmp_path / "o2"))
    # batch sizes that do not divide
    assert "multiple" in _one_error_line(_full(tiny_ckpt, data_dir, tmp_path / "o3", "--global_batch_size", "5"))
    # resume from a folder with no checkpoint
    (tmp_path / "o4").mkdir()
    assert "no step-" in _one_error_line(_full(tiny_ckpt, data_dir, tmp_path / "o4", "--resume", "true"))
    assert list((tmp_path / "o4").iterdir()) == []
    for d in ("o1", "o2", "o3"):
        assert not (tmp_path / d).exists() or not any((tmp_path / d).iterdir())
