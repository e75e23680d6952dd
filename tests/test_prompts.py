"""Chat templates against their references: transformers' apply_chat_template (ChatML on the
embedded model's own tokenizer, read from the GGUF file; Meta's published Llama-2-chat template),
FastChat's conversation templates (Vicuna v1.1, Baize, Llama-2), Stanford Alpaca's prompt, and
Meta's reference tokenization of a Llama-2 dialog. Then how a checkpoint's template is chosen and
recorded, and the text stream that applies stop strings."""

import io
import json
import shutil
from pathlib import Path

import pytest
import torch

from lit_llama.infer.generation import TextStream
from lit_llama.templates import (BUILTIN, ChatFormat, JinjaChatTemplate, choose_template, get_template,
                               instruction_prompt, render_jinja, save_template_name)
from lit_llama.tokenizer import Tokenizer
from lit_llama.utils import UserError

SYSTEM = "You are a terse assistant."
TURNS = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there"},
         {"role": "user", "content": "What is 2 + 2?"}]
# Stanford Alpaca's template, written out here independently of lit_llama/templates.py
ALPACA = ("Below is an instruction that describes a task. Write a response that appropriately completes "
          "the request.\n\n### Instruction:\n{}\n\n### Response:\n")
# Meta's chat template as published with meta-llama/Llama-2-7b-chat-hf (tokenizer_config.json)
LLAMA2_HF = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
    "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
    "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)


@pytest.fixture(scope="module")
def hf_tokenizer(default_gguf):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_gguf.parent, gguf_file=default_gguf.name)


@pytest.fixture(scope="module")
def tokenizer(default_checkpoint):
    return Tokenizer(default_checkpoint)


def hf_render(hf_tokenizer, messages, **kwargs):
    return hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)


def fastchat(name, messages, system=None):
    from fastchat.conversation import get_conv_template

    conv = get_conv_template(name)
    if system is not None:
        conv.set_system_message(system)
    for m in messages:
        conv.append_message(conv.roles[0] if m["role"] == "user" else conv.roles[1], m["content"])
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


# ---------------------------------------------------------------- each built-in against its reference


def test_chatml_matches_transformers_on_the_embedded_tokenizer(hf_tokenizer, tokenizer):
    chatml = BUILTIN["chatml"]
    for messages in ([{"role": "system", "content": SYSTEM}] + TURNS, [{"role": "system", "content": ""}] + TURNS[:1]):
        assert chatml.render(messages) == hf_render(hf_tokenizer, messages)
    # without a system message SmolLM2's template adds its own; generic ChatML adds none, and with that
    # one given they agree
    smol_default = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert chatml.render([{"role": "system", "content": smol_default}] + TURNS) == hf_render(hf_tokenizer, TURNS)
    assert chatml.render(TURNS).startswith("<|im_start|>user\nHello<|im_end|>\n")
    # and the checkpoint's own template (Jinja, rendered by us) equals transformers, token ids included
    own = ChatFormat(get_template("checkpoint", tokenizer), tokenizer)
    for messages in (TURNS, [{"role": "system", "content": SYSTEM}] + TURNS):
        expected = hf_render(hf_tokenizer, messages)
        assert own.render(messages) == expected
        assert own.prompt_ids(messages) == hf_tokenizer.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert tokenizer.eos_id in own.stop_ids and hf_tokenizer.convert_tokens_to_ids("<|im_end|>") in own.stop_ids


def test_llama2_matches_metas_template_and_fastchat(hf_tokenizer):
    llama2 = BUILTIN["llama-2"]
    for messages in (TURNS, [{"role": "system", "content": SYSTEM}] + TURNS,
                     [{"role": "user", "content": "  padded  "}]):
        ours = llama2.render(messages, bos_token="<s>", eos_token="</s>")
        assert ours == hf_render(hf_tokenizer, messages, chat_template=LLAMA2_HF, bos_token="<s>", eos_token="</s>")
        system = messages[0]["content"] if messages[0]["role"] == "system" else None
        turns = messages[1:] if system else messages
        # FastChat leaves the first BOS to the tokenizer
        assert ours == "<s>" + fastchat("llama-2", [{**m, "content": m["content"].strip()} for m in turns], system)
    with pytest.raises(UserError, match="alternating"):
        llama2.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_vicuna_and_baize_match_fastchat():
    for name, fc_name in (("vicuna", "vicuna_v1.1"), ("baize", "baize")):
        t = BUILTIN[name]
        assert t.render(TURNS, bos_token="<s>", eos_token="</s>") == fastchat(fc_name, TURNS)
        custom = SYSTEM + ("\n" if name == "baize" else "")  # FastChat's Baize expects the newline in it
        assert t.render([{"role": "system", "content": SYSTEM}] + TURNS, eos_token="</s>") == \
            fastchat(fc_name, TURNS, system=custom)


