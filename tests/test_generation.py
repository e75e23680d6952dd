import torch

from lit_llama.infer.generation import sample, stream_text


def test_greedy_is_argmax():
    logits = torch.randn(3, 50)
    assert torch.equal(sample(logits, temperature=0.0), logits.argmax(-1))


def _frequencies(logits, n=20000, **kw):
    torch.manual_seed(0)
    draws = sample(logits.expand(n, -1), **kw)
    return torch.bincount(draws, minlength=logits.size(-1)).float() / n


def test_sampling_follows_softmax_with_temperature():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    freq = _frequencies(logits, temperature=0.5)
    expected = torch.softmax(logits[0] / 0.5, -1)
    torch.testing.assert_close(freq, expected, atol=0.015, rtol=0)


def test_top_k_keeps_the_k_most_likely():
    logits = torch.tensor([[3.0, 0.5, 2.0, 1.0, -2.0]])
    freq = _frequencies(logits, temperature=1.0, top_k=2)
    kept = torch.tensor([0, 2])
    expected = torch.zeros(5)
    expected[kept] = torch.softmax(logits[0, kept], -1)
    torch.testing.assert_close(freq, expected, atol=0.015, rtol=0)


def test_top_p_keeps_the_nucleus():
    # probabilities 0.5, 0.3, 0.15, 0.05: top_p=0.7 needs the first two (0.5 < 0.7 <= 0.8)
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    freq = _frequencies(probs.log()[None], temperature=1.0, top_p=0.7)
    expected = torch.tensor([0.5, 0.3, 0.0, 0.0]) / 0.8
    torch.testing.assert_close(freq, expected, atol=0.015, rtol=0)
    # a tiny top_p still keeps the most likely token
    assert torch.equal(_frequencies(probs.log()[None], temperature=1.0, top_p=0.01), torch.tensor([1.0, 0, 0, 0]))


def test_stream_text_reassembles_multibyte_text(default_checkpoint):
    from lit_llama.tokenizer import Tokenizer

    tok = Tokenizer(default_checkpoint)
    text = "Un café à Tōkyō 東京 costs ¥500 🙂 — done.\nNext line"
    ids = tok.encode(text).tolist()
    pieces = list(stream_text(tok.decode, ids))
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)
