"""Speculative decoding (lit_llama/infer/speculative.py) in the batched engine: greedy output with drafts
equals plain greedy decoding (`generation.generate` alone), with prompt lookup and with a draft model,
eager and compiled; sampled output keeps the model's own distribution (against the probabilities of
a direct forward pass); the scripts' flags and their bad values."""

import json
from dataclasses import replace

import pytest
import torch
from scipy.stats import chisquare

from conftest import assert_same_greedy
from quant_helpers import assert_one_error_line, run_main
from lit_llama.infer.engine import Engine, Request, SamplingParams
from lit_llama.infer.generation import generate
from lit_llama.model import Config, LLaMA
from lit_llama.infer.speculative import DraftModel, PromptLookup, lookup

TEXT = ("The lighthouse keeper climbed the stairs every evening at six. He wound the clock, lit the lamp and "
        "wrote one line in the log: the weather, the ships he saw, and whether the gulls had come back.")


def test_lookup_copies_what_followed_the_latest_match():
    # the last 3 tokens (7 8 9) occurred at 1..3 and at 6..8 (latest): what followed the latest
    assert lookup([5, 7, 8, 9, 1, 7, 7, 8, 9, 2, 3, 7, 8, 9], 3) == [2, 3, 7]
    # no earlier 3-gram or 2-gram like the tail (4 5 6, 5 6): the 1-gram 6 at index 1
    assert lookup([1, 6, 2, 3, 4, 5, 6], 2) == [2, 3]
    # k tokens at most, fewer at the end of the sequence; nothing when the last token is new
    assert lookup([1, 2, 3, 1, 2], 5) == [3, 1, 2]
    assert lookup([1, 2, 3, 4], 5) == []
    assert lookup([4], 5) == []


@pytest.fixture(scope="module")
def model(default_checkpoint):
    from lit_llama.infer.load import load_for_inference

    _, m, tokenizer = load_for_inference(default_checkpoint, "32-true")
    return m, tokenizer


def rounded(m: LLaMA, bits: int = 3, group: int = 32) -> LLaMA:
    """The model with its blocks' matrices rounded to `bits` per weight (groups of `group`, min-max):
    a draft model with the same tokenizer whose guesses are often, not always, right. (Its first
    layers alone, or every other layer, guess almost nothing right on this small model.)"""
    state = {}
    for name, w in m.state_dict().items():
        if name.startswith("transformer.h.") and w.dim() == 2:
            g = w.reshape(-1, group)
            lo, hi = g.min(1, keepdim=True).values, g.max(1, keepdim=True).values
            scale = (hi - lo).clamp(min=1e-8) / (2 ** bits - 1)
            w = (((g - lo) / scale).round() * scale + lo).reshape(w.shape)
        state[name] = w
    small = LLaMA(m.config)
    small.load_state_dict(state)
    return small.eval()


@pytest.fixture(scope="module")
def prompts(model):
    from lit_llama.templates import ChatFormat, get_template

    _, tokenizer = model
    fmt = ChatFormat(get_template("checkpoint", tokenizer), tokenizer)
    questions = [f"Repeat the following text exactly:\n\n{TEXT}", "Name three colours.",
                 f"Summarize in one sentence: {TEXT}", "Write a haiku about the sea."]
    return [fmt.prompt_ids([{"role": "user", "content": q}]) for q in questions]


@pytest.mark.parametrize("drafter", ["prompt-lookup", "draft-model", "prompt-lookup-compiled"])
def test_greedy_with_drafts_equals_plain_greedy(model, prompts, drafter):
    m, tok = model
    n = 40
    alone = [list(generate(m, torch.tensor(p), n)) for p in prompts]
    m.clear_kv_cache()
    compiled = drafter.endswith("compiled")
    made = DraftModel(rounded(m)) if drafter == "draft-model" else PromptLookup()
    engine = Engine(m, tok, max_batch_size=2, max_seq_length=255 if compiled else 512, compile=compiled,
                    drafter=made, draft_tokens=4)
    requests = [Request(p, SamplingParams(max_new_tokens=n)) for p in prompts]
    for r in requests:  # arriving two steps apart, so rows join a batch that is mid-draft
        engine.submit(r)
        engine.step()
        engine.step()
    engine.run(requests)
    for p, want, r in zip(prompts, alone, requests):
        assert r.finish_reason == "length"
        assert_same_greedy(m, torch.tensor(p), want, r.tokens)
    s = engine.stats
    # the drafts did the work: guesses were accepted, so fewer steps than tokens
    assert s["accepted_draft_tokens"] > 0.15 * s["draft_tokens"] > 0, s
    assert s["decode_rows"] + s["accepted_draft_tokens"] == sum(len(r.tokens) - 1 for r in requests), s
    m.clear_kv_cache()


