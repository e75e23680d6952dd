"""chat.py on the embedded model, driven through a pipe (greedy): the second answer uses the first
turn, /reset forgets it, a full context drops the oldest turns and keeps the newest, Ctrl-C stops
one answer and the session goes on, bad input gets a clear message."""

import os
import signal
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest

from conftest import ROOT
from lit_llama.infer.chat import ChatSession
from lit_llama.infer.load import finetuned_wrap
from lit_llama.templates import ChatFormat, get_template, save_template_name
from lit_llama.tokenizer import Tokenizer
from lit_llama.utils import UserError

GREEDY = ["--temperature", "0"]
# one thread per model process: on a small shared machine, OpenMP threads that wait on each other
# make the decode loop several times slower; the answers are the same
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def chat(lines, *args, timeout=300):
    return subprocess.run([sys.executable, "chat.py", *GREEDY, *map(str, args)], cwd=ROOT, input="\n".join(lines) + "\n",
                          capture_output=True, text=True, timeout=timeout, env=ENV)


def transcript(stdout: str):
    """[(message, answer)] from chat.py's piped output (each message echoed as `>> message`)."""
    turns = []
    for line in stdout.splitlines():
        if line.startswith(">> "):
            turns.append([line[3:], ""])
        elif turns:
            turns[-1][1] += line + "\n"
    return [(m, a.strip()) for m, a in turns]


@pytest.fixture(scope="module")
def session_run(default_checkpoint):
    lines = ["My name is Zorbo.", "", "What is my name?", "/template nope", "/reset", "What is my name?"]
    r = chat(lines, "--max_new_tokens", 12)
    assert r.returncode == 0, r.stderr
    return r


def test_second_turn_uses_the_first_and_reset_forgets(session_run):
    turns = transcript(session_run.stdout)
    assert [m for m, _ in turns] == ["My name is Zorbo.", "", "What is my name?", "/template nope", "/reset",
                                     "What is my name?"]
    with_history, after_reset = turns[2][1], turns[5][1]
    assert "Zorbo" in with_history, session_run.stdout
    assert after_reset and "Zorbo" not in after_reset, session_run.stdout  # the control: no history, no name


def test_bad_input_in_the_session_is_a_message_and_the_session_goes_on(session_run):
    err = session_run.stderr
    assert "(empty message" in err
    assert "unknown chat template 'nope'" in err and "chatml" in err  # the known ones are listed
    assert "(history cleared)" in err
    assert "Traceback" not in err


def fake_model(block_size: int):
    return SimpleNamespace(config=SimpleNamespace(block_size=block_size))


def test_trimming_keeps_the_newest_turns_that_fit(default_checkpoint):
    tok = Tokenizer(default_checkpoint)
    fmt = ChatFormat(get_template("chatml"), tok)
    session = ChatSession(fake_model(8192), tok, fmt, "cpu", system="Be brief.", max_new_tokens=20, max_seq_length=150)
    for i in range(8):
        session.history += [{"role": "user", "content": f"Remember the number {i}, please."},
                            {"role": "assistant", "content": f"I will remember {i}."}]
    ids, kept = session.prompt("Which numbers do you remember?")
    assert len(ids) + 20 <= 150
    # a suffix of the history, whole turns, as many as fit (one more would not), the system kept
    assert 0 < len(kept) < len(session.history) and kept == session.history[-len(kept):]
    assert kept[0]["role"] == "user" and kept[-1]["content"] == "I will remember 7."
    one_more = session.history[-len(kept) - 2:]
    assert len(fmt.prompt_ids(session.messages(one_more, "Which numbers do you remember?"))) + 20 > 150
    assert tok.decode(ids).startswith("<|im_start|>system\nBe brief.<|im_end|>")
    # a message that cannot fit even alone is refused, the history untouched
    with pytest.raises(UserError, match="too long"):
        session.prompt("word " * 200)
    assert len(session.history) == 16


@pytest.fixture(scope="module")
def zero_lora(tmp_path_factory, default_checkpoint):
    """A LoRA for the embedded model whose update is zero (B = 0), recorded with the checkpoint's template."""
    from lit_llama.io.checkpoint import load_model
    from lit_llama.peft.lora import LoRAConfig, add_lora, save_lora

    out = tmp_path_factory.mktemp("lora")
    save_lora(add_lora(load_model(default_checkpoint), LoRAConfig()), out)
    save_template_name(out, "checkpoint")
    return out


