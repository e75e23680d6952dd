"""scripts/extend_tokenizer.py: tokens learned from Chinese, Russian and Greek text added to the
embedded SmolLM2's byte-level BPE tokenizer.json and to a SentencePiece model, compared with the
original tokenizers as the `tokenizers` and `sentencepiece` libraries read them."""

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch
from pydoc_data.topics import topics
from tokenizers import Tokenizer as HFTokenizer

from conftest import ROOT, run_script
from lit_llama.data.corpus import prepare_text_folder
from lit_llama.data.vocab import extend_checkpoint
from lit_llama.io.checkpoint import load_config, load_model, save_checkpoint
from lit_llama.model import Config, LLaMA
from lit_llama.tokenizer import Tokenizer
from lit_llama.utils import UserError

DATA = ROOT / "tests" / "data" / "new_language"
LANGUAGES = ("zh", "ru", "el")
HELD_OUT = 2  # passages of each language left out of the corpus, to measure the compression on
ENGLISH = "\n\n".join(topics[k] for k in ("assignment", "if", "for", "while", "with", "class", "function"))
ENV = {"OMP_NUM_THREADS": "1"}


def english_without(strings: list) -> str:
    """pydoc's paragraphs that hold none of `strings` (the guarantee's condition), at least 5,000 characters."""
    text = "\n\n".join(p for p in ENGLISH.split("\n\n") if not any(s in p for s in strings))
    assert len(text) > 5000
    return text


def passages(lang: str) -> list:
    return (DATA / f"{lang}.txt").read_text(encoding="utf-8").splitlines()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Every passage but the last HELD_OUT of each language, one .txt file each."""
    d = tmp_path_factory.mktemp("corpus")
    for lang in LANGUAGES:
        for i, p in enumerate(passages(lang)[:-HELD_OUT]):
            (d / f"{lang}-{i:02d}.txt").write_text(p, encoding="utf-8")
    return d


def held_out(lang: str) -> str:
    return "\n".join(passages(lang)[-HELD_OUT:])


N = 300


@pytest.fixture(scope="module")
def extended(default_checkpoint, corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ext") / "smollm2-extended"
    r = run_script("scripts/extend_tokenizer.py", "--checkpoint_dir", default_checkpoint, "--corpus", corpus,
                   "--num_new_tokens", N, "--output_dir", out, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    print(r.stdout)
    return out


def test_old_ids_unchanged_new_ids_after_them(default_checkpoint, extended):
    base = HFTokenizer.from_file(str(default_checkpoint / "tokenizer.json"))
    tok = Tokenizer(extended)
    old = base.get_vocab_size()
    assert tok.vocabulary()[:old] == [base.id_to_token(i) for i in range(old)]
    new_text = [tok.decode([i]) for i in range(old, old + N)]
    assert tok.vocab_size == old + N and len(set(tok.vocabulary())) == old + N
    # English (pydoc's help topics) without the new tokens' text encodes as before
    english = english_without(new_text)
    assert tok.encode(english, bos=False).tolist() == base.encode(english, add_special_tokens=False).ids
    # so does the new languages' text wherever it holds none of the new tokens: e.g. one character
    for ch in "道水學я λ":
        if not any(ch in t for t in new_text):
            assert tok.encode(ch, bos=False).tolist() == base.encode(ch, add_special_tokens=False).ids
    config = load_config(extended)
    assert config.vocab_size == old + N and config.padded_vocab_size % config.padding_multiple == 0
    assert config.padded_vocab_size >= config.vocab_size


@pytest.mark.parametrize("lang", LANGUAGES)
def test_round_trip_and_fewer_tokens(default_checkpoint, extended, lang):
    base, tok = Tokenizer(default_checkpoint), Tokenizer(extended)
    text = held_out(lang)
    ids = tok.encode(text, bos=False)
    assert tok.decode(ids) == text and base.decode(base.encode(text, bos=False)) == text
    assert tok.decode(tok.encode("\n".join(passages(lang)), bos=False)) == "\n".join(passages(lang))
    ratio = len(ids) / len(base.encode(text, bos=False))
    print(f"{lang}: {len(ids)} tokens extended / {len(base.encode(text, bos=False))} base = {ratio:.2f}")
    assert ratio < {"zh": 0.85, "ru": 0.98, "el": 0.98}[lang]  # a few KB to learn from


def test_logits_of_old_vocabulary_unchanged_new_rows_mean_of_pieces(default_checkpoint, extended):
    a, b = load_model(default_checkpoint), load_model(extended)
    base = HFTokenizer.from_file(str(default_checkpoint / "tokenizer.json"))
    old = base.get_vocab_size()
    x = torch.tensor([base.encode("The quick brown fox jumps over the lazy dog. 道可道", add_special_tokens=False).ids])
    with torch.no_grad():
        la, lb = a(x).float(), b(x).float()
    torch.testing.assert_close(lb[..., :old], la[..., :old])
    assert lb.shape[-1] == load_config(extended).vocab_size == old + N  # the model's output leaves padding out
    wa, wb = a.transformer.wte.weight.float(), b.transformer.wte.weight.float()
    torch.testing.assert_close(wb[:old], wa[:old], rtol=0, atol=0)
    # the new token's row: the mean of the rows of the old tokens its text is split into
    vocab = HFTokenizer.from_file(str(extended / "tokenizer.json")).get_vocab()
    by_id = {i: s for s, i in vocab.items()}
    for i in (old, old + N // 2, old + N - 1):
        pieces = [t.id for t in base.model.tokenize(by_id[i])]
        assert len(pieces) >= 2
        torch.testing.assert_close(wb[i], wa[pieces].mean(0), rtol=1e-2, atol=1e-3)


def test_packed_text_round_trips(extended, tmp_path):
    """scripts/prepare_text_files.py's packing with the extended tokenizer: every passage of the three
    scripts comes back, decoded by the `tokenizers` library from the shard's raw ids."""
    docs = [p for lang in LANGUAGES for p in passages(lang)]
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "passages.jsonl").write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n"
                                                           for d in docs), encoding="utf-8")
    prepare_text_folder(tmp_path / "src", extended, tmp_path / "packed", block_size=32, blocks_per_shard=64,
                        val_fraction=0.0, num_workers=1)
    hf = HFTokenizer.from_file(str(extended / "tokenizer.json"))
    eos = hf.token_to_id(json.loads((extended / "tokenizer_config.json").read_text())["eos_token"])
    shards = sorted((tmp_path / "packed" / "train").glob("*.bin"))
    ids = np.concatenate([np.fromfile(f, dtype="<u2", offset=64) for f in shards])  # 64-byte header, uint16 ids
    assert ids.max() < load_config(extended).vocab_size and (ids >= 49152).sum() > 0  # new tokens in use
    cuts = np.flatnonzero(ids == eos)
    assert len(cuts) == len(docs)
    got = [hf.decode(part.tolist()) for part in np.split(ids, cuts + 1)[:-1]]
    assert [g.removesuffix(hf.id_to_token(eos)) for g in got] == docs  # decoded with or without the EOS


