"""Llama 3's own formats: Meta's tiktoken `tokenizer.model` against tiktoken itself, and Meta's
checkpoint folder (params.json with use_scaled_rope) against transformers with the "llama3" rope.

The BPE ranks are trained here by tiktoken's own trainer on the Python docs' topic texts (offline),
with Llama 3's split pattern and special tokens, so the file has the layout Meta ships."""

import base64
import contextlib
import io
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lit_llama.io.checkpoint import load_model
from lit_llama.io.convert import convert_meta_checkpoint
from lit_llama.io.tiktoken_file import LLAMA3_PATTERN, llama3_special_tokens, tokenizer_json
from lit_llama.templates import recorded_template_name
from lit_llama.tokenizer import Tokenizer
from lit_llama.utils import UserError
from test_convert_meta import DIM, N_HEAD, N_LAYER, meta_state_dict

N_SPECIAL = 256

# held out from the training text: prose, code, digits, contractions in both cases, whitespace runs,
# CRLF, accents, CJK, emoji, and special tokens written in the text
VARIED = ("Don't stop; WE'LL see what THEY'VE done.  It's 12345678 or 3.14159!\r\n\r\n"
          "def f(x):\n\tif x >= 10_000:  # comment\n        return x ** 2\n\n\n   trailing   \n"
          "Café naïve Ünïcödé — «quotes» 東京タワー 北京 こんにちは 🦙🦙 \u00a0nbsp\u2009thin\n"
          "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>")


@pytest.fixture(scope="module")
def ranks():
    import pydoc_data.topics
    import tiktoken._educational

    topics = list(pydoc_data.topics.topics.values())
    with contextlib.redirect_stdout(io.StringIO()):  # the trainer prints each merge
        return tiktoken._educational.bpe_train("\n".join(topics[:12]), 360, LLAMA3_PATTERN)


def write_tiktoken(path, ranks) -> None:
    """The file format tiktoken's load_tiktoken_bpe reads: one `base64(token) rank` line per token."""
    path.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % r for t, r in sorted(ranks.items(), key=lambda x: x[1])))


