"""Our model, converted from Hugging Face folders, against transformers' LlamaForCausalLM.

The reference is transformers' own implementation, so a wrong rotary layout, q/k/v order, norm
mapping, GQA grouping or vocabulary padding shows up as different logits."""

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lit_llama.io.checkpoint import load_model
from lit_llama.io.convert import convert_hf_checkpoint

# name: (num_key_value_heads, tied, rope_theta, vocab_size, how the weights are saved)
CASES = {
    "mha-untied": (4, False, 10000.0, 320, "safetensors"),  # 320: already a multiple of 64
    "gqa-tied-sharded": (2, True, 500000.0, 300, "sharded"),  # 300: padded to 320
    "mqa-untied-bin": (1, False, 500000.0, 300, "bin"),
}
# logits are of order 1-10 here; fp32 sums in another order differ by ~1e-5, a wrong layout by >1e-2
TOL = dict(rtol=1e-4, atol=1e-4)


def tiny_hf_model(n_kv: int, tied: bool, theta: float, vocab: int, seed: int = 0, **config) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(**{**dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=n_kv, rope_theta=theta,
                                   tie_word_embeddings=tied, max_position_embeddings=64, rms_norm_eps=1e-5,
                                   attn_implementation="eager"), **config})
    model = LlamaForCausalLM(config).float().eval()
    # HF's init (std 0.02, norms at 1) leaves attention nearly uniform and every norm alike, which
    # would hide rotary or norm-mapping mistakes: larger weights and random norm scales expose them
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.3 * torch.randn_like(p) if "norm" in name else 0.3 * torch.randn_like(p))
    return model


def write_tokenizer(folder: Path, vocab: int) -> None:
    # the converter only copies the tokenizer; a word-level one with the model's vocabulary will do
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0")).save(str(folder / "tokenizer.json"))