def tiny_checkpoint(d: Path, tokenizer_dir: Path, vocab_size: int, tie: bool) -> Path:
    torch.manual_seed(0)
    model = LLaMA(Config(n_layer=2, n_head=2, n_embd=32, intermediate_size=64, block_size=64,
                         vocab_size=vocab_size, tie_embeddings=tie))
    save_checkpoint(d, model, tokenizer_dir)
    return d


def check_grown(base_dir: Path, out: Path, old: int, n: int, inputs: list) -> None:
    a, b = load_model(base_dir), load_model(out)
    x = torch.tensor([inputs])
    with torch.no_grad():
        torch.testing.assert_close(b(x)[..., :old], a(x)[..., :old])
    config = load_config(out)
    assert (config.vocab_size, config.padded_vocab_size) == (old + n, 64 * -(-(old + n) // 64))
    names = ["transformer.wte.weight"] + ([] if config.tie_embeddings else ["lm_head.weight"])
    assert all(name in b.state_dict() for name in names)
    for name in names:
        wa, wb = a.state_dict()[name], b.state_dict()[name]
        torch.testing.assert_close(wb[:old], wa[:old], rtol=0, atol=0)
        assert wb.shape[0] == config.padded_vocab_size and wb[old: old + n].abs().sum() > 0


def test_untied_head_grows_too(default_checkpoint, corpus, tmp_path):
    base_dir = tiny_checkpoint(tmp_path / "base", default_checkpoint, 49152, tie=False)
    with pytest.raises(UserError, match="already exists"):
        extend_checkpoint(base_dir, corpus, 40, base_dir)  # never over the base, nor any existing folder
    ext = extend_checkpoint(base_dir, corpus, 40, tmp_path / "out")
    check_grown(base_dir, tmp_path / "out", 49152, 40, Tokenizer(base_dir).encode(ENGLISH[:200]).tolist()[:64])
    b = load_model(tmp_path / "out")
    a = load_model(base_dir)
    for i, pieces in enumerate(ext.pieces):
        torch.testing.assert_close(b.lm_head.weight[49152 + i], a.lm_head.weight[pieces].mean(0))


@pytest.fixture(scope="module")
def sentencepiece_dir(tmp_path_factory) -> Path:
    """A LLaMA-style SentencePiece tokenizer (BPE, byte fallback, no normalisation) learned from English."""
    d = tmp_path_factory.mktemp("sp")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(ENGLISH.splitlines() * 3), model_prefix=str(d / "tokenizer"),
                                   vocab_size=600, model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False, minloglevel=2, num_threads=1)
    (d / "tokenizer.vocab").unlink()
    return d


def test_sentencepiece_pieces_appended(sentencepiece_dir, corpus, tmp_path):
    base_sp = spm.SentencePieceProcessor(model_file=str(sentencepiece_dir / "tokenizer.model"))
    old = base_sp.vocab_size()
    base_dir = tiny_checkpoint(tmp_path / "base", sentencepiece_dir, old, tie=True)
    ext = extend_checkpoint(base_dir, corpus, 150, tmp_path / "out")
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "out" / "tokenizer.model"))
    assert sp.vocab_size() == old + 150 and ext.first_id == old
    assert [sp.id_to_piece(i) for i in range(old)] == [base_sp.id_to_piece(i) for i in range(old)]
    assert [sp.get_score(i) for i in range(old)] == [base_sp.get_score(i) for i in range(old)]
    assert all(sp.get_score(i) == 0 for i in range(old, old + 150))  # as Chinese-LLaMA merges them
    new_text = [sp.id_to_piece(i).replace("\u2581", " ") for i in range(old, old + 150)]
    english = english_without(new_text)
    assert sp.encode(english) == base_sp.encode(english)
    tok = Tokenizer(tmp_path / "out")
    for lang in LANGUAGES:
        text = held_out(lang)
        assert tok.decode(tok.encode(text)) == text
        ratio = len(sp.encode(text)) / len(base_sp.encode(text))
        print(f"sentencepiece {lang}: {ratio:.2f} as many tokens")
        assert ratio < {"zh": 0.85, "ru": 0.9, "el": 0.98}[lang]  # Greek: 1 KB of it to learn from
    check_grown(base_dir, tmp_path / "out", old, 150, base_sp.encode(ENGLISH[:200])[:64])