@pytest.fixture(scope="module")
def reference(ranks, tmp_path_factory):
    """tiktoken's Encoding, built from the file by tiktoken's own reader."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    path = tmp_path_factory.mktemp("tiktoken") / "tokenizer.model"
    write_tiktoken(path, ranks)
    special = {s: len(ranks) + i for i, s in enumerate(llama3_special_tokens(N_SPECIAL))}
    return path, tiktoken.Encoding("llama3-test", pat_str=LLAMA3_PATTERN, mergeable_ranks=load_tiktoken_bpe(str(path)),
                                   special_tokens=special)


def test_tokenizer_json_encodes_as_tiktoken(ranks, reference):
    from tokenizers import Tokenizer as HFTokenizer

    import pydoc_data.topics

    _, enc = reference
    ours = HFTokenizer.from_str(json.dumps(tokenizer_json(ranks, llama3_special_tokens(N_SPECIAL))))
    unseen = "\n".join(list(pydoc_data.topics.topics.values())[40:60])  # not in the training text
    for text in (VARIED, unseen, " leading space", "a\n\n\nb", "x" * 300):
        expected = enc.encode(text, allowed_special="all")
        assert ours.encode(text, add_special_tokens=False).ids == expected
        assert ours.decode(expected, skip_special_tokens=False) == text
    assert len(enc.encode(unseen)) < 0.7 * len(unseen.encode())  # merges at work, not bytes


def llama3_hf(vocab: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    rope = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192, "rope_theta": 500000.0}
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=DIM, intermediate_size=224, num_hidden_layers=N_LAYER,
        num_attention_heads=N_HEAD, num_key_value_heads=2, rope_parameters=rope, rms_norm_eps=1e-5,
        max_position_embeddings=131072, tie_word_embeddings=False, attn_implementation="eager")).float().eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(1 + 0.3 * torch.randn_like(p) if "norm" in name else 0.3 * torch.randn_like(p))
    return hf


@pytest.fixture(scope="module")
def llama3_ckpt(tmp_path_factory, ranks, reference):
    """(transformers' model, our checkpoint converted from its Meta Llama 3.2 folder: params.json with
    use_scaled_rope, the tiktoken tokenizer.model)."""
    path, _ = reference
    vocab = len(ranks) + N_SPECIAL
    hf = llama3_hf(vocab)
    root = tmp_path_factory.mktemp("meta3")
    src = root / "Llama3.2-1B-Instruct"
    src.mkdir()
    torch.save(meta_state_dict(hf, 2), src / "consolidated.00.pth")
    params = {"dim": DIM, "n_layers": N_LAYER, "n_heads": N_HEAD, "n_kv_heads": 2, "vocab_size": vocab,
              "multiple_of": 32, "ffn_dim_multiplier": 1.3, "norm_eps": 1e-5, "rope_theta": 500000.0,
              "use_scaled_rope": True}
    (src / "params.json").write_text(json.dumps(params))
    (src / "tokenizer.model").write_bytes(path.read_bytes())
    convert_meta_checkpoint(src, root / "lit")
    return hf, root / "lit"


@torch.no_grad()
def test_meta_llama3_folder(llama3_ckpt, ranks, reference):
    """The "llama3" rope (factor 32 at this width), logits equal to transformers', a tokenizer.json
    that encodes as tiktoken with BOS first, generation stopping at every end token and the llama-3
    chat template recorded."""
    _, enc = reference
    hf, ckpt = llama3_ckpt
    ours = load_model(ckpt)
    c = ours.config
    assert (c.block_size, c.vocab_size, c.intermediate_size) == (131072, len(ranks) + N_SPECIAL, 224)
    assert c.rope_scaling == {"type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 8192}
    idx = torch.randint(0, c.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ours(idx), hf(idx).logits, rtol=1e-4, atol=1e-4)

    tok = Tokenizer(ckpt)
    assert tok.encode(VARIED).tolist() == [enc.encode_single_token("<|begin_of_text|>")] + enc.encode(
        VARIED, allowed_special="all")
    assert tok.stop_ids == sorted(enc.encode_single_token(t) for t in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"))
    assert recorded_template_name(ckpt) == "llama-3"


# Meta's chat template as published with meta-llama/Meta-Llama-3-8B-Instruct (tokenizer_config.json)
LLAMA3_HF = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
DIALOGUE = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": " What is 2 + 2? "},
            {"role": "assistant", "content": "4."}, {"role": "user", "content": "And 3 + 3?"},
            {"role": "assistant", "content": "6.\n\nSix."}]


def test_llama3_chat_matches_metas_template(llama3_ckpt):
    """The built-in llama-3 template renders and encodes (one BOS, specials as their ids) as
    transformers does with Meta's template on the converted tokenizer; finetuning data trains on each
    answer and its <|eot_id|>, masking the rest; generation stops at <|eot_id|>."""
    from transformers import AutoTokenizer

    from lit_llama.data.chat import encode_dialogue
    from lit_llama.data.instruction import IGNORE_INDEX
    from lit_llama.templates import ChatFormat, get_template

    _, ckpt = llama3_ckpt
    hf, tok = AutoTokenizer.from_pretrained(str(ckpt)), Tokenizer(ckpt)
    fmt = ChatFormat(get_template("llama-3"), tok)
    for k in (2, 4):  # the prompts of both answers
        want = hf.apply_chat_template(DIALOGUE[:k], chat_template=LLAMA3_HF, tokenize=False, add_generation_prompt=True)
        assert fmt.render(DIALOGUE[:k]) == want
        ids = hf.apply_chat_template(DIALOGUE[:k], chat_template=LLAMA3_HF, add_generation_prompt=True, return_dict=False)
        assert fmt.prompt_ids(DIALOGUE[:k]) == list(ids) and list(ids).count(tok.bos_id) == 1
    assert tok.token_to_id("<|eot_id|>") in fmt.stop_ids

    ex = encode_dialogue(fmt, DIALOGUE, 4096)
    ids, labels = ex["input_ids"].tolist(), ex["labels"].tolist()
    full = hf.apply_chat_template(DIALOGUE, chat_template=LLAMA3_HF, add_generation_prompt=False, return_dict=False)
    assert ids == list(full)
    trained = [i for i, y in enumerate(labels) if y != IGNORE_INDEX]
    assert hf.decode([ids[i] for i in trained]) == "4.<|eot_id|>6.\n\nSix.<|eot_id|>"
@pytest.mark.parametrize("content, message", [
    (b"SGVsbG8= 0\nnot a line\n", "line 2 is not '<base64 token> <rank>'"),
    (b"".join(base64.b64encode(bytes([b])) + b" %d\n" % (2 * b) for b in range(256)), "are not 0..255"),
])
def test_bad_tiktoken_file_is_one_clear_error(tmp_path, content, message):
    src = tmp_path / "meta"
    src.mkdir()
    torch.save({}, src / "consolidated.00.pth")
    (src / "params.json").write_text(json.dumps({"dim": DIM, "n_layers": N_LAYER, "n_heads": N_HEAD}))
    (src / "tokenizer.model").write_bytes(content)
    with pytest.raises(UserError, match=message.replace(".", r"\.")):
        convert_meta_checkpoint(src, tmp_path / "lit")
    assert not (tmp_path / "lit").exists()


def test_lora_finetunes_llama3_and_chats(llama3_ckpt, tmp_path):
    """prepare_chat.py with the llama-3 template, finetune/lora.py on it, then generate/lora.py: the
    model the adapters train on and answer with has the checkpoint's rope scaling."""
    from conftest import run_script
    from lit_llama.templates import recorded_template_name

    _, ckpt = llama3_ckpt
    rows = [{"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": f"{w}."}]}
            for w in ["apple", "river", "stone", "cloud", "green", "piano"]]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    r = run_script("scripts/prepare_chat.py", "--checkpoint_dir", ckpt, "--data_file_path", tmp_path / "d.jsonl",
                   "--destination_path", tmp_path / "data", "--template", "llama-3", "--val_fraction", "0.34")
    assert r.returncode == 0, r.stderr
    r = run_script("finetune/lora.py", "--checkpoint_dir", ckpt, "--data_dir", tmp_path / "data", "--out_dir",
                   tmp_path / "lora", "--max_iters", "2", "--global_batch_size", "2", "--micro_batch_size", "2",
                   "--eval_interval", "100", "--save_interval", "100", "--warmup_iters", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert recorded_template_name(tmp_path / "lora") == "llama-3"
    g = run_script("generate/lora.py", "--checkpoint_dir", ckpt, "--lora_path", tmp_path / "lora", "--prompt",
                   "Say apple.", "--max_new_tokens", "3")
    assert g.returncode == 0 and "tokens/s" in g.stderr, g.stderr[-3000:]


@torch.no_grad()
def test_hf_llama32_folder_converts_and_chats(llama3_ckpt, tmp_path):
    """The README's path for a newcomer, on a tiny model of Llama-3.2-1B-Instruct's kind: its Hugging
    Face folder (config.json with the llama3 rope, tokenizer.json, Meta's chat template, three EOS ids
    in generation_config.json) converts, gives transformers' logits, and chat.py answers with it."""
    import shutil

    from conftest import run_script
    from lit_llama.io.convert import convert_hf_checkpoint

    hf, meta_ckpt = llama3_ckpt
    folder = tmp_path / "Llama-3.2-1B-Instruct"
    hf.save_pretrained(folder)
    shutil.copyfile(meta_ckpt / "tokenizer.json", folder / "tokenizer.json")
    meta_tok = Tokenizer(meta_ckpt)
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": LLAMA3_HF,
        "tokenizer_class": "PreTrainedTokenizerFast"}))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": meta_tok.bos_id,
                                                                "eos_token_id": meta_tok.stop_ids}))
    convert_hf_checkpoint(folder, tmp_path / "lit")
    ours = load_model(tmp_path / "lit")
    assert ours.config.rope_scaling["type"] == "llama3" and ours.config.rope_scaling["factor"] == 32.0
    idx = torch.randint(0, ours.config.vocab_size, (1, 30), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(ours(idx), hf(idx).logits, rtol=1e-4, atol=1e-4)
    tok = Tokenizer(tmp_path / "lit")
    assert tok.stop_ids == meta_tok.stop_ids and tok.eos_id == tok.token_to_id("<|eot_id|>")
    r = run_script("chat.py", "--checkpoint_dir", tmp_path / "lit", "--max_new_tokens", "4", "--temperature", "0",
                   input="What is 2 + 2?\n")
    assert r.returncode == 0, r.stderr[-3000:]
