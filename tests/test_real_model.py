"""The embedded SmolLM2-135M-Instruct model end to end, against transformers reading the same GGUF.

transformers dequantizes the original Q4_1 GGUF file with its own loader (config, tensor names,
q/k un-permutation, tied output) and runs its own LlamaForCausalLM and tokenizer, so it is an
independent reference for our converted checkpoint, tokenizer, chat template and generation.
Then generate.py as a user runs it: one answer, and one clear line for each kind of bad input."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import run_script
from lit_llama.io.checkpoint import load_model
from lit_llama.infer.generation import generate
from lit_llama.tokenizer import Tokenizer

QUESTION = "What is the capital of France?"
# 20-30 tokens of prose, with digits, punctuation and a non-ASCII letter
PROMPT = "The Eiffel Tower, completed in 1889 for the World's Fair, is a wrought-iron tower in Paris, désigné"
TEXTS = [
    PROMPT,
    "Hello, world!",
    "  two leading spaces\n\nand blank lines\tand a tab",
    "Numbers: 3.14159, 2024-01-01 and 1,000,000.",
    "café 東京 naïve — “quotes” 🙂",
    "def f(x):\n    return x ** 2  # comment",
    "<|im_start|>user\nhi<|im_end|>",  # special tokens in text are matched whole, as in transformers
]


@pytest.fixture(scope="module")
def hf_model(default_gguf):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(default_gguf.parent, gguf_file=default_gguf.name,
                                                dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf_tokenizer(default_gguf):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_gguf.parent, gguf_file=default_gguf.name)


@pytest.fixture(scope="module")
def model(default_checkpoint):
    return load_model(default_checkpoint).eval()


@pytest.fixture(scope="module")
def tokenizer(default_checkpoint):
    return Tokenizer(default_checkpoint)


def chat_prompt(tokenizer) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}])


# ---------------------------------------------------------------- against transformers


@torch.no_grad()
def test_logits_match_transformers(model, hf_model, hf_tokenizer):
    ids = torch.tensor([hf_tokenizer.encode(PROMPT)])
    assert 20 <= ids.size(1) <= 30, ids.size(1)
    assert model.config.vocab_size == hf_model.config.vocab_size
    expected = hf_model(ids).logits
    # logits reach ~40; the same weights in another summation order differ by ~1e-5, a wrong
    # rotary layout, GQA grouping, norm or tied output by whole units
    torch.testing.assert_close(model(ids), expected, rtol=1e-4, atol=1e-3)


def test_tokenizer_matches_transformers(tokenizer, hf_tokenizer):
    # SmolLM2 splits digits one by one; transformers' GGUF tokenizer does the same, so digits are included
    for text in TEXTS:
        expected = hf_tokenizer.encode(text)
        assert tokenizer.encode(text).tolist() == expected, text
        assert tokenizer.decode(expected) == hf_tokenizer.decode(expected) == text, text
    assert tokenizer.eos_id == hf_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.stop_ids == [tokenizer.eos_id]


def test_chat_template_matches_transformers(tokenizer, hf_tokenizer):
    conversations = [
        [{"role": "user", "content": QUESTION}],
        [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": QUESTION},
         {"role": "assistant", "content": "Paris"}, {"role": "user", "content": "And of Italy?"}],
    ]
    for messages in conversations:
        expected = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert tokenizer.apply_chat_template(messages) == expected
        assert tokenizer.encode(expected).tolist() == hf_tokenizer.encode(expected)


def test_greedy_generation_matches_transformers(model, tokenizer, hf_model, hf_tokenizer):
    prompt = tokenizer.encode(chat_prompt(tokenizer))
    ours = list(generate(model, prompt, 20, temperature=0.0, stop_ids=tokenizer.stop_ids))
    answer = tokenizer.decode(ours)
    assert "Paris" in answer, answer
    with torch.no_grad():
        ref = hf_model.generate(prompt[None], max_new_tokens=20, do_sample=False,
                                eos_token_id=tokenizer.stop_ids, pad_token_id=tokenizer.eos_id)[0, prompt.numel():].tolist()
    # transformers keeps the stop token; ours ends before it
    if ref and ref[-1] in tokenizer.stop_ids:
        ref = ref[:-1]
    assert ours == ref, (answer, hf_tokenizer.decode(ref))


# ---------------------------------------------------------------- generate.py


def checkpoint_copy(src: Path, dst: Path, skip=()) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        if f.name not in skip:
            (dst / f.name).symlink_to(f)
    return dst


def short_context(src: Path, tmp: Path) -> Path:
    d = checkpoint_copy(src, tmp / "short", skip=("lit_config.json",))
    config = json.loads((src / "lit_config.json").read_text())
    (d / "lit_config.json").write_text(json.dumps({**config, "block_size": 8}))
    return d


def truncated_weights(src: Path, tmp: Path) -> Path:
    d = checkpoint_copy(src, tmp / "truncated", skip=("lit_model.safetensors",))
    with open(src / "lit_model.safetensors", "rb") as f_in, open(d / "lit_model.safetensors", "wb") as f_out:
        n = (src / "lit_model.safetensors").stat().st_size // 2
        while n > 0:
            chunk = f_in.read(min(n, 16 << 20))
            f_out.write(chunk)
            n -= len(chunk)
    return d


def incomplete(src: Path, tmp: Path) -> Path:
    d = tmp / "incomplete"
    d.mkdir()
    shutil.copyfile(src / "lit_config.json", d / "lit_config.json")
    return d


ANSWER_ARGS = ["--prompt", QUESTION, "--chat", "true", "--temperature", "0", "--max_new_tokens", "20"]
# name: (generate.py arguments given (checkpoint dir, tmp dir), words the error line must contain)
BAD_INPUTS = {
    "max_new_tokens-0": (lambda ck, tmp: ["--max_new_tokens", "0"], ["--max_new_tokens", "0"]),
    "bogus-precision": (lambda ck, tmp: ["--precision", "12-bogus"], ["precision", "12-bogus"]),
    "missing-checkpoint": (lambda ck, tmp: ["--checkpoint_dir", "/nonexistent"], ["/nonexistent", "does not exist"]),
    "incomplete-checkpoint": (lambda ck, tmp: ["--checkpoint_dir", incomplete(ck, tmp)],
                              ["incomplete", "lit_model.safetensors", "tokenizer"]),
    "prompt-longer-than-context": (lambda ck, tmp: ["--checkpoint_dir", short_context(ck, tmp), "--prompt", "word " * 40],
                                   ["prompt", "context", "8"]),
    "truncated-weights": (lambda ck, tmp: ["--checkpoint_dir", truncated_weights(ck, tmp)],
                          ["lit_model.safetensors", "truncated"]),
}


@pytest.fixture(scope="module", autouse=True)
def generate_runs(request, default_checkpoint, tmp_path_factory):
    """The selected tests' generate.py runs, started in the background when the module starts,
    two at a time: each spends seconds importing and loading on one core while the tests above
    load transformers' model on another. {name: future of CompletedProcess}."""
    from concurrent.futures import ThreadPoolExecutor

    selected = set()
    for item in request.session.items:
        if item.module is request.module and item.originalname == "test_generate_script_answers":
            selected.add("answer")
        elif item.module is request.module and item.originalname == "test_generate_script_rejects_bad_input":
            selected.add(item.callspec.params["case"])
    tmp = tmp_path_factory.mktemp("generate")
    runs = {"answer": ANSWER_ARGS} if "answer" in selected else {}
    for name, (make_args, _) in BAD_INPUTS.items():
        if name in selected:
            runs[name] = ["--temperature", "0", "--max_new_tokens", "5", *make_args(default_checkpoint, tmp)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        yield {name: pool.submit(run_script, "generate.py", *args, timeout=300) for name, args in runs.items()}


def test_generate_script_answers(generate_runs):
    r = generate_runs["answer"].result()
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout, r.stdout
    assert "tokens/s" in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_generate_script_rejects_bad_input(case, generate_runs):
    r = generate_runs[case].result()
    assert r.returncode != 0, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for w in BAD_INPUTS[case][1]:
        assert w in lines[0], lines[0]
