import json
import subprocess
import sys

import pytest
import torch

from lit_llama.io.checkpoint import (CONFIG_FILE, INDEX_FILE, WEIGHTS_FILE, CheckpointError, load_model,
                                  load_state_dict, save_checkpoint, validate_checkpoint_dir)
from lit_llama.model import Config, LLaMA
from lit_llama.utils import atomic_dir

# parameter counts of the reference models (Hugging Face's model files; 65B from the paper's dimensions)
PUBLISHED = {
    "7B": 6_738_415_616, "13B": 13_015_864_320, "30B": 32_528_943_616, "65B": 65_285_660_672,
    "Llama-2-7b": 6_738_415_616, "Llama-2-13b": 13_015_864_320, "Llama-2-70b": 68_976_648_192,
    "SmolLM2-135M": 134_515_008, "SmolLM2-360M": 361_821_120,
}


@pytest.mark.parametrize("name", PUBLISHED)
def test_config_sizes_match_published_parameter_counts(name):
    with torch.device("meta"):
        model = LLaMA(Config.from_name(name))
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED[name]


def test_llama_hidden_size_formula():
    # LLaMA paper sizes: 256 * ceil(int(8 * dim / 3) / 256)
    assert [Config.from_name(n).intermediate_size for n in ("7B", "13B", "30B", "65B", "Llama-2-70b")] == \
        [11008, 13824, 17920, 22016, 28672]


def test_vocab_is_padded_to_multiple_of_64():
    c = Config.from_name("tiny", vocab_size=1000)
    assert c.padded_vocab_size == 1024
    model = LLaMA(c)
    assert model.transformer.wte.weight.shape[0] == 1024
    assert model(torch.zeros(1, 3, dtype=torch.long)).shape[-1] == 1000


def _tokenizer(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")


@pytest.mark.parametrize("shard_bytes", [1 << 30, 20_000])
def test_save_and_load_roundtrip(tmp_path, shard_bytes, monkeypatch):
    import lit_llama.io.checkpoint as ckpt

    monkeypatch.setattr(ckpt.ShardedWriter.__init__, "__defaults__", (shard_bytes,))
    model = LLaMA(Config.from_name("tiny-gqa"))
    src = tmp_path / "src"
    src.mkdir()
    _tokenizer(src)
    save_checkpoint(tmp_path / "out", model, tokenizer_dir=src)
    out = tmp_path / "out"
    assert (out / INDEX_FILE).exists() == (shard_bytes < 1 << 30)
    assert (out / "tokenizer.json").exists()
    loaded = load_model(out)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    x = torch.randint(0, 500, (1, 7))
    torch.testing.assert_close(loaded(x), model(x))


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_replaces_existing(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old").write_text("x")
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "new").write_text("y")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["new"]


def test_validator_names_what_is_missing(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        validate_checkpoint_dir(tmp_path / "nope")
    with pytest.raises(CheckpointError) as e:
        validate_checkpoint_dir(tmp_path)
    assert CONFIG_FILE in str(e.value) and WEIGHTS_FILE in str(e.value) and "tokenizer" in str(e.value)
    (tmp_path / INDEX_FILE).write_text(json.dumps({"weight_map": {"a": "part-1.safetensors"}}))
    (tmp_path / CONFIG_FILE).write_text("{}")
    _tokenizer(tmp_path)
    with pytest.raises(CheckpointError, match=r"missing part-1\.safetensors$"):
        validate_checkpoint_dir(tmp_path)


def test_wrong_shapes_are_reported(tmp_path):
    save_checkpoint(tmp_path / "out", LLaMA(Config.from_name("tiny")))
    _tokenizer(tmp_path / "out")
    (tmp_path / "out" / CONFIG_FILE).write_text(json.dumps(Config.from_name("tiny", n_embd=32).asdict()))
    with pytest.raises(CheckpointError, match="has shape"):
        load_model(tmp_path / "out")


def test_loading_memory_maps_instead_of_reading(default_checkpoint):
    """Loading the 538 MB default model must not read it into memory: weights are mapped and only
    paged in when used. Peak RSS after loading stays far below the file size over a torch import."""
    code = (
        "import resource, torch; from lit_llama.io.checkpoint import load_model;"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss;"
        f"m = load_model(r'{default_checkpoint}');"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)"
    )
    grown = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    size = (default_checkpoint / WEIGHTS_FILE).stat().st_size
    assert grown < 0.25 * size, f"loading grew RSS by {grown / 1e6:.0f} MB for a {size / 1e6:.0f} MB file"