def save_hf(model: LlamaForCausalLM, folder: Path, how: str) -> None:
    if how == "bin":
        # transformers 5 writes safetensors only; older exports have a pytorch_model.bin, the
        # oldest in torch's legacy (non-zip, not memory-mappable) format, as written here
        model.config.save_pretrained(folder)
        torch.save(model.state_dict(), folder / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    else:
        model.save_pretrained(folder, max_shard_size="20KB" if how == "sharded" else "5GB")
    write_tokenizer(folder, model.config.vocab_size)


@pytest.fixture(scope="module", params=list(CASES))
def converted(request, tmp_path_factory):
    """(HF reference model, our converted model) for one case."""
    n_kv, tied, theta, vocab, how = CASES[request.param]
    hf = tiny_hf_model(n_kv, tied, theta, vocab)
    root = tmp_path_factory.mktemp(request.param)
    save_hf(hf, root / "hf", how)
    if how == "sharded":
        assert (root / "hf" / "model.safetensors.index.json").is_file()
    convert_hf_checkpoint(root / "hf", root / "lit")
    return hf, load_model(root / "lit")


def tokens(vocab: int, shape=(2, 12)) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def test_logits_match_transformers(converted):
    hf, ours = converted
    c = hf.config
    assert ours.config.vocab_size == c.vocab_size
    assert ours.config.padded_vocab_size % 64 == 0 and ours.config.padded_vocab_size >= c.vocab_size
    assert ours.config.n_query_groups == c.num_key_value_heads
    assert ours.config.rope_base == c.rope_parameters["rope_theta"]
    assert (ours.lm_head is None) == c.tie_word_embeddings
    idx = tokens(c.vocab_size)
    torch.testing.assert_close(ours(idx), hf(idx).logits, **TOL)


@torch.no_grad()
def test_kv_cache_decoding_matches_full_forward(converted):
    """Prefill a prompt, then feed one token at a time: each step's logits equal those of
    transformers' full forward pass at the same position."""
    hf, ours = converted
    idx = tokens(hf.config.vocab_size)
    expected = hf(idx).logits
    prompt = 5
    ours.set_kv_cache(batch_size=idx.size(0), max_seq_length=16)
    try:
        # a fresh prompt (causal over itself), a chunk after it (masked over the cache), single tokens
        steps = [ours(idx[:, :prompt], input_pos=torch.arange(prompt)),
                 ours(idx[:, prompt:prompt + 3], input_pos=torch.arange(prompt, prompt + 3))]
        for t in range(prompt + 3, idx.size(1)):
            steps.append(ours(idx[:, t:t + 1], input_pos=torch.tensor([t])))
    finally:
        ours.clear_kv_cache()
    torch.testing.assert_close(torch.cat(steps, dim=1), expected, **TOL)


@torch.no_grad()
def test_comparison_is_sensitive_to_rope(converted):
    """Guards the tests above: with another rotary base the logits must differ from the reference,
    so the weights are not so small that attention ignores positions."""
    hf, ours = converted
    idx = tokens(hf.config.vocab_size)
    base = ours.config.rope_base
    ours.config.rope_base = base * 3
    try:
        diff = (ours(idx) - hf(idx).logits).abs().max().item()
    finally:
        ours.config.rope_base = base
    assert diff > 1e-2


def test_dtype_conversion(tmp_path):
    hf = tiny_hf_model(2, True, 10000.0, 300)
    save_hf(hf, tmp_path / "hf", "safetensors")
    convert_hf_checkpoint(tmp_path / "hf", tmp_path / "lit", dtype="bfloat16")
    ours = load_model(tmp_path / "lit")
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    assert json.loads((tmp_path / "lit" / "lit_config.json").read_text())["tie_embeddings"] is True
    assert (tmp_path / "lit" / "tokenizer.json").is_file()


@torch.no_grad()
def test_download_fetches_and_converts(tmp_path, monkeypatch):
    """download_hf with a stand-in for the hub that serves a saved folder: it must ask for the
    config, tokenizer and model*.safetensors (not a duplicate consolidated.safetensors), then
    convert what arrived."""
    import fnmatch
    import shutil
    from types import SimpleNamespace

    import huggingface_hub

    from lit_llama.io.download import download_hf

    hf = tiny_hf_model(2, False, 10000.0, 300)
    save_hf(hf, tmp_path / "hub", "safetensors")
    shutil.copyfile(tmp_path / "hub" / "model.safetensors", tmp_path / "hub" / "consolidated.safetensors")
    served = sorted(p.name for p in (tmp_path / "hub").iterdir())

    class FakeApi:
        def __init__(self, token=None):
            pass

        def model_info(self, repo_id):
            return SimpleNamespace(siblings=[SimpleNamespace(rfilename=f) for f in served])

    def fake_snapshot_download(repo_id, local_dir, token, allow_patterns):
        Path(local_dir).mkdir(parents=True)
        for f in served:
            if any(fnmatch.fnmatch(f, p) for p in allow_patterns):
                shutil.copyfile(tmp_path / "hub" / f, Path(local_dir) / f)
        return str(local_dir)

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.chdir(tmp_path)
    out = download_hf("org/tiny-llama")
    assert out == Path("checkpoints/tiny-llama")
    fetched = sorted(p.name for p in (tmp_path / "checkpoints/hf/org/tiny-llama").iterdir())
    assert fetched == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json"]
    idx = tokens(300)
    torch.testing.assert_close(load_model(out)(idx), hf(idx).logits, **TOL)


# RoPE scaling, Llama 3's and the long-context kinds: (rope_parameters, max_position_embeddings,
# head_dim), with inputs of 80 tokens, past each one's original context (32). head_dim 32 with 4
# heads of a 64-wide model: heads wider than n_embd / n_head, as some published models have.
# llama3 at base 1e4 and original context 32 keeps one frequency, blends two, scales the rest.
SCALED = {
    "llama3": ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32}, 128, 32),
    "linear": ({"rope_type": "linear", "factor": 4.0}, 128, None),
    "dynamic": ({"rope_type": "dynamic", "factor": 4.0}, 32, 8),
    # YaRN with its defaults (beta 32/1, attention factor 0.1 ln 4 + 1), and with every knob set
    "yarn": ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}, 128, None),
    "yarn-mscale": ({"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32, "beta_fast": 16.0,
                     "beta_slow": 2.0, "mscale": 0.8, "mscale_all_dim": 0.5, "truncate": False}, 256, 32),
}


@pytest.fixture(scope="module", params=list(SCALED))
def scaled(request, tmp_path_factory):
    rope, context, head_dim = SCALED[request.param]
    hf = tiny_hf_model(2, False, 10000.0, 300, rope_parameters={**rope, "rope_theta": 10000.0},
                       max_position_embeddings=context, head_dim=head_dim or 16)
    root = tmp_path_factory.mktemp(request.param)
    save_hf(hf, root / "hf", "safetensors")
    convert_hf_checkpoint(root / "hf", root / "lit")
    return request.param, hf, load_model(root / "lit")