def test_alpaca_single_turn_is_the_finetuning_prompt():
    alpaca = BUILTIN["alpaca"]
    question = "Name three fruits."
    assert alpaca.render([{"role": "user", "content": question}]) == ALPACA.format(question) \
        == instruction_prompt(question)
    # more turns: each answer ends with EOS, as the finetuning examples do
    assert alpaca.render(TURNS, eos_token="</s>") == (
        ALPACA.format("Hello") + "Hi there</s>\n\n### Instruction:\nWhat is 2 + 2?\n\n### Response:\n")
    assert alpaca.render([{"role": "system", "content": SYSTEM}, TURNS[0]]) == \
        f"{SYSTEM}\n\n### Instruction:\nHello\n\n### Response:\n"


# ---------------------------------------------------------------- token ids on a SentencePiece tokenizer


@pytest.fixture(scope="module")
def spm_checkpoint(tmp_path_factory) -> Path:
    """A tokenizer-only checkpoint dir with a tiny SentencePiece model (<unk>, <s>, </s> as in LLaMA)."""
    import pydoc_data.topics
    import sentencepiece as spm

    lines = [l for text in pydoc_data.topics.topics.values() for l in text.splitlines() if l.strip()]
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines[:3000]), model_writer=out, vocab_size=400,
                                   model_type="bpe", byte_fallback=True, minloglevel=2)
    d = tmp_path_factory.mktemp("spm")
    (d / "tokenizer.model").write_bytes(out.getvalue())
    return d


def test_llama2_ids_follow_metas_reference_tokenization(spm_checkpoint):
    """Meta's chat_completion encodes each user turn and its answer as
    bos + encode(f"[INST] {user} [/INST] {answer} ") + eos, the last user turn as
    bos + encode(f"[INST] {user} [/INST]"), the system prompt inside the first user turn."""
    tok = Tokenizer(spm_checkpoint)
    sp = tok.processor
    fmt = ChatFormat(BUILTIN["llama-2"], tok)
    messages = [{"role": "system", "content": SYSTEM}] + TURNS
    first = f"<<SYS>>\n{SYSTEM}\n<</SYS>>\n\nHello"
    expected = ([sp.bos_id()] + sp.encode(f"[INST] {first} [/INST] Hi there ") + [sp.eos_id()]
                + [sp.bos_id()] + sp.encode("[INST] What is 2 + 2? [/INST]"))
    assert fmt.prompt_ids(messages) == expected
    # "<s>" in the text is the BOS token (as in transformers), and this template adds no other BOS
    assert fmt.encode("a<s>b") == sp.encode("a") + [sp.bos_id()] + sp.encode("b")
    # ChatML on a BOS-adding tokenizer gets one BOS in front; Alpaca too (as in finetuning)
    assert ChatFormat(BUILTIN["alpaca"], tok).prompt_ids(TURNS[:1]) == tok.encode(ALPACA.format("Hello")).tolist()


# ---------------------------------------------------------------- Jinja like transformers


JINJA_CASES = [
    # whitespace control, loop.last, namespace, tojson on non-ASCII, a filter chain, loop controls
    "{%- set ns = namespace(n=0) -%}\n{% for m in messages %}\n  {%- if m.role == 'system' %}{% continue %}{% endif %}\n"
    "  {%- set ns.n = ns.n + 1 -%}\n[{{ ns.n }}:{{ m.role | upper }}] {{ m.content | tojson }}{% if not loop.last %}\n{% endif %}\n"
    "{%- endfor %}{% if add_generation_prompt %}<go>{% endif %}{{ eos_token }}",
    "{{ bos_token }}{% for m in messages %}{{ m['content'] | trim }}{% if loop.index0 >= 1 %}{% break %}{% endif %}|{% endfor %}",
]


@pytest.mark.parametrize("source", JINJA_CASES)
def test_jinja_rendering_matches_transformers(source, hf_tokenizer):
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": " café 東京 \"q\" "},
                {"role": "assistant", "content": "ok"}, {"role": "user", "content": "again"}]
    ours = JinjaChatTemplate(source).render(messages, bos_token="<B>", eos_token="<E>")
    assert ours == hf_render(hf_tokenizer, messages, chat_template=source, bos_token="<B>", eos_token="<E>")


def test_jinja_is_sandboxed_and_raise_exception_is_a_user_error():
    with pytest.raises(UserError, match="refused"):
        render_jinja("{{ raise_exception('no system role') }}", [{"role": "user", "content": "x"}])
    with pytest.raises(UserError):
        render_jinja("{{ messages.__class__.__mro__[1].__subclasses__() }}", [{"role": "user", "content": "x"}])
    with pytest.raises(UserError, match="cannot be parsed"):
        render_jinja("{% for %}", [])


# ---------------------------------------------------------------- which template, and recording it


@pytest.fixture
def tokenizer_dir(tmp_path, default_checkpoint) -> Path:
    d = tmp_path / "ckpt"
    d.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(default_checkpoint / f, d / f)
    return d


