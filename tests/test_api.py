"""The Python API (lit_llama/api.py) and `python -m lit_llama`: greedy text and chat answers against
transformers reading the embedded GGUF itself (its own model, tokenizer and chat template), LoRA
weights loaded through the API against a recomputation without a cache, sampling with a seed against
generate.py's output, stop strings, bad input, and the command dispatcher."""

import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, assert_same_greedy, run_script
from lit_llama import LLM
from lit_llama.io.checkpoint import CheckpointError, load_model, save_checkpoint
from lit_llama.model import Config, LLaMA
from lit_llama.peft.lora import LoRAConfig, add_lora, save_lora
from lit_llama.utils import UserError

TEXT = "The Eiffel Tower, completed in 1889 for the World's Fair, is a wrought-iron lattice tower in"
N = 24


@pytest.fixture(scope="module")
def llm(default_checkpoint):
    return LLM.load(default_checkpoint, precision="32-true")


@pytest.fixture(scope="module")
def hf(default_gguf):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(default_gguf.parent, gguf_file=default_gguf.name,
                                                 dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(default_gguf.parent, gguf_file=default_gguf.name)


def hf_greedy(model, ids, n, eos=None):
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=0)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), generation_config=config)[0, len(ids):].tolist()
    return out[:-1] if eos is not None and out and out[-1] == eos else out


def test_generate_equals_transformers_greedy(llm, hf, default_checkpoint):
    model, tok = hf
    ids = tok.encode(TEXT)
    assert llm.tokenizer.encode(TEXT).tolist() == ids
    want = hf_greedy(model, ids, N)
    got = llm.generate_ids(TEXT, max_new_tokens=N)
    assert_same_greedy(load_model(default_checkpoint).eval(), torch.tensor(ids), want, got)
    if got == want:
        assert llm.generate(TEXT, max_new_tokens=N) == tok.decode(want)
    # streaming gives the same text, in more than one piece
    pieces = list(llm.stream(TEXT, max_new_tokens=N))
    assert len(pieces) > 1 and "".join(pieces) == llm.generate(TEXT, max_new_tokens=N)


def test_chat_equals_transformers_with_the_ggufs_own_template(llm, hf):
    model, tok = hf
    messages = [{"role": "system", "content": "You are a geography teacher."},
                {"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert llm.chat_format.prompt_ids(messages) == list(ids)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    want = tok.decode(hf_greedy(model, list(ids), 40, eos=end))
    assert len(want) > 20
    assert llm.chat(messages, max_new_tokens=40) == want
    # the system= argument is the same conversation
    assert llm.chat(messages[1:], system=messages[0]["content"], max_new_tokens=40) == want


def test_stop_strings_end_the_text_before_them(llm):
    full = llm.generate(TEXT, max_new_tokens=N)
    word = full.split()[2]
    cut = llm.generate(TEXT, max_new_tokens=N, stop=[word])
    assert cut == full[: full.index(word)]


def test_sampling_with_a_seed_repeats_and_is_generate_pys(llm, default_checkpoint):
    kw = dict(max_new_tokens=12, temperature=0.8, top_k=200, seed=42)
    a, b = llm.generate("Hello, my name is", **kw), llm.generate("Hello, my name is", **kw)
    assert a == b
    assert llm.generate("Hello, my name is", **{**kw, "seed": 43}) != a
    r = run_script("generate.py", "--checkpoint_dir", default_checkpoint, "--prompt", "Hello, my name is",
                   "--max_new_tokens", "12", "--temperature", "0.8", "--top_k", "200", "--seed", "42",
                   "--precision", "32-true")
    assert r.returncode == 0, r.stderr
    assert r.stdout == a + "\n"


def test_session_remembers_the_conversation(llm):
    session = llm.session(temperature=0.0, max_new_tokens=30)
    first = "".join(session.respond("My name is Ada. Remember it."))
    second = "".join(session.respond("What is my name?"))
    assert [m["role"] for m in session.history] == ["user", "assistant", "user", "assistant"]
    assert session.history[1]["content"] == first
    # the second answer is the one-shot chat answer to the whole conversation
    assert second == llm.chat(session.history[:3], max_new_tokens=30)


@torch.no_grad()
def test_lora_weights_through_the_api_equal_a_recomputation_without_cache(tmp_path, default_checkpoint):
    torch.manual_seed(0)
    config = Config(name="tiny-smol", block_size=128, vocab_size=49152, n_layer=2, n_head=4, n_embd=64,
                    n_query_groups=2, intermediate_size=128, tie_embeddings=True)
    base = LLaMA(config)
    save_checkpoint(tmp_path / "base", base, tokenizer_dir=default_checkpoint)
    model = add_lora(base, LoRAConfig(r=4, alpha=8, dropout=0.0, mlp=True))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.normal_(0, 0.5)  # a trained-like update that changes the greedy tokens
    save_lora(model, tmp_path / "lora")
    model.eval()

    prompt = [1, 520, 3300, 42]
    ids = list(prompt)
    for _ in range(10):  # every step recomputes the whole sequence: no cache, no decode step
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    want = ids[len(prompt):]
    api = LLM.load(tmp_path / "base", lora_path=tmp_path / "lora", precision="32-true")
    assert api.generate_ids(prompt, max_new_tokens=10) == want
    plain = LLM.load(tmp_path / "base", precision="32-true")
    assert plain.generate_ids(prompt, max_new_tokens=10) != want  # the LoRA weights matter


def test_bad_input_is_a_clear_error(tmp_path, llm):
    with pytest.raises(CheckpointError, match="does not exist"):
        LLM.load(tmp_path / "nothing")
    with pytest.raises(UserError, match="temperature"):
        llm.generate("x", temperature=-1)
    with pytest.raises(UserError, match="one of"):
        LLM.load(tmp_path, lora_path=tmp_path / "a", adapter_path=tmp_path / "b")


# ---------------------------------------------------------------- python -m lit_llama


def test_module_dispatches_to_the_scripts(default_checkpoint, tmp_path):
    r = run_script("-m", "lit_llama", "--help")
    assert r.returncode == 0 and "finetune lora" in r.stdout and "convert_hf_checkpoint" in r.stdout
    for args, usage in [(["generate", "--help"], "usage: generate.py"),
                        (["generate", "lora", "--help"], "usage: lora.py"),
                        (["finetune", "lora", "--help"], "usage: lora.py"),
                        (["convert_hf_checkpoint", "--help"], "usage: convert_hf_checkpoint.py")]:
        r = run_script("-m", "lit_llama", *args)
        assert r.returncode == 0 and r.stdout.startswith(usage), (args, r.stdout[:200], r.stderr[-500:])
    # a real run: the same text as the script, from another directory
    flags = ["--checkpoint_dir", str(default_checkpoint), "--prompt", "Paris is", "--max_new_tokens", "8",
             "--temperature", "0"]
    import subprocess

    via_module = subprocess.run([sys.executable, "-m", "lit_llama", "generate", *flags], cwd=tmp_path,
                                capture_output=True, text=True)
    direct = run_script("generate.py", *flags)
    assert via_module.returncode == 0 and direct.returncode == 0, via_module.stderr
    assert via_module.stdout == direct.stdout and len(direct.stdout.strip()) > 0
    # the console script
    console = Path(sys.executable).parent / "lit-llama"
    r = subprocess.run([str(console), "chat", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("usage: chat.py")
    for bad in (["nosuch"], ["finetune", "nosuch"]):
        r = run_script("-m", "lit_llama", *bad)
        assert r.returncode == 1 and r.stderr.count("\n") == 1 and "unknown command" in r.stderr, r.stderr