def test_full_context_through_the_pipe_with_lora(session_run, zero_lora, default_checkpoint):
    lines = ["My name is Zorbo.", "Tell me about the sea.", "Tell me about cats."]
    r = chat(lines, "--max_new_tokens", 8, "--max_seq_length", 64, "--lora_path", zero_lora)
    assert r.returncode == 0, r.stderr
    turns = transcript(r.stdout)
    assert [m for m, _ in turns] == lines and all(a for _, a in turns), r.stdout
    assert "left out the oldest" in r.stderr
    assert f"recorded with {zero_lora}" in r.stderr  # the template recorded with the LoRA weights
    # a zero LoRA changes nothing: the first answer is the base model's (cut to 8 tokens)
    first = transcript(session_run.stdout)[0][1]
    assert first.startswith(turns[0][1]), (first, turns[0][1])
    # and the LoRA is really loaded
    from lit_llama.io.checkpoint import load_model

    assert finetuned_wrap(lora_path=zero_lora)(load_model(default_checkpoint)).lora_config is not None


class Reader(threading.Thread):
    def __init__(self, stream):
        super().__init__(daemon=True)
        self.stream, self.data = stream, b""

    def run(self):
        while chunk := os.read(self.stream.fileno(), 4096):
            self.data += chunk


def test_ctrl_c_stops_the_answer_not_the_session(default_checkpoint):
    p = subprocess.Popen([sys.executable, "chat.py", *GREEDY, "--max_new_tokens", "400"], cwd=ROOT, env=ENV,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = Reader(p.stdout), Reader(p.stderr)
    out.start(), err.start()
    try:
        p.stdin.write(b"Write a long story about a dragon and a knight.\n")
        p.stdin.flush()
        deadline = time.time() + 180
        while len(out.data.split(b"\n", 1)[-1]) < 20 and time.time() < deadline:  # some of the answer shown
            time.sleep(0.05)
        assert p.poll() is None, err.data
        p.send_signal(signal.SIGINT)
        while b"(stopped)" not in err.data and time.time() < deadline:
            time.sleep(0.05)
        assert b"(stopped)" in err.data, err.data
        p.stdin.write(b"/reset\nSay hello.\n")
        p.stdin.close()
        assert p.wait(timeout=180) == 0, err.data
    finally:
        if p.poll() is None:
            p.kill()
    out.join(5)
    turns = transcript(out.data.decode())
    assert [m for m, _ in turns] == ["Write a long story about a dragon and a knight.", "/reset", "Say hello."]
    assert turns[2][1], out.data  # answered after the interruption
    assert b"Traceback" not in err.data


def run_main(script: str, args, capsys):
    """(exit code, stderr) of a script's main run through run_cli in this process, as from the shell."""
    import importlib.util

    from lit_llama.utils import run_cli

    spec = importlib.util.spec_from_file_location(f"script_{script[:-3]}", ROOT / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(module.main, args=[str(a) for a in args])
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--template", "nope"], "unknown chat template 'nope'"),
    (["--lora_path", "does/not/exist"], "does/not/exist does not exist"),
    (["--adapter_path", "nor/this"], "nor/this does not exist"),
    (["--max_new_tokens", "0"], "--max_new_tokens must be at least 1"),
    (["--max_seq_length", "1"], "--max_seq_length must be at least 2"),
    (["--checkpoint_dir", "no/such/dir"], "no/such/dir"),
    (["--quantize", "int2"], "unknown --quantize 'int2'"),
])
def test_bad_flags_are_one_clear_line(args, message, default_checkpoint, capsys):
    code, stderr = run_main("chat.py", args, capsys)
    lines = stderr.strip().splitlines()
    assert code == 1 and len(lines) == 1 and message in lines[0] and lines[0].startswith("error:"), stderr


def test_the_next_turn_prefills_only_its_new_tokens(default_checkpoint):
    """Turn 2 takes turn 1's keys and values from the session's cache row; its answer equals that of
    a fresh session given the same history, which computes the whole prompt."""
    from lit_llama.infer.load import load_for_inference

    _, model, tok = load_for_inference(default_checkpoint, "32-true")
    fmt = ChatFormat(get_template("checkpoint", tok), tok)
    kw = dict(max_new_tokens=16, temperature=0, max_seq_length=512)
    session = ChatSession(model, tok, fmt, "cpu", **kw)
    first = "".join(session.respond("My name is Zorbo. Tell me a short fact about the sea."))
    first_prompt = len(session.last_request.prompt)
    second = "".join(session.respond("What is my name?"))
    reused = session.last_request.cached_tokens
    assert reused > first_prompt and reused > len(session.last_request.prompt) - 20
    fresh = ChatSession(model, tok, fmt, "cpu", **kw)
    fresh.history = session.history[:2]
    assert "".join(fresh.respond("What is my name?")) == second
    assert fresh.last_request.cached_tokens == 0
    assert first and session.engine.stats["prefix_cache_hits"] == 1
    model.clear_kv_cache()
