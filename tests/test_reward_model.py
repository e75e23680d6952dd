"""Preference data and the reward model: preparation (forms, masking lengths, truncation, bad rows),
the head reading the last real token, the pairwise loss against a hand computation, training that
learns a property of the chosen answers and generalises to held-out pairs, the weights file and the
`load_reward_model` / `score` API, and the scripts' --help and one-line errors."""

import json
import math
import random
import shutil

import pytest
import torch

from conftest import run_script
from lit_llama.io.checkpoint import CheckpointError, save_checkpoint
from lit_llama.peft.lora import LoRAConfig
from lit_llama.model import Config, LLaMA
from lit_llama.align.preference import collate_pairs, encode_pair, read_preference_file
from lit_llama.align.reward import (REWARD_FILE, build_reward_model, load_reward_model, pairwise_loss,
                              save_reward_model, score)
from lit_llama.tokenizer import Tokenizer

WORDS = ("apple river stone cloud green piano tiger lemon house chair table water light night music paper bread "
         "dream horse smile").split()
# filler words never seen in training: the held-out pairs test the property, not memorised pairs
HELD_OUT = "garden window silver rabbit candle forest orange winter pencil castle".split()
MARK = "gold"  # every chosen answer has it, no rejected one does
# StackLLaMA's template, written out here independently of lit_llama/align/preference.py
STACKLLAMA = "Question: {}\n\nAnswer: "


def make_pairs(n: int, words=WORDS, seed: int = 0) -> list:
    """StackExchange-paired rows whose better answer (response_j) contains MARK where the worse one
    has a filler word: same length, same other words, so only the property separates them."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        ws = rng.sample(words, 4)
        pos = rng.randrange(5)
        rows.append({"question": f"Describe {rng.choice(words)}.",
                     "response_j": " ".join(ws[:pos] + [MARK] + ws[pos:]),
                     "response_k": " ".join(ws[:pos] + [rng.choice(words)] + ws[pos:])})
    return rows


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, default_checkpoint):
    """A tiny random model with the embedded model's tokenizer."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("rm") / "tiny"
    save_checkpoint(path, LLaMA(Config.from_name("tiny", vocab_size=49152)), tokenizer_dir=default_checkpoint)
    return path


@pytest.fixture(scope="module")
def prefs_dir(tmp_path_factory, tiny_ckpt):
    root = tmp_path_factory.mktemp("prefs")
    r = run_script("scripts/prepare_preferences.py", "--data_file_path", write_jsonl(root / "p.jsonl", make_pairs(160)),
                   "--checkpoint_dir", tiny_ckpt, "--destination_path", root / "data", "--max_seq_length", "64",
                   "--val_fraction", "0.2")
    assert r.returncode == 0, r.stderr
    return root / "data"


# ---------------------------------------------------------------- preparation


def test_prepare_stackexchange_rows(prefs_dir, tiny_ckpt):
    tok = Tokenizer(tiny_ckpt)
    meta = json.loads((prefs_dir / "meta.json").read_text())
    train = torch.load(prefs_dir / "train.pt", weights_only=True)
    val = torch.load(prefs_dir / "val.pt", weights_only=True)
    assert (meta["n_train"], meta["n_val"], len(train), len(val)) == (128, 32, 128, 32)
    eos = tok.decode(torch.tensor([tok.eos_id]))
    for ex in train[:20]:
        chosen, rejected = tok.decode(ex["chosen"]), tok.decode(ex["rejected"])
        question = chosen.split("\n\n")[0][len("Question: "):]
        prompt = STACKLLAMA.format(question)
        assert chosen.startswith(prompt) and rejected.startswith(prompt)
        assert chosen.endswith(eos) and rejected.endswith(eos)
        assert MARK in chosen[len(prompt):] and MARK not in rejected[len(prompt):]
        n = ex["prompt_length"]
        # the prompt part decodes to the prompt up to its trailing space (which BPE merges into the answer)
        assert tok.decode(ex["chosen"][:n]) == prompt.rstrip(" ")
        assert torch.equal(ex["chosen"][:n], ex["rejected"][:n])
        assert n == len(tok.encode(prompt.rstrip(" ")))


