"""Meta's original checkpoint format, two model-parallel shards, against transformers.

The Meta files are made from a Hugging Face model by undoing HF's rotary permutation, so the
converted model must reproduce transformers' logits exactly when our converter re-permutes and
re-joins the shards correctly."""

import io
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lit_llama.io.checkpoint import load_model
from lit_llama.io.convert import convert_meta_checkpoint

DIM, N_LAYER, N_HEAD, VOCAB = 64, 2, 4, 400
# name: (params.json extras, n_kv_heads, rope_theta, intermediate size by Meta's FeedForward formula:
# hidden = int(2 * 4 * dim / 3) = 170, times ffn_dim_multiplier if any (int(1.3 * 170) = 221),
# rounded up to a multiple of multiple_of (32): 192 and 224)
CASES = {
    "mha": ({}, N_HEAD, 10000.0, 192),
    "gqa": ({"n_kv_heads": 2, "rope_theta": 500000.0, "ffn_dim_multiplier": 1.3}, 2, 500000.0, 224),
}


@pytest.fixture(scope="module")
def tokenizer_model() -> bytes:
    """A tiny sentencepiece model trained offline on the Python docs' topic texts."""
    import pydoc_data.topics
    import sentencepiece as spm

    lines = [l for text in pydoc_data.topics.topics.values() for l in text.splitlines() if l.strip()]
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines[:3000]), model_writer=out,
                                   vocab_size=VOCAB, model_type="bpe", minloglevel=2)
    return out.getvalue()


def halves_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of the permutation in transformers' convert_llama_weights_to_hf.py
    (w.view(n, hd//2, 2, dim).transpose(1, 2)): HF's rotate-halves rows back to Meta's pairs."""
    out, dim = w.shape
    return w.view(n_heads, 2, out // n_heads // 2, dim).transpose(1, 2).reshape(out, dim)


def meta_state_dict(hf: LlamaForCausalLM, n_kv: int) -> dict:
    sd = hf.state_dict()
    meta = {"tok_embeddings.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"],
            "output.weight": sd["lm_head.weight"]}
    for i in range(N_LAYER):
        hp, mp = f"model.layers.{i}.", f"layers.{i}."
        meta.update({
            mp + "attention.wq.weight": halves_to_interleaved(sd[hp + "self_attn.q_proj.weight"], N_HEAD),
            mp + "attention.wk.weight": halves_to_interleaved(sd[hp + "self_attn.k_proj.weight"], n_kv),
            mp + "attention.wv.weight": sd[hp + "self_attn.v_proj.weight"],
            mp + "attention.wo.weight": sd[hp + "self_attn.o_proj.weight"],
            mp + "feed_forward.w1.weight": sd[hp + "mlp.gate_proj.weight"],
            mp + "feed_forward.w2.weight": sd[hp + "mlp.down_proj.weight"],
            mp + "feed_forward.w3.weight": sd[hp + "mlp.up_proj.weight"],
            mp + "attention_norm.weight": sd[hp + "input_layernorm.weight"],
            mp + "ffn_norm.weight": sd[hp + "post_attention_layernorm.weight"],
        })
    return meta


def split_shards(meta: dict, n: int = 2) -> list:
    """Meta's model parallelism: column-parallel layers (wq, wk, wv, w1, w3, output) split their
    output rows, row-parallel ones (wo, w2) and the embedding split dim 1, norms are replicated,
    and every shard carries the precomputed rotary frequencies."""
    shards = [{} for _ in range(n)]
    for name, w in meta.items():
        if name.endswith("norm.weight"):
            parts = [w.clone() for _ in range(n)]
        else:
            dim1 = name.startswith("tok_embeddings") or ".wo." in name or ".w2." in name
            parts = [p.clone() for p in w.chunk(n, dim=1 if dim1 else 0)]
        for shard, p in zip(shards, parts):
            shard[name] = p
    for shard in shards:
        shard["rope.freqs"] = torch.rand(DIM // N_HEAD // 2)  # not a weight: must be skipped
    return shards


@pytest.mark.parametrize("case", list(CASES))
@torch.no_grad()
def test_meta_two_shards_match_transformers(case, tmp_path, tokenizer_model):
    extras, n_kv, theta, hidden = CASES[case]
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=DIM, intermediate_size=hidden, num_hidden_layers=N_LAYER,
        num_attention_heads=N_HEAD, num_key_value_heads=n_kv, rope_theta=theta, rms_norm_eps=1e-5,
        tie_word_embeddings=False, attn_implementation="eager")).float().eval()
    for name, p in hf.named_parameters():  # large weights, random norm scales: see test_model_hf.py
        p.copy_(1 + 0.3 * torch.randn_like(p) if "norm" in name else 0.3 * torch.randn_like(p))

    src = tmp_path / "7B"
    src.mkdir()
    for i, shard in enumerate(split_shards(meta_state_dict(hf, n_kv))):
        torch.save(shard, src / f"consolidated.{i:02d}.pth")
    # vocab_size -1, as in Meta's files: the converter must take it from the tokenizer
    params = {"dim": DIM, "n_layers": N_LAYER, "n_heads": N_HEAD, "multiple_of": 32, "norm_eps": 1e-5,
              "vocab_size": -1, **extras}
    (src / "params.json").write_text(json.dumps(params))
    (tmp_path / "tokenizer.model").write_bytes(tokenizer_model)  # beside the model dir, as Meta ships it

    convert_meta_checkpoint(src, tmp_path / "lit")
    ours = load_model(tmp_path / "lit")
    assert (ours.config.vocab_size, ours.config.n_query_groups, ours.config.intermediate_size) == (VOCAB, n_kv, hidden)
    assert (tmp_path / "lit" / "tokenizer.model").read_bytes() == tokenizer_model

    idx = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ours(idx), hf(idx).logits, rtol=1e-4, atol=1e-4)