@torch.no_grad()
def test_rope_scaling_matches_transformers(scaled):
    kind, hf, ours = scaled
    assert ours.config.rope_scaling["type"] == kind.split("-")[0]
    assert ours.config.head_size == hf.config.head_dim
    # dynamic stretches the context it was given (transformers' max_position_embeddings) by its factor
    assert ours.config.block_size == (128 if kind == "dynamic" else hf.config.max_position_embeddings)
    idx = tokens(300, (2, 80))
    expected = hf(idx).logits
    torch.testing.assert_close(ours(idx), expected, **TOL)
    # guard: the scaling changes these logits, so the comparison above checks it
    scaling, ours.config.rope_scaling = ours.config.rope_scaling, None
    try:
        assert (ours(idx) - expected).abs().max().item() > 1e-2
    finally:
        ours.config.rope_scaling = scaling


@torch.no_grad()
def test_rope_scaling_kv_cache_decoding(scaled):
    """Prefill and single-token steps past the original context equal transformers' full forward:
    the scaled angles depend on the position only (dynamic: on the longest position so far, which
    is not the full forward's, so it is left out)."""
    kind, hf, ours = scaled
    if kind == "dynamic":
        return
    idx = tokens(300, (1, 48))
    expected = hf(idx).logits
    ours.set_kv_cache(batch_size=1, max_seq_length=48)
    try:
        steps = [ours(idx[:, :30], input_pos=torch.arange(30))]
        steps += [ours(idx[:, t:t + 1], input_pos=torch.tensor([t])) for t in range(30, 48)]
    finally:
        ours.clear_kv_cache()
    torch.testing.assert_close(torch.cat(steps, dim=1), expected, **TOL)


def test_hf_config_roundtrip_keeps_rope_scaling(tmp_path):
    """The config.json our exporter writes gives back the same Config (the scaling and head size
    included), and transformers reads the same rope parameters from it."""
    from lit_llama.io.convert import hf_config
    from lit_llama.io.export import hf_config_dict
    from lit_llama.model import Config

    for name in ("Llama-3.2-1B", "CodeLlama-7b"):
        config = Config.from_name(name)
        tok = type("Tok", (), {"bos_id": 1, "eos_id": 2})()
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(hf_config_dict(config, torch.float32, tok)))
        padding = ("padding_multiple", "padded_vocab_size")  # the converter pads to 64 rows
        drop = lambda c: {k: v for k, v in c.asdict().items() if k not in padding}
        assert drop(hf_config(folder, name)) == drop(config)
        hf = LlamaConfig.from_pretrained(folder)
        assert hf.rope_parameters["rope_theta"] == config.rope_base
        assert hf.rope_parameters["rope_type"] == (config.rope_scaling or {"type": "default"})["type"]


@pytest.mark.parametrize("change, message", [
    ({"rope_parameters": {"rope_type": "longrope", "factor": 4.0, "rope_theta": 1e4}}, "rope scaling 'longrope' is not supported"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "lacks low_freq_factor"),
    ({"architectures": ["MistralForCausalLM"], "model_type": "mistral", "sliding_window": 4096},
     "sliding-window attention"),
    ({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}, "Qwen2ForCausalLM (model_type 'qwen2') is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
])
def test_unsupported_configs_are_one_clear_error(tmp_path, change, message):
    from lit_llama.utils import UserError

    hf = tiny_hf_model(2, False, 10000.0, 300)
    save_hf(hf, tmp_path / "hf", "safetensors")
    path = tmp_path / "hf" / "config.json"
    c = json.loads(path.read_text())
    if "rope_scaling" in change:  # the transformers 4.x key alone
        c.pop("rope_parameters", None)
    path.write_text(json.dumps({**c, **change}))
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        convert_hf_checkpoint(tmp_path / "hf", tmp_path / "lit")
    assert not (tmp_path / "lit").exists()


# published parameter counts (the models' safetensors headers), on the meta device: no memory
PUBLISHED = {"Llama-3.2-1B": 1_235_814_400, "Llama-3.2-3B": 3_212_749_824, "Llama-3.1-8B": 8_030_261_248,
             "Llama-3.1-70B": 70_553_706_496, "CodeLlama-7b": 6_738_546_688, "TinyLlama-1.1B": 1_100_048_384}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_named_configs_have_the_published_sizes(name):
    from lit_llama.model import LLaMA, Config

    with torch.device("meta"):
        model = LLaMA(Config.from_name(name))
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED[name]