def test_prompt_rows_hh_rows_and_truncation(tmp_path, tiny_ckpt):
    rows = [{"prompt": "Say hi. ", "chosen": "hi there", "rejected": "go away"},
            {"chosen": "\n\nHuman: hello\n\nAssistant: hi friend", "rejected": "\n\nHuman: hello\n\nAssistant: no"}]
    read = read_preference_file(write_jsonl(tmp_path / "r.jsonl", rows))
    assert read[0] == rows[0]
    assert read[1] == {"prompt": "\n\nHuman: hello\n\nAssistant:", "chosen": " hi friend", "rejected": " no"}
    tok = Tokenizer(tiny_ckpt)
    long_prompt = {"prompt": " ".join(WORDS * 3) + "\n", "chosen": " ".join(WORDS), "rejected": "no"}
    pair = encode_pair(tok, long_prompt, max_seq_length=32)
    assert max(len(pair["chosen"]), len(pair["rejected"])) <= 32
    # the prompt lost its start (kept at half the length), the answers their end
    assert pair["prompt_length"] == 16
    assert tok.decode(pair["chosen"][:16]) == tok.decode(tok.encode(long_prompt["prompt"])[-16:])
    assert tok.decode(pair["rejected"][16:]) == "no" + tok.decode(torch.tensor([tok.eos_id]))
    assert len(pair["chosen"]) == 32


def _one_error_line(r):
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    return errors[0]


@pytest.mark.parametrize("content, expected", [
    ("", "holds no records"),
    ("[]", "holds no records"),
    ('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{oops', "line 2 is not JSON"),
    ('{"question": "q", "response_j": "a", "response_k": "b"}\n{"question": "q", "response_j": "a"}', "row 1 lacks"),
    ('[{"prompt": "p", "chosen": "same", "rejected": "x"}, {"prompt": "p", "chosen": "same", "rejected": "same"}]',
     "row 1 has identical chosen and rejected"),
])
def test_prepare_rejects_bad_rows(tmp_path, tiny_ckpt, content, expected):
    (tmp_path / "d.jsonl").write_text(content)
    r = run_script("scripts/prepare_preferences.py", "--data_file_path", tmp_path / "d.jsonl",
                   "--checkpoint_dir", tiny_ckpt, "--destination_path", tmp_path / "out")
    line = _one_error_line(r)
    assert expected in line and str(tmp_path / "d.jsonl") in line
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["d.jsonl"]  # no temporary folder left either


# ---------------------------------------------------------------- the model and the loss


def _tiny_reward_model(seed=0, name="tiny"):
    torch.manual_seed(seed)
    model = build_reward_model(LLaMA(Config.from_name(name)), LoRAConfig(r=4, dropout=0.0))
    with torch.no_grad():  # B = 0 would hide the LoRA branch
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    return model.eval()


@torch.no_grad()
def test_reward_reads_the_last_real_token():
    model = _tiny_reward_model()
    rows = [torch.randint(0, 500, (n,), generator=torch.Generator().manual_seed(n)) for n in (7, 12, 3)]
    # independently: the final-norm output of the model's own forward pass, caught by a hook
    caught = []
    hook = model.model.transformer.ln_f.register_forward_hook(lambda m, i, o: caught.append(o))
    expected = []
    for r in rows:
        model.model(r[None])
        expected.append(caught.pop()[0, -1] @ model.head.weight[0] + model.head.bias[0])
    hook.remove()
    batch = collate_pairs([{"chosen": rows[0], "rejected": rows[1], "prompt_length": 1},
                           {"chosen": rows[2], "rejected": rows[1], "prompt_length": 1}], pad_id=7)
    got = model(batch["input_ids"], batch["lengths"])
    torch.testing.assert_close(got, torch.stack([expected[0], expected[2], expected[1], expected[1]]))
    # padding with another id changes nothing
    batch["input_ids"][batch["input_ids"] == 7] = 99
    torch.testing.assert_close(model(batch["input_ids"], batch["lengths"]), got)


def test_pairwise_loss_equals_hand_computation():
    rewards = torch.tensor([1.5, -0.3, 0.2, 2.0, 0.1, 0.2], requires_grad=True)
    loss, metrics = pairwise_loss(rewards)
    diffs = [1.5 - 2.0, -0.3 - 0.1, 0.2 - 0.2]
    hand = sum(math.log(1 + math.exp(-d)) for d in diffs) / 3  # -log sigmoid(d)
    assert loss.item() == pytest.approx(hand, rel=1e-6)
    assert metrics["accuracy"].item() == 0.0 and metrics["margin"].item() == pytest.approx(sum(diffs) / 3)
    loss.backward()
    # d(-log sigmoid(d))/d r_c = -sigmoid(-d) / B
    assert rewards.grad[0].item() == pytest.approx(-1 / (1 + math.exp(diffs[0])) / 3, rel=1e-5)


