"""scripts/prepare_chat.py and lit_llama/data/chat.py: multi-turn dialogues tokenised with the loss on
the assistant's turns only, checked against independent renderings (FastChat's Baize template,
transformers' apply_chat_template), loaded by finetuning, and trained on by finetune/lora.py."""

import json

import pytest
import torch

from conftest import run_script
from lit_llama.data.chat import encode_dialogue, read_dialogues
from lit_llama.io.checkpoint import save_checkpoint
from lit_llama.data.instruction import IGNORE_INDEX, load_instruction_data
from lit_llama.model import Config, LLaMA
from lit_llama.templates import ChatFormat, get_template
from lit_llama.tokenizer import Tokenizer

DIALOGUE = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome is the capital of Italy.\n\nIt is also its largest city."},
]
WITH_SYSTEM = [{"role": "system", "content": "Answer in one sentence."}] + DIALOGUE


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, default_checkpoint):
    """A tiny random model with the embedded model's tokenizer (and its chat template)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("chat") / "tiny"
    save_checkpoint(path, LLaMA(Config.from_name("tiny", vocab_size=49152)), tokenizer_dir=default_checkpoint)
    return path


def trained_runs(example):
    """[(start, end)] of the maximal runs of trained labels; and checks labels equal ids there."""
    ids, labels = example["input_ids"].tolist(), example["labels"].tolist()
    runs, start = [], None
    for i, (x, y) in enumerate(zip(ids, labels)):
        if y != IGNORE_INDEX:
            assert y == x
            start = i if start is None else start
        elif start is not None:
            runs.append((start, i))
            start = None
    if start is not None:
        runs.append((start, len(ids)))
    return runs


@pytest.mark.parametrize("messages", [DIALOGUE, WITH_SYSTEM], ids=["no-system", "system"])
def test_baize_masks_match_fastchat(tiny_ckpt, messages):
    from fastchat.conversation import get_conv_template

    tok = Tokenizer(tiny_ckpt)
    ex = encode_dialogue(ChatFormat(get_template("baize"), tok), messages, 4096)
    runs = trained_runs(ex)
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    assert len(runs) == len(answers)
    ids = ex["input_ids"].tolist()
    for k, (start, end) in enumerate(runs):
        # what FastChat's Baize conversation gives the model as the prompt of answer k
        conv = get_conv_template("baize")
        if messages[0]["role"] == "system":
            conv.set_system_message(messages[0]["content"] + "\n")
        users = [m["content"] for m in messages if m["role"] == "user"]
        for u, a in zip(users[:k], answers[:k]):
            conv.append_message(conv.roles[0], u)
            conv.append_message(conv.roles[1], a)
        conv.append_message(conv.roles[0], users[k])
        conv.append_message(conv.roles[1], None)
        prompt = conv.get_prompt()
        assert ids[:start] == tok.encode(prompt).tolist()  # every prompt token masked, none more
        # the answer and the tag that ends it (FastChat's stop string) are trained
        assert tok.decode(ids[start:end]) == answers[k] + "\n" + conv.stop_str
    assert runs[-1][1] == len(ids)  # nothing after the last answer's end marker


@pytest.mark.parametrize("name", ["checkpoint", "chatml"])
def test_chatml_masks_match_transformers(tiny_ckpt, name):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tiny_ckpt))
    tok = Tokenizer(tiny_ckpt)
    messages = WITH_SYSTEM if name == "chatml" else DIALOGUE  # the checkpoint's template adds its own system
    ex = encode_dialogue(ChatFormat(get_template(name, tok), tok), messages, 4096)
    ids, runs = ex["input_ids"].tolist(), trained_runs(ex)
    assistant_at = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    assert len(runs) == len(assistant_at)
    full = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=False, return_dict=False)
    full = full["input_ids"] if isinstance(full, dict) else list(full)
    assert ids == full  # the same tokens as transformers renders and encodes the whole dialogue
    for (start, end), i in zip(runs, assistant_at):
        prompt = hf.apply_chat_template(messages[:i], tokenize=True, add_generation_prompt=True, return_dict=False)
        prompt = prompt["input_ids"] if isinstance(prompt, dict) else list(prompt)
        assert start == len(prompt) and ids[:start] == prompt
        assert hf.decode(ids[start:end]) == messages[i]["content"] + "<|im_end|>"
    # the newline after the last <|im_end|> is template text: masked
    assert hf.decode(ids[runs[-1][1]:]) == "\n"


@pytest.mark.parametrize("name", ["alpaca", "vicuna", "llama-2"])
def test_other_templates_end_answers_with_eos(tiny_ckpt, name):
    tok = Tokenizer(tiny_ckpt)
    fmt = ChatFormat(get_template(name, tok), tok)
    ex = encode_dialogue(fmt, DIALOGUE, 4096)
    ids, runs = ex["input_ids"].tolist(), trained_runs(ex)
    assert len(runs) == 2
    for k, (start, end) in enumerate(runs):
        assert ids[end - 1] == tok.eos_id and tok.eos_id not in ids[start:end - 1]
        assert tok.decode(ids[start:end - 1]).strip() == DIALOGUE[2 * k + 1]["content"]
        # the masked prefix is the prompt chat.py would give for this answer
        assert ids[:start] == fmt.prompt_ids(DIALOGUE[:2 * k + 1])


def test_long_dialogues_keep_whole_leading_exchanges(tiny_ckpt):
    tok = Tokenizer(tiny_ckpt)
    fmt = ChatFormat(get_template("chatml"), tok)
    whole = encode_dialogue(fmt, DIALOGUE, 4096)
    first_end = trained_runs(whole)[0][1]
    cut = encode_dialogue(fmt, DIALOGUE, trained_runs(whole)[1][1] - 1)  # the second answer's end marker is out
    assert cut["input_ids"].tolist() == whole["input_ids"][:first_end].tolist()  # the second exchange is left out
    short = encode_dialogue(fmt, DIALOGUE, first_end - 3)  # not even the first answer fits whole: cut inside it
    assert len(short["input_ids"]) == first_end - 3 and (short["labels"] != IGNORE_INDEX).any()
    prompt_len = trained_runs(whole)[0][0]
    assert encode_dialogue(fmt, DIALOGUE, prompt_len) is None  # no answer token left: skipped


def test_record_formats(tmp_path):
    rows = [
        {"seed": "x", "dialogue": DIALOGUE},
        {"messages": WITH_SYSTEM},
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
        {"instruction": "Add", "input": "1 and 2", "output": "3"},
        {"topic": "t", "input": "The conversation between human and AI assistant.\n[|Human|] Hi\n[|AI|] Hello there\n"
                                "[|Human|] Bye\n[|AI|] Goodbye\n[|Human|] "},  # Baize's released data
    ]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    d = read_dialogues(tmp_path / "d.jsonl")
    assert d[0] == DIALOGUE and d[1] == WITH_SYSTEM
    assert d[2] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert d[3] == [{"role": "user", "content": "Add\n\n1 and 2"}, {"role": "assistant", "content": "3"}]
    assert [m["content"] for m in d[4]] == ["Hi", "Hello there", "Bye", "Goodbye"]


def _one_error_line(r):
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, r.stderr
    return errors[0]


@pytest.mark.parametrize("row, expected", [
    ({"dialogue": [{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "Hello"}]}, "message 0 has role"),
    ({"dialogue": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                   {"role": "assistant", "content": "c"}]}, "message 1 has role 'user'"),
    ({"dialogue": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "  "}]}, "message 1 (assistant) is empty"),
    ({"dialogue": [{"role": "user", "content": "a"}]}, "must end with an assistant message"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}, "message 1 has role 'bot'"),
    ({"dialogue": []}, "non-empty list"),
    ({"question": "a"}, "has none of the fields"),
])
def test_bad_rows_are_one_line_errors(tmp_path, tiny_ckpt, row, expected):
    good = {"dialogue": DIALOGUE}
    (tmp_path / "d.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    r = run_script("scripts/prepare_chat.py", "--checkpoint_dir", tiny_ckpt, "--data_file_path", tmp_path / "d.jsonl",
                   "--destination_path", tmp_path / "out")
    line = _one_error_line(r)
    assert expected in line and "record 1" in line, line
    assert not (tmp_path / "out").exists()


def test_bad_arguments(tmp_path, tiny_ckpt):
    (tmp_path / "d.jsonl").write_text(json.dumps({"dialogue": DIALOGUE}) + "\n")
    common = ["--checkpoint_dir", tiny_ckpt, "--data_file_path", tmp_path / "d.jsonl", "--destination_path",
              tmp_path / "out"]
    assert "unknown chat template" in _one_error_line(run_script("scripts/prepare_chat.py", *common, "--template", "nope"))
    assert "does not exist" in _one_error_line(run_script("scripts/prepare_chat.py", *common[:2], "--data_file_path",
                                                           tmp_path / "missing.jsonl", *common[4:]))
    assert "no dialogue has an answer" in _one_error_line(run_script("scripts/prepare_chat.py", *common,
                                                                       "--max_seq_length", "20"))
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory, tiny_ckpt):
    tmp = tmp_path_factory.mktemp("chatdata")
    rows = [{"dialogue": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": f"{w}."},
                          {"role": "user", "content": "Again?"}, {"role": "assistant", "content": f"{w} {w}."}]}
            for w in ["apple", "river", "stone", "cloud", "green", "piano", "tiger", "lemon"]]
    (tmp / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp / "data"
    r = run_script("scripts/prepare_chat.py", "--checkpoint_dir", tiny_ckpt, "--data_file_path", tmp / "d.jsonl",
                   "--destination_path", out, "--max_seq_length", "256", "--val_fraction", "0.25")
    assert r.returncode == 0, r.stderr
    return out


def test_prepared_data_loads_for_finetuning(chat_data, tiny_ckpt):
    train, val, meta = load_instruction_data(chat_data, tiny_ckpt)
    assert (len(train), len(val)) == (6, 2)
    assert meta["template"] == "baize" and meta["max_seq_length"] == 256 and meta["mask_inputs"]
    tok = Tokenizer(tiny_ckpt)
    for ex in train + val:
        runs = trained_runs(ex)
        assert len(runs) == 2
        texts = [tok.decode(ex["input_ids"][s:e]) for s, e in runs]
        assert texts[0].endswith(".\n[|Human|]") and texts[1].endswith(".\n[|Human|]")


def test_lora_on_all_linear_layers_trains_on_it(chat_data, tiny_ckpt, tmp_path):
    out = tmp_path / "lora"
    r = run_script("finetune/lora.py", "--checkpoint_dir", tiny_ckpt, "--data_dir", chat_data, "--out_dir", out,
                   "--lora_query", "true", "--lora_key", "true", "--lora_value", "true", "--lora_projection", "true",
                   "--lora_mlp", "true", "--lora_r", "4", "--max_iters", "3", "--global_batch_size", "2",
                   "--micro_batch_size", "2", "--learning_rate", "1e-2", "--warmup_iters", "1", "--eval_interval",
                   "100", "--save_interval", "100", env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    losses = [float(line.split("loss ")[1].split()[0]) for line in r.stdout.splitlines() if line.startswith("step ")
              and "loss " in line]
    assert len(losses) >= 3 and all(l == l for l in losses), r.stdout  # finite (not NaN) on masked data
    from lit_llama.io.checkpoint import load_weights_file
    from lit_llama.templates import recorded_template_name

    tensors, _ = load_weights_file(out / "lit_lora.safetensors", "lit_lora.safetensors")
    for name in ("c_attn.lora_A.q", "c_attn.lora_A.k", "c_attn.lora_A.v", "attn.c_proj", "mlp.c_fc1", "mlp.c_fc2",
                 "mlp.c_proj"):  # every linear layer
        assert any(name in k for k in tensors), (name, list(tensors)[:8])
    assert recorded_template_name(out) == "baize"  # chat.py --lora_path uses the Baize template


def test_help():
    r = run_script("scripts/prepare_chat.py", "--help")
    assert r.returncode == 0 and "--template" in r.stdout and "--val_fraction" in r.stdout
