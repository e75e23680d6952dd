"""DPO: answer log-probabilities against transformers' LlamaForCausalLM and a per-row loop, the
reference (LoRA bypassed) equal to the base model exactly, the loss against a hand computation,
training that raises the held-out margin, the LoRA file that generate/lora.py reads, exact resume,
and the script's --help and one-line errors."""

import copy
import json
import math
import shutil

import pytest
import torch

from conftest import run_script
from lit_llama.io.checkpoint import load_model
from lit_llama.io.convert import convert_hf_checkpoint
from lit_llama.align.dpo import dpo_loss, lora_disabled, make_dpo_loss, reference_logprobs, response_logprobs
from lit_llama.peft.lora import LoRAConfig, add_lora, load_lora
from lit_llama.align.preference import collate_pairs
from lit_llama.tokenizer import Tokenizer
from test_reward_model import HELD_OUT, STACKLLAMA, make_pairs, write_jsonl
from test_reward_model import tiny_ckpt  # noqa: F401 (a fixture)

BETA = 0.1


@pytest.fixture(scope="module")
def hf_and_ours(tmp_path_factory):
    """A random transformers LlamaForCausalLM and the same weights converted to our format."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from tokenizers import Tokenizer as HFTokenizer, models

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         rms_norm_eps=1e-5, tie_word_embeddings=False, attn_implementation="eager")
    hf = LlamaForCausalLM(config).float().eval()
    with torch.no_grad():  # larger weights than HF's init, so that positions and norms matter
        for name, p in hf.named_parameters():
            p.copy_(1 + 0.3 * torch.randn_like(p) if "norm" in name else 0.3 * torch.randn_like(p))
    root = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(root / "hf")
    HFTokenizer(models.WordLevel({f"t{i}": i for i in range(96)}, unk_token="t0")).save(str(root / "hf" / "tokenizer.json"))
    convert_hf_checkpoint(root / "hf", root / "lit")
    return hf, load_model(root / "lit").eval()


def _pairs():
    """(chosen, rejected, prompt_length) triples of different lengths, sharing their prompts."""
    g = torch.Generator().manual_seed(3)
    out = []
    for n_prompt, n_c, n_r in ((3, 4, 6), (5, 1, 2), (1, 7, 3)):
        prompt = torch.randint(0, 96, (n_prompt,), generator=g)
        out.append({"chosen": torch.cat([prompt, torch.randint(0, 96, (n_c,), generator=g)]),
                    "rejected": torch.cat([prompt, torch.randint(0, 96, (n_r,), generator=g)]),
                    "prompt_length": n_prompt})
    return out


def _loop_logprob(forward, ids: torch.Tensor, prompt_length: int) -> float:
    """Sum of log p(ids[t] | ids[:t]) over the answer positions t >= prompt_length, one row at a
    time with no padding, in float64."""
    with torch.no_grad():
        logp = torch.log_softmax(forward(ids[None])[0].double(), dim=-1)
    return sum(logp[t - 1, ids[t]].item() for t in range(max(prompt_length, 1), len(ids)))


def _with_random_lora(model, seed=1):
    model = add_lora(copy.deepcopy(model), LoRAConfig(r=4, dropout=0.0, query=True, value=True, mlp=True))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model


def test_logprobs_match_transformers_and_a_loop(hf_and_ours):
    hf, ours = hf_and_ours
    pairs = _pairs()
    batch = collate_pairs(pairs, pad_id=5)
    rows = [(p["chosen"], p["prompt_length"]) for p in pairs] + [(p["rejected"], p["prompt_length"]) for p in pairs]
    hf_ref = torch.tensor(dtype=torch.float64, data=[_loop_logprob(lambda x: hf(x).logits, ids, n) for ids, n in rows])
    with torch.no_grad():
        base = response_logprobs(ours, batch)
    torch.testing.assert_close(base.double(), hf_ref, rtol=1e-4, atol=1e-4)
    # the policy (LoRA on) against the same loop over our model; the reference against the base, exactly
    policy_model = _with_random_lora(ours)
    with torch.no_grad():
        policy = response_logprobs(policy_model, batch)
    loop = torch.tensor(dtype=torch.float64, data=[_loop_logprob(policy_model, ids, n) for ids, n in rows])
    torch.testing.assert_close(policy.double(), loop, rtol=1e-4, atol=1e-4)
    assert (policy - base).abs().max() > 1e-2  # the LoRA does change the answers' probabilities
    ref = reference_logprobs(policy_model, batch)
    assert torch.equal(ref, base)
    # the context restores the LoRA branch
    with torch.no_grad():
        assert torch.equal(response_logprobs(policy_model, batch), policy)


def test_reference_logits_equal_the_base_exactly(hf_and_ours):
    _, ours = hf_and_ours
    model = _with_random_lora(ours)
    x = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = ours(x)
        with lora_disabled(model):
            assert torch.equal(model(x), base)
        assert not torch.allclose(model(x), base)


def test_dpo_loss_equals_hand_computation(hf_and_ours):
    _, ours = hf_and_ours
    model = _with_random_lora(ours).train()
    pairs = _pairs()
    batch = collate_pairs(pairs, pad_id=0)
    loss, metrics = make_dpo_loss(BETA)(model, batch)
    logp = lambda m, ids, n: _loop_logprob(m, ids, n)  # noqa: E731
    hand, margins = 0.0, []
    for p in pairs:
        n = p["prompt_length"]
        ratio_c = logp(model, p["chosen"], n) - logp(ours, p["chosen"], n)
        ratio_r = logp(model, p["rejected"], n) - logp(ours, p["rejected"], n)
        z = BETA * (ratio_c - ratio_r)
        margins.append(z)
        hand += -math.log(1 / (1 + math.exp(-z))) / len(pairs)
    assert loss.item() == pytest.approx(hand, rel=1e-4, abs=1e-6)
    assert metrics["margin"].item() == pytest.approx(sum(margins) / len(margins), rel=1e-4, abs=1e-6)
    assert metrics["accuracy"].item() == pytest.approx(sum(m > 0 for m in margins) / len(margins))
    # gradients reach the LoRA weights only; the reference pass (no grad) contributes none
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)
    # zero LoRA: policy == reference, every margin 0 and the loss log 2
    zero = add_lora(copy.deepcopy(ours), LoRAConfig(r=4))
    loss0, m0 = make_dpo_loss(BETA)(zero, batch)
    assert loss0.item() == pytest.approx(math.log(2), abs=1e-6) and m0["margin"].item() == 0


def test_dpo_loss_formula_on_numbers():
    policy = torch.tensor([-3.0, -10.0, -4.0, -9.0])  # chosen, chosen, rejected, rejected
    ref = torch.tensor([-3.5, -10.0, -3.0, -9.5])
    loss, m = dpo_loss(policy, ref, beta=0.5)
    z = [0.5 * ((-3.0 + 3.5) - (-4.0 + 3.0)), 0.5 * ((-10.0 + 10.0) - (-9.0 + 9.5))]
    assert loss.item() == pytest.approx(sum(math.log(1 + math.exp(-v)) for v in z) / 2, rel=1e-6)
    assert m["accuracy"].item() == 0.5 and m["margin"].item() == pytest.approx(sum(z) / 2)


# ---------------------------------------------------------------- training end to end


def _dpo(ckpt, data, out, *extra):
    return run_script("finetune/dpo.py", "--checkpoint_dir", ckpt, "--data_dir", data, "--out_dir", out,
                      "--max_iters", "24", "--micro_batch_size", "8", "--global_batch_size", "8", "--learning_rate",
                      "1e-2", "--warmup_iters", "3", "--eval_interval", "12", "--eval_iters", "2", "--save_interval",
                      "12", "--lora_r", "4", "--lora_dropout", "0", *extra)


@pytest.fixture(scope="module")
def prefs_dir(tmp_path_factory, tiny_ckpt):  # noqa: F811
    root = tmp_path_factory.mktemp("dpo-prefs")
    r = run_script("scripts/prepare_preferences.py", "--data_file_path", write_jsonl(root / "p.jsonl", make_pairs(96)),
                   "--checkpoint_dir", tiny_ckpt, "--destination_path", root / "data", "--max_seq_length", "64",
                   "--val_fraction", "0.17")
    assert r.returncode == 0, r.stderr
    return root / "data"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_ckpt, prefs_dir):  # noqa: F811
    out = tmp_path_factory.mktemp("dpo-run") / "out"
    r = _dpo(tiny_ckpt, prefs_dir, out)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r.stdout


def _held_out_margins(model, base, tok, rows):
    margins = []
    for r in rows:
        prompt = STACKLLAMA.format(r["question"])
        n = len(tok.encode(prompt.rstrip(" ")))
        c, j = (tok.encode(prompt + r[k], eos=True) for k in ("response_j", "response_k"))
        margins.append(BETA * ((_loop_logprob(model, c, n) - _loop_logprob(base, c, n))
                               - (_loop_logprob(model, j, n) - _loop_logprob(base, j, n))))
    return torch.tensor(margins)


def test_dpo_raises_the_held_out_margin(trained, tiny_ckpt):  # noqa: F811
    out, stdout = trained
    val_lines = [l for l in stdout.splitlines() if ": val loss" in l]
    assert len(val_lines) == 2 and all("val margin" in l and "val accuracy" in l for l in val_lines), stdout
    base = load_model(tiny_ckpt).eval()
    policy = load_lora(load_model(tiny_ckpt), out / "lit_lora.safetensors").eval()
    tok = Tokenizer(tiny_ckpt)
    rows = make_pairs(24, HELD_OUT, seed=7)
    before = _held_out_margins(add_lora(load_model(tiny_ckpt), LoRAConfig(r=4)).eval(), base, tok, rows)
    after = _held_out_margins(policy, base, tok, rows)
    print(f"held-out DPO margin {before.mean():.4f} -> {after.mean():.4f}, accuracy {(after > 0).float().mean():.3f}")
    assert before.abs().max() == 0  # LoRA starts at zero: the policy is the reference
    assert after.mean() > 0.05 and (after > 0).float().mean() >= 0.8
    # the existing LoRA generation script runs the result
    g = run_script("generate/lora.py", "--checkpoint_dir", tiny_ckpt, "--lora_path", out, "--prompt", "Describe gold.",
                   "--max_new_tokens", "3")
    assert g.returncode == 0 and "tokens/s" in g.stderr, g.stderr


def test_dpo_resumes_exactly(tmp_path, trained, tiny_ckpt, prefs_dir):  # noqa: F811
    out, stdout = trained
    shutil.copytree(out, tmp_path / "b", ignore=shutil.ignore_patterns("step-000024.ckpt", "lit_*"))
    r = _dpo(tiny_ckpt, prefs_dir, tmp_path / "b", "--resume", "true")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "at step 12" in r.stdout
    losses = lambda s: [l.split(" | ")[1] for l in s.splitlines() if l.startswith("step ") and "/" in l.split()[1]]  # noqa: E731
    assert losses(r.stdout) == losses(stdout)[12:]
    a = torch.load(out / "step-000024.ckpt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "step-000024.ckpt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all("lora_" in k for k in a)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)


def _one_error_line(r):
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    return lines[0]


def test_dpo_bad_input(tmp_path, tiny_ckpt, prefs_dir):  # noqa: F811
    assert "--beta must be positive" in _one_error_line(_dpo(tiny_ckpt, prefs_dir, tmp_path / "o1", "--beta", "0"))
    (tmp_path / "instr").mkdir()
    for f in ("train.pt", "val.pt"):
        (tmp_path / "instr" / f).write_bytes((prefs_dir / f).read_bytes())
    (tmp_path / "instr" / "meta.json").write_text(json.dumps({"tokenizer": "x", "max_seq_length": 8}))
    assert "no preference pairs" in _one_error_line(_dpo(tiny_ckpt, tmp_path / "instr", tmp_path / "o2"))
    assert "multiple" in _one_error_line(_dpo(tiny_ckpt, prefs_dir, tmp_path / "o3", "--global_batch_size", "5"))
    assert not any((tmp_path / d).exists() for d in ("o1", "o2", "o3"))


def test_help():
    r = run_script("finetune/dpo.py", "--help")
    assert r.returncode == 0 and "--beta" in r.stdout and "--checkpoint_dir" in r.stdout, r.stderr