def test_only_lora_and_head_train_and_file_round_trips(tmp_path, tiny_ckpt):
    from lit_llama.io.checkpoint import load_model

    model = build_reward_model(load_model(tiny_ckpt), LoRAConfig(r=4))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or n.startswith("head.") for n in trainable)
    assert {"head.weight", "head.bias"} <= set(trainable)
    with torch.no_grad():
        model.head.bias.fill_(0.25)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    path = save_reward_model(model, tmp_path / "rm", base_dir=tiny_ckpt)
    assert path == tmp_path / "rm" / REWARD_FILE
    loaded = load_reward_model(tiny_ckpt, tmp_path / "rm", device="cpu")
    tok = Tokenizer(tiny_ckpt)
    texts = ["Question: a?\n\nAnswer: b", "Question: a longer question?\n\nAnswer: gold"]
    got = score(loaded, tok, texts)
    assert got.shape == (2,) and got.dtype == torch.float32
    model.eval()
    with torch.no_grad():
        for t, s in zip(texts, got):
            ids = tok.encode(t, eos=True)[None]
            assert s.item() == pytest.approx(model(ids).item(), abs=1e-5)


def test_reward_file_for_another_base_is_refused(tmp_path, tiny_ckpt, default_checkpoint):
    model = build_reward_model(LLaMA(Config.from_name("tiny", vocab_size=49152)), LoRAConfig(r=4))
    save_reward_model(model, tmp_path / "rm", base_dir=tiny_ckpt)
    other = tmp_path / "other"
    save_checkpoint(other, LLaMA(Config.from_name("tiny", vocab_size=49152, n_layer=3)), tokenizer_dir=default_checkpoint)
    with pytest.raises(CheckpointError, match="was trained on base tiny .*, not tiny"):
        load_reward_model(other, tmp_path / "rm")
    r = run_script("-m", "lit_llama.align.reward", "--checkpoint_dir", other, "--reward_path", tmp_path / "rm",
                   "--text", "Question: hi\n\nAnswer: there")
    line = _one_error_line(r)
    assert "was trained on base tiny (2 layers" in line and "not tiny (3 layers" in line
    assert r.stdout == ""


# ---------------------------------------------------------------- training end to end


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_ckpt, prefs_dir):
    out = tmp_path_factory.mktemp("rm-run") / "out"
    r = run_script("finetune/reward_model.py", "--checkpoint_dir", tiny_ckpt, "--data_dir", prefs_dir, "--out_dir", out,
                   "--max_iters", "24", "--micro_batch_size", "8", "--global_batch_size", "8", "--learning_rate", "1e-2",
                   "--warmup_iters", "3", "--eval_interval", "12", "--eval_iters", "4", "--save_interval", "12",
                   "--lora_r", "4", "--lora_dropout", "0")
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r.stdout


def test_reward_model_ranks_held_out_pairs(trained, tiny_ckpt):
    out, stdout = trained
    val_lines = [l for l in stdout.splitlines() if ": val loss" in l]
    assert len(val_lines) == 2 and all("val accuracy" in l for l in val_lines), stdout
    final = [l for l in stdout.splitlines() if l.startswith("final validation")]
    assert final and float(final[0].split("accuracy ")[1].split(",")[0]) >= 0.9
    rm = load_reward_model(tiny_ckpt, out / REWARD_FILE)
    tok = Tokenizer(tiny_ckpt)
    held_out = make_pairs(40, HELD_OUT, seed=123)
    chosen = score(rm, tok, [STACKLLAMA.format(r["question"]) + r["response_j"] for r in held_out])
    rejected = score(rm, tok, [STACKLLAMA.format(r["question"]) + r["response_k"] for r in held_out])
    accuracy = (chosen > rejected).float().mean().item()
    print(f"held-out reward accuracy {accuracy:.3f}, mean margin {(chosen - rejected).mean():.3f}")
    assert accuracy >= 0.9


def test_reward_training_resumes_exactly(tmp_path, trained, tiny_ckpt, prefs_dir):
    out, stdout = trained
    shutil.copytree(out, tmp_path / "b", ignore=shutil.ignore_patterns("step-000024.ckpt", "lit_*"))
    r = run_script("finetune/reward_model.py", "--checkpoint_dir", tiny_ckpt, "--data_dir", prefs_dir,
                   "--out_dir", tmp_path / "b", "--max_iters", "24", "--micro_batch_size", "8", "--global_batch_size",
                   "8", "--learning_rate", "1e-2", "--warmup_iters", "3", "--eval_interval", "12", "--eval_iters", "4",
                   "--save_interval", "12", "--lora_r", "4", "--lora_dropout", "0", "--resume", "true")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "at step 12" in r.stdout
    a = torch.load(out / "step-000024.ckpt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "step-000024.ckpt", weights_only=True)["model"]
    assert a.keys() == b.keys() and "head.weight" in a
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("args", [["scripts/prepare_preferences.py"], ["finetune/reward_model.py"],
                                  ["-m", "lit_llama.align.reward"]])
def test_help(args):
    r = run_script(*args, "--help")
    assert r.returncode == 0 and "--checkpoint_dir" in r.stdout, r.stderr