def tiny(seed: int, vocab: int = 8) -> LLaMA:
    torch.manual_seed(seed)
    m = LLaMA(Config(block_size=64, vocab_size=vocab, n_layer=2, n_head=2, n_embd=16, intermediate_size=32))
    with torch.no_grad():  # larger weights than the init's: peaked, different distributions per context
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.6)
    return m.eval()


@pytest.mark.parametrize("which", ["prompt-lookup", "draft-model"])
def test_sampling_with_drafts_keeps_the_model_distribution(which):
    m = tiny(0)
    prompt = [1, 2, 3, 1, 2, 4, 5, 1, 2]  # prompt lookup drafts what followed "1 2": "4 5 1"
    temperature, top_k, n = 1.0, 6, 6000
    # the exact distribution of the first three tokens, from direct forward passes
    with torch.no_grad():
        def probs(ids):
            logits = m(torch.tensor([ids]))[0, -1] / temperature
            kth = logits.topk(top_k).values[-1]
            return logits.masked_fill(logits < kth, float("-inf")).softmax(-1)

        joint = torch.stack([probs(prompt)[a] * probs(prompt + [a])[b] * probs(prompt + [a, b])
                             for a in range(8) for b in range(8)]).flatten()
    drafter = DraftModel(tiny(1)) if which == "draft-model" else PromptLookup()
    engine = Engine(m, None, max_batch_size=64, max_seq_length=32, max_waiting=n, drafter=drafter, draft_tokens=3)
    # the first token comes from the prefill; the second is a draft accepted or replaced, the third
    # the token after an accepted draft, or a plain one
    params = SamplingParams(max_new_tokens=3, temperature=temperature, top_k=top_k)
    requests = engine.run([Request(prompt, replace(params, seed=i)) for i in range(n)])
    counts = torch.zeros(512)
    for r in requests:
        counts[r.tokens[0] * 64 + r.tokens[1] * 8 + r.tokens[2]] += 1
    assert counts[joint == 0].sum() == 0  # never a token outside the top k
    expected = joint * n
    big = expected >= 5  # the chi-square test needs 5 or more expected per bin: pool the rest
    f_obs = torch.cat([counts[big], counts[~big].sum()[None]]).numpy()
    f_exp = torch.cat([expected[big], expected[~big].sum()[None]]).numpy()
    assert big.sum() > 20 and chisquare(f_obs, f_exp).pvalue > 1e-4, (f_obs, f_exp)
    s = engine.stats
    assert 0 < s["accepted_draft_tokens"] < s["draft_tokens"], s  # drafts both accepted and rejected


@pytest.fixture(scope="module")
def draft_checkpoint(tmp_path_factory, default_checkpoint, model):
    from lit_llama.io.checkpoint import save_checkpoint

    out = tmp_path_factory.mktemp("draft") / "draft"
    save_checkpoint(out, rounded(model[0]), tokenizer_dir=default_checkpoint)
    return out


def test_generate_with_drafts_prints_the_plain_answer(default_checkpoint, draft_checkpoint, monkeypatch, capsys):
    args = ["--prompt", f"Repeat the following text exactly:\n\n{TEXT}", "--chat", "true", "--temperature", "0",
            "--max_new_tokens", "48"]
    plain, _ = run_main("generate.py", args, monkeypatch, capsys, expect_exit=False)
    for extra in (["--prompt_lookup", "true"], ["--draft_checkpoint_dir", draft_checkpoint, "--draft_tokens", "3"]):
        out, err = run_main("generate.py", args + extra, monkeypatch, capsys, expect_exit=False)
        assert out == plain
        assert "draft tokens accepted" in err, err


def test_bad_draft_flags_are_one_clear_line(default_checkpoint, draft_checkpoint, tmp_path, monkeypatch, capsys):
    import shutil

    other = tmp_path / "other-tokenizer"
    shutil.copytree(draft_checkpoint, other)
    spec = json.loads((other / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = list(vocab)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # two tokens trade ids: another tokenizer
    (other / "tokenizer.json").write_text(json.dumps(spec))
    for script in ("generate.py", "chat.py"):
        code, err = run_main(script, ["--draft_checkpoint_dir", other], monkeypatch, capsys)
        assert_one_error_line(code, err, "another tokenizer")
    code, err = run_main("generate.py", ["--prompt_lookup", "true", "--draft_checkpoint_dir", draft_checkpoint],
                         monkeypatch, capsys)
    assert_one_error_line(code, err, "choose one drafter")
    code, err = run_main("serve.py", ["--draft_tokens", "0"], monkeypatch, capsys)
    assert_one_error_line(code, err, "--draft_tokens must be at least 1")
