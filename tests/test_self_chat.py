"""Baize's self-chat (scripts/self_chat.py, lit_llama/align/self_chat.py) and self-distillation
(scripts/self_distill.py): dialogues from the embedded model, post-processing on handcrafted
transcripts, resuming, bad input; the best-scored answer is the one kept."""

import importlib.util
import json
import os

import pytest
import torch

from conftest import ROOT, run_script
from lit_llama.templates import get_template
from lit_llama.align.self_chat import (Deduplicator, best_of, degenerate_reason, read_jsonl_resume, read_seeds,
                                      rejected_path, review, run_self_chat, run_self_distill)
from lit_llama.data.chat import AI, HUMAN, Turn, clean_dialogue, parse_transcript, strip_tags
from lit_llama.utils import UserError

ENV = {"OMP_NUM_THREADS": "1"}


def _one_error_line(r):
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, r.stderr
    return errors[0]


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------- the embedded model


@pytest.fixture(scope="module")
def self_chat_run(default_checkpoint, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("selfchat")
    (tmp / "seeds.txt").write_text("Is the sun a star?\n\n  \nWhat is the capital of France?\n")
    out = tmp / "dialogues.jsonl"
    r = run_script("scripts/self_chat.py", "--seeds_file", tmp / "seeds.txt", "--output_path", out, "--max_turns", "2",
                   "--max_new_tokens", "24", "--seed_as_question", "true", env=ENV)
    assert r.returncode == 0, r.stderr
    return tmp, out, r


def test_embedded_model_self_chats_in_baize_format(self_chat_run):
    tmp, out, r = self_chat_run
    kept = _lines(out)
    rejected = _lines(rejected_path(out)) if rejected_path(out).exists() else []
    # every seed is accounted for once: kept, or rejected with a reason and its raw transcript
    assert sorted(x["seed"] for x in kept + rejected) == ["Is the sun a star?", "What is the capital of France?"]
    assert all(x["rejected"] and HUMAN in x["transcript"] for x in rejected)
    assert kept, (r.stderr, rejected)
    for x in kept:
        d = x["dialogue"]
        assert 2 <= len(d) <= 4 and len(d) % 2 == 0 and x["exchanges"] == len(d) // 2
        assert [m["role"] for m in d] == ["user", "assistant"] * (len(d) // 2)
        assert d[0]["content"] == x["seed"]  # --seed_as_question
        for m in d:
            assert m["content"].strip() == m["content"] and m["content"]
            assert "[|" not in m["content"] and "|]" not in m["content"]
        assert x["text"] == get_template("baize").render(d, add_generation_prompt=False)
        assert x["text"].endswith("[|Human|]Hello!\n[|AI|]Hi!\n" + "".join(
            f"{HUMAN if m['role'] == 'user' else AI}{m['content']}\n" for m in d))
    assert "[2/2]" in r.stderr and "tokens/s" in r.stderr and "ETA" in r.stderr


def test_rerun_skips_done_seeds(self_chat_run, default_checkpoint):
    tmp, out, _ = self_chat_run
    before = out.read_text()
    r = run_script("scripts/self_chat.py", "--seeds_file", tmp / "seeds.txt", "--output_path", out, "--max_turns", "2",
                   "--max_new_tokens", "24", "--seed_as_question", "true", env=ENV)
    assert r.returncode == 0, r.stderr
    assert "2 of 2 seeds already done" in r.stderr and out.read_text() == before


# ---------------------------------------------------------------- post-processing


def test_incomplete_last_turn_is_dropped_and_tags_stripped():
    text = f"{HUMAN} What is tea?\n{AI} A drink made from leaves.\n{HUMAN} Is it hot?\n{AI} Usually it is served ho"
    turns = parse_transcript(text)  # a transcript that may have been cut: its last turn is incomplete
    assert [t.complete for t in turns] == [True, True, True, False]
    assert clean_dialogue(turns) == [{"role": "user", "content": "What is tea?"},
                                     {"role": "assistant", "content": "A drink made from leaves."}]  # and the unanswered question
    assert len(clean_dialogue(parse_transcript(text, complete=True))) == 4
    # collect.py's own tags; text before the first tag is ignored
    assert clean_dialogue(parse_transcript("intro [Human] Hi\n[AI] Hello\n", complete=True)) == [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    # a turn cut at max_new_tokens ends the dialogue there, whatever follows
    turns = [Turn("user", "Q1"), Turn("assistant", "A1"), Turn("user", "Q2"), Turn("assistant", "A2 cut", False)]
    assert [m["content"] for m in clean_dialogue(turns)] == ["Q1", "A1"]
    # leftover tags and a tag's unfinished beginning are stripped; a speaker's doubled turn is merged
    assert strip_tags(f"Sure {AI} thing [|Hu") == "Sure thing"
    merged = clean_dialogue([Turn("user", "Q"), Turn("assistant", "A"), Turn("assistant", f"B {HUMAN}")])
    assert merged == [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A\nB"}]


@pytest.mark.parametrize("contents, reason", [
    (["What is tea?"], "fewer than 1 complete exchange"),
    (["What is tea?", "   "], "an empty turn"),
    (["What is tea?", "A drink.", "What is tea?", "Leaves."], "a turn repeated verbatim"),
    (["Hello!", "Tea is a drink."], "a turn repeated verbatim"),  # copies the instruction's example
    (["What is tea?", "Tea is a drink made from leaves. Tea is a drink made from leaves."], "a sentence repeated"),
    (["What is tea?", "the cup of the tea the cup of the tea the cup of the tea the cup"], "mostly repeated"),
    (["Basil?", "I think it might be a bit too hot, I'd recommend indoor gardening.", "Why?",
      "I think it's a bit too hot, I'd recommend indoor gardening."], "nearly repeating"),
    (["What is tea?", "Tea is a drink made from the leaves of the tea plant, served hot or iced.",
      "Is it healthy?", "In moderation, tea is a healthy drink for most people."], None),
])
def test_degenerate_dialogues(contents, reason):
    dialogue = [{"role": "user" if i % 2 == 0 else "assistant", "content": c} for i, c in enumerate(contents)]
    got = degenerate_reason(dialogue)
    assert (got is None) if reason is None else (got is not None and reason in got), got


def test_duplicates_are_filtered():
    dedup = Deduplicator()
    first = [Turn("user", "What is tea?"), Turn("assistant", "A drink.")]
    assert review(first, dedup)[1] is None
    assert review([Turn("user", "what is TEA"), Turn("assistant", "Leaves in water.")], dedup)[1] == \
        "a duplicate first question"  # normalised: case and punctuation
    assert review([Turn("user", "What is tea ?"), Turn("assistant", "A drink")], dedup)[1] == "a duplicate dialogue"
    assert review([Turn("user", "What is coffee?"), Turn("assistant", "A drink.")], dedup)[1] is None


# ---------------------------------------------------------------- resuming


class FakeChat:
    """Stands in for SelfChat: a fixed dialogue per seed, and a record of the seeds it was asked for."""

    def __init__(self):
        self.asked, self.tokens = [], 0

    def dialogue(self, seed, max_turns, seed_as_question=False):
        self.asked.append(seed)
        self.tokens += 10
        if seed.startswith("bad"):
            return [Turn("user", seed), Turn("assistant", "", False)], f"{HUMAN} {seed}\n{AI}"
        return [Turn("user", f"Tell me about {seed}."), Turn("assistant", f"{seed} is a thing.")], "raw"


def test_resume_skips_done_seeds_and_drops_a_truncated_line(tmp_path):
    out = tmp_path / "d.jsonl"
    fake = FakeChat()
    counts = run_self_chat(fake, ["tea", "bad one", "coffee"], out)
    assert counts == {"kept": 2, "rejected": 1, "skipped": 0}
    assert [x["seed"] for x in _lines(out)] == ["tea", "coffee"]
    assert _lines(rejected_path(out))[0]["rejected"] == "fewer than 1 complete exchange"
    with open(out, "a") as f:  # a kill in the middle of writing a line
        f.write('{"seed": "milk", "dialogue": [{"role": "us')
    fake = FakeChat()
    counts = run_self_chat(fake, ["tea", "bad one", "coffee", "milk", "juice"], out)
    assert fake.asked == ["milk", "juice"] and counts["skipped"] == 3
    assert [x["seed"] for x in _lines(out)] == ["tea", "coffee", "milk", "juice"]  # every line whole JSON
    # a kept dialogue from before still counts for the duplicate filter
    fake = FakeChat()
    run_self_chat(fake, ["TEA!"], out)
    assert _lines(rejected_path(out))[-1] == {"seed": "TEA!", "rejected": "a duplicate dialogue",
                                              "transcript": "raw"}
    # a damaged line in the middle is not silently dropped
    out.write_text('{"seed": "a"}\nnot json\n{"seed": "b"}\n')
    with pytest.raises(UserError, match="line 2"):
        read_jsonl_resume(out)


def test_seeds_files(tmp_path):
    (tmp_path / "s.json").write_text(json.dumps([{"question": "Q1"}, "Q2", {"question": "Q1"}, {"question": " "}]))
    assert read_seeds(tmp_path / "s.json") == ["Q1", "Q2"]
    (tmp_path / "s.jsonl").write_text('{"title": "T1", "question": "x"}\n\n{"title": "T2"}\n')
    assert read_seeds(tmp_path / "s.jsonl", "title") == ["T1", "T2"]
    with pytest.raises(UserError, match="no string field 'title'"):
        (tmp_path / "t.jsonl").write_text('{"question": "x"}\n')
        read_seeds(tmp_path / "t.jsonl", "title")


@pytest.mark.parametrize("content, expected", [(None, "does not exist"), ("", "is empty"),
                                               ("\n  \n\t\n", "holds no seeds"), ("[]", "is empty")])
def test_bad_seeds_are_one_line_errors_and_write_nothing(tmp_path, content, expected):
    seeds = tmp_path / ("seeds.json" if content == "[]" else "seeds.txt")
    if content is not None:
        seeds.write_text(content)
    out = tmp_path / "out" / "d.jsonl"
    r = run_script("scripts/self_chat.py", "--seeds_file", seeds, "--output_path", out, env=ENV)
    assert expected in _one_error_line(r)
    assert not (tmp_path / "out").exists()
    if content != "\n  \n\t\n":
        return
    # an existing output is left as it was
    out.parent.mkdir()
    out.write_text('{"seed": "kept"}\n')
    r = run_script("scripts/self_chat.py", "--seeds_file", seeds, "--output_path", out, env=ENV)
    assert expected in _one_error_line(r) and out.read_text() == '{"seed": "kept"}\n'
    assert not rejected_path(out).exists()


# ---------------------------------------------------------------- self-distillation


def test_best_of_is_the_argmax():
    assert best_of(["a", "b", "c"], torch.tensor([0.1, 2.0, -1.0])) == (1, 2.0)
    assert best_of(["a", "b"], [3.0, 3.0])[0] == 0
    with pytest.raises(ValueError):
        best_of(["a"], [1.0, 2.0])


def test_self_distill_keeps_the_best_scored_sample(tmp_path):
    answers = {"Q1": ["short", "a much longer answer", "", "mid one"], "Q2": ["x", "yy"], "Q3": ["", " "]}

    def sample(messages):
        return list(answers[messages[-1]["content"]]), 7

    def score(messages, samples):  # a fake reward: longer is better, the empty one would win if not excluded
        return torch.tensor([len(s) if s else 100.0 for s in samples])

    out = tmp_path / "best.jsonl"
    counts = run_self_distill(["Q1", "Q2", "Q3"], out, sample, score, keep_samples=True)
    assert counts == {"kept": 2, "empty": 1, "skipped": 0}
    rows = _lines(out)
    assert [r["output"] for r in rows] == ["a much longer answer", "yy"]
    assert rows[0]["dialogue"] == [{"role": "user", "content": "Q1"},
                                   {"role": "assistant", "content": "a much longer answer"}]
    assert rows[0]["score"] == 20.0 and [s["score"] for s in rows[0]["samples"]] == [5.0, 20.0, 100.0, 7.0]
    counts = run_self_distill(["Q1", "Q2", "Q4"], out, lambda m: (["z"], 1), lambda m, s: [0.0])
    assert counts["skipped"] == 2 and _lines(out)[-1]["prompt"] == "Q4"
    # what prepare_chat.py reads
    from lit_llama.data.chat import read_dialogues

    assert read_dialogues(out)[0] == rows[0]["dialogue"]


def test_self_distill_on_the_embedded_model_with_an_injected_scorer(default_checkpoint, tmp_path):
    spec = importlib.util.spec_from_file_location("self_distill_script", ROOT / "scripts" / "self_distill.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    scored = []

    def scorer(texts):  # reward: the number of words in the text
        scored.append(list(texts))
        return torch.tensor([float(len(t.split())) for t in texts])

    out = tmp_path / "best.jsonl"
    torch.set_num_threads(1)
    counts = script.run(["Name a color."], out, default_checkpoint, None, None, None, None, "stackllama", 3, 12, 1.0,
                        50, 1.0, 1234, True, None, scorer=scorer)
    assert counts["kept"] == 1
    row = _lines(out)[0]
    texts = scored[0]
    assert len(texts) == 3 and all(t.startswith("Question: Name a color.\n\nAnswer: ") for t in texts)
    best = max(range(3), key=lambda i: (len(texts[i].split()), -i))
    assert row["output"] == row["samples"][best]["text"] and texts[best].endswith(row["output"])


def test_self_distill_cli(tmp_path):
    r = run_script("scripts/self_distill.py", "--help")
    assert r.returncode == 0 and "--reward_path" in r.stdout and "--num_samples" in r.stdout
    (tmp_path / "p.txt").write_text("Q\n")
    r = run_script("scripts/self_distill.py", "--prompts_file", tmp_path / "p.txt", "--reward_path", tmp_path / "nope",
                   "--output_path", tmp_path / "o.jsonl")
    assert "does not exist" in _one_error_line(r) and not (tmp_path / "o.jsonl").exists()
    r = run_script("scripts/self_chat.py", "--help")
    assert r.returncode == 0 and "--seeds_file" in r.stdout and "--max_turns" in r.stdout


def test_self_distill_cli_with_a_reward_model(tmp_path, default_checkpoint):
    """The whole script with lit_llama/align/reward.py's model (random weights on a tiny base): every sample
    is scored by score(), and the kept answer is the best one."""
    from lit_llama.io.checkpoint import save_checkpoint
    from lit_llama.peft.lora import LoRAConfig
    from lit_llama.model import Config, LLaMA
    from lit_llama.align.reward import build_reward_model, load_reward_model, save_reward_model, score
    from lit_llama.tokenizer import Tokenizer

    torch.manual_seed(0)
    tiny = tmp_path / "tiny"
    save_checkpoint(tiny, LLaMA(Config.from_name("tiny", vocab_size=49152)), tokenizer_dir=default_checkpoint)
    reward = build_reward_model(LLaMA(Config.from_name("tiny", vocab_size=49152)), LoRAConfig())
    torch.nn.init.normal_(reward.head.weight, std=1.0)
    save_reward_model(reward, tmp_path / "reward", base_dir=tiny)
    (tmp_path / "p.jsonl").write_text(json.dumps({"question": "Name a color."}) + "\n")
    out = tmp_path / "best.jsonl"
    r = run_script("scripts/self_distill.py", "--prompts_file", tmp_path / "p.jsonl", "--reward_path",
                   tmp_path / "reward", "--checkpoint_dir", tiny, "--output_path", out, "--num_samples", "3",
                   "--max_new_tokens", "6", "--temperature", "1.5", "--keep_samples", "true", env=ENV)
    assert r.returncode == 0, r.stderr
    row = _lines(out)[0]
    texts = [f"Question: Name a color.\n\nAnswer: {s['text']}" for s in row["samples"]]
    expected = score(load_reward_model(tiny, tmp_path / "reward"), Tokenizer(tiny), texts)
    assert [s["score"] for s in row["samples"]] == pytest.approx(expected.tolist(), abs=1e-4)
    nonempty = [i for i, s in enumerate(row["samples"]) if s["text"]]
    best = max(nonempty, key=lambda i: expected[i])
    assert row["output"] == row["samples"][best]["text"] and row["score"] == pytest.approx(float(expected[best]), abs=1e-4)
    assert "[1/1] prompts" in r.stderr and "tokens/s" in r.stderr