def test_template_choice(tokenizer_dir, tmp_path):
    tok = Tokenizer(tokenizer_dir)
    assert choose_template(tok, tokenizer_dir)[0].name == "checkpoint"
    assert choose_template(tok, tokenizer_dir, "vicuna")[0].name == "vicuna"  # --template wins
    with pytest.raises(UserError, match="unknown chat template 'nope'"):
        choose_template(tok, tokenizer_dir, "nope")
    # a name recorded in the checkpoint comes before its Jinja template
    save_template_name(tokenizer_dir, "baize")
    assert choose_template(tok, tokenizer_dir)[0].name == "baize"
    # finetuned weights: their record; without one, alpaca (the format finetune/ trains on)
    lora = tmp_path / "out" / "lora"
    lora.mkdir(parents=True)
    tmpl, why = choose_template(tok, tokenizer_dir, finetuned_path=lora / "lit_lora.safetensors")
    assert tmpl.name == "alpaca" and "records no template" in why
    save_template_name(lora, "chatml")
    assert choose_template(tok, tokenizer_dir, finetuned_path=lora / "lit_lora.safetensors")[0].name == "chatml"
    # no template anywhere: a clear error that names --template
    cfg = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (tokenizer_dir / "tokenizer_config.json").write_text(json.dumps(cfg))
    (tokenizer_dir / "lit_template.json").unlink()
    with pytest.raises(UserError, match="--template"):
        choose_template(Tokenizer(tokenizer_dir), tokenizer_dir)
    # transformers' other places for the template: chat_template.jinja, or a list of named templates
    (tokenizer_dir / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!")
    assert Tokenizer(tokenizer_dir).apply_chat_template([{"role": "user", "content": "hi"}]) == "hi!"
    (tokenizer_dir / "chat_template.jinja").unlink()
    cfg["chat_template"] = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    (tokenizer_dir / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert Tokenizer(tokenizer_dir).chat_template == "D"


def test_converters_record_the_template(tmp_path, spm_checkpoint):
    from transformers import LlamaConfig, LlamaForCausalLM

    from lit_llama.io.convert import convert_hf_checkpoint, convert_meta_checkpoint
    from test_convert_meta import meta_state_dict
    from test_model_hf import save_hf, tiny_hf_model

    # Hugging Face folder: chat_template.jinja (where transformers 5 saves it) travels along
    save_hf(tiny_hf_model(2, True, 10000.0, 300), tmp_path / "hf", "safetensors")
    (tmp_path / "hf" / "chat_template.jinja").write_text(LLAMA2_HF)
    convert_hf_checkpoint(tmp_path / "hf", tmp_path / "lit")
    assert Tokenizer(tmp_path / "lit").chat_template == LLAMA2_HF
    # a built-in name can be recorded instead
    convert_hf_checkpoint(tmp_path / "hf", tmp_path / "lit-vicuna", template="vicuna")
    lit = tmp_path / "lit-vicuna"
    assert choose_template(Tokenizer(lit), lit)[0].name == "vicuna"
    with pytest.raises(UserError, match="unknown chat template"):
        convert_hf_checkpoint(tmp_path / "hf", tmp_path / "bad", template="nope")
    assert not (tmp_path / "bad").exists()
    # Meta's Llama 2 chat folders get llama-2
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=400, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                                      num_attention_heads=4, rms_norm_eps=1e-5, tie_word_embeddings=False))
    src = tmp_path / "llama-2-7b-chat"
    src.mkdir()
    torch.save(meta_state_dict(hf, 4), src / "consolidated.00.pth")
    (src / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 2, "n_heads": 4, "multiple_of": 32,
                                                 "norm_eps": 1e-5, "vocab_size": -1}))
    shutil.copyfile(spm_checkpoint / "tokenizer.model", src / "tokenizer.model")
    convert_meta_checkpoint(src, tmp_path / "meta-chat")
    out = tmp_path / "meta-chat"
    tmpl, why = choose_template(Tokenizer(out), out)
    assert tmpl.name == "llama-2" and "lit_template.json" in why


# ---------------------------------------------------------------- stop strings in a token stream


def test_text_stream_never_shows_a_stop_string(tokenizer):
    text = "The answer is 4.\nUSER: and more"
    ids = tokenizer.encode(text, bos=False).tolist()
    stream = TextStream(tokenizer.decode, ["USER:"])
    shown = ""
    for t in ids:
        shown += stream.add(t)
        assert "USER" not in shown and not shown.endswith("\nU")  # held back while it may be a stop
        if stream.stopped:
            break
    shown += stream.flush()
    assert stream.stopped and shown == stream.text == "The answer is 4.\n"
    # text that only looked like the start of a stop string comes out at the end
    stream = TextStream(tokenizer.decode, ["USER:"])
    shown = "".join(stream.add(t) for t in tokenizer.encode("ask the US", bos=False).tolist()) + stream.flush()
    assert shown == "ask the US" and not stream.stopped