def one_error_line(r) -> str:
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, r.stderr
    return errors[0]


def test_bad_input_one_line_nothing_written(default_checkpoint, corpus, tmp_path):
    no_tok = tiny_checkpoint(tmp_path / "notok", default_checkpoint, 49152, tie=True)
    (no_tok / "tokenizer.json").unlink()
    cases = {
        "zero": (default_checkpoint, corpus, 0, "--num_new_tokens must be at least 1"),
        "negative": (default_checkpoint, corpus, -3, "--num_new_tokens must be at least 1"),
        "too_many": (default_checkpoint, corpus, 100000, "the corpus yields only "),
        "no_tokenizer": (no_tok, corpus, 10, "missing tokenizer.json or tokenizer.model"),
        "no_corpus": (default_checkpoint, tmp_path / "absent", 10, "does not exist"),
    }

    def run(case):
        ckpt, src, n, _ = cases[case]
        return run_script("scripts/extend_tokenizer.py", "--checkpoint_dir", ckpt, "--corpus", src,
                          "--num_new_tokens", n, "--output_dir", tmp_path / case, env=ENV)

    with ThreadPoolExecutor(len(cases)) as pool:
        results = dict(zip(cases, pool.map(run, cases)))
    for case, r in results.items():
        line = one_error_line(r)
        assert cases[case][3] in line, (case, line)
        assert not (tmp_path / case).exists()
        assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(f".{case}")]
    found = int(one_error_line(results["too_many"]).split("yields only ")[1].split()[0])
    assert 0 < found < 100000
