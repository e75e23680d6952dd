"""Checkpoints of integer layers in the low-bit layout: quantize/weight_only.py's output against
`--quantize` at load (the same logits, exactly), loading that maps the file's pages instead of
copying them (RssAnon in /proc/self/status, and the layers' tensors inside a file mapping), the
shard writer against the safetensors package's own reader, and bad use: quantizing twice, a disk
too small, an interrupted run."""

import re
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from conftest import run_script
from lit_llama import cpu_kernels
from lit_llama.infer.load import load_for_inference
from lit_llama.io import checkpoint as ckpt
from lit_llama.io.checkpoint import ShardedWriter, load_safetensors, read_checkpoint_config, read_quantization
from lit_llama.io.gguf import convert_gguf_checkpoint
from lit_llama.quant import weight_only
from lit_llama.quant.weight_only import LowBitLinear, build_lowbit_model, quantize_checkpoint
from lit_llama.utils import UserError

PROMPT = torch.tensor([[1, 530, 2800, 30, 4, 99, 1000, 17, 4242]])


@pytest.fixture(scope="module")
def saved(default_checkpoint, tmp_path_factory):
    """The embedded model quantized once by quantize/weight_only.py, by mode."""
    root = tmp_path_factory.mktemp("saved")
    out = {}
    for mode in ("int8", "int4"):
        r = run_script("quantize/weight_only.py", "--checkpoint_dir", default_checkpoint, "--quantize", mode,
                       "--output_dir", root / mode, timeout=600)
        assert r.returncode == 0, r.stderr
        out[mode] = root / mode
    return out


def model_of(loaded):
    _, model, _ = loaded
    return model.module if hasattr(model, "module") else model


@pytest.mark.parametrize("mode", ["int8", "int4"])
@torch.no_grad()
def test_saved_checkpoint_has_the_logits_of_quantize_at_load(saved, default_checkpoint, mode):
    entry = read_quantization(saved[mode])
    assert entry["method"] == "weight_only" and entry["mode"] == mode
    at_load = model_of(load_for_inference(default_checkpoint, "32-true", quantize=mode))
    once = model_of(load_for_inference(saved[mode], "32-true"))
    assert sum(isinstance(m, LowBitLinear) for m in once.modules()) == 5 * once.config.n_layer + 1
    assert torch.equal(once(PROMPT), at_load(PROMPT))
    # the float model agrees on most next tokens (the quantization is not garbage)
    ref = model_of(load_for_inference(default_checkpoint, "32-true"))(PROMPT).argmax(-1)
    assert (once(PROMPT).argmax(-1) == ref).float().mean() >= 0.6


def test_saved_checkpoint_is_a_quarter_or_an_eighth_of_float32(saved, default_checkpoint):
    size = lambda d: sum(f.stat().st_size for f in Path(d).glob("*.safetensors"))
    full = sum(t.numel() for t in load_safetensors(Path(default_checkpoint) / "lit_model.safetensors").values()) * 4
    # int8: 1 byte a weight (+ scales); int4: half a byte, the tied head/embedding int8 (a fifth of the model)
    assert size(saved["int8"]) < 0.30 * full
    assert size(saved["int4"]) < 0.22 * full


def rss_kb(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def assert_file_backed_load(checkpoint_dir: Path) -> None:
    """Building the model maps the weights: anonymous memory grows by far less than their size, and
    every integer layer's codes lie in a file mapping."""
    assert cpu_kernels.available()
    config, quantization = read_checkpoint_config(checkpoint_dir)
    weights = sum(f.stat().st_size for f in checkpoint_dir.glob("*.safetensors"))
    build_lowbit_model(checkpoint_dir, config, quantization)  # once: the first call's one-time allocations
    before = rss_kb("RssAnon")
    model = build_lowbit_model(checkpoint_dir, config, quantization)
    grown = (rss_kb("RssAnon") - before) * 1024
    assert grown < 0.05 * weights, (grown, weights)
    layers = [m for m in model.modules() if isinstance(m, LowBitLinear)]
    assert layers and all(ckpt._file_backed(m.qweight.data_ptr()) for m in layers)
    with torch.no_grad():  # and they compute: the pages are read from the file
        assert torch.isfinite(model(PROMPT[:, :3])).all()


def test_saved_checkpoint_loads_file_backed(saved):
    assert_file_backed_load(saved["int4"])


def test_kept_gguf_loads_file_backed(default_gguf, tmp_path):
    convert_gguf_checkpoint(default_gguf, tmp_path / "kept", keep_quantized=True)
    assert_file_backed_load(tmp_path / "kept")


def test_quantize_at_load_copies_into_anonymous_memory(default_checkpoint):
    """The reference point of the test above: --quantize at load puts the integers in anonymous memory."""
    model = model_of(load_for_inference(default_checkpoint, "32-true", quantize="int4"))
    layers = [m for m in model.modules() if isinstance(m, LowBitLinear)]
    assert layers and not any(ckpt._file_backed(m.qweight.data_ptr()) for m in layers)


# ---------------------------------------------------------------- the shard writer


def test_shards_read_by_the_safetensors_package(tmp_path):
    """Tensors written one at a time into room-reserved headers: the format's own reader gets them back."""
    from safetensors import safe_open

    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(3, 5, generator=g), "b": torch.randint(0, 255, (7,), dtype=torch.uint8),
               "c": torch.randn(4, 2, generator=g).to(torch.bfloat16), "d": torch.zeros(0), "e": torch.randn(9, 9, generator=g)}
    writer = ShardedWriter(tmp_path, shard_bytes=150)
    for name, t in tensors.items():
        writer.add(name, t)
    writer.close()
    files = sorted(tmp_path.glob("*.safetensors"))
    assert len(files) > 1 and (tmp_path / ckpt.INDEX_FILE).exists()
    got = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            got.update({k: st.get_tensor(k) for k in st.keys()})
    assert got.keys() == tensors.keys()
    for k, t in tensors.items():
        assert torch.equal(got[k], t), k
        assert torch.equal(ckpt.load_state_dict(tmp_path)[k], t), k


# ---------------------------------------------------------------- bad use


def test_quantizing_a_quantized_checkpoint_is_one_error_line(saved):
    r = run_script("quantize/weight_only.py", "--checkpoint_dir", saved["int8"], "--quantize", "int4",
                   "--output_dir", saved["int8"].parent / "again", timeout=300)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode == 1 and len(lines) == 1 and "already quantized" in lines[0], r.stderr
    assert not (saved["int8"].parent / "again").exists()
    r = run_script("generate.py", "--checkpoint_dir", saved["int8"], "--prompt", "Hi", "--quantize", "int8", timeout=300)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode == 1 and len(lines) == 1 and "without --quantize" in lines[0], r.stderr


def test_too_little_disk_is_refused_before_writing(default_checkpoint, tmp_path, monkeypatch):
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**12, 10**12 - 1000, 1000))
    with pytest.raises(UserError, match=r"needs 0\.\d+ GB of disk, .* has 0\.00 GB free"):
        quantize_checkpoint(default_checkpoint, "int4", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("keep", [True, False])
def test_a_conversion_too_big_for_the_disk_is_refused_before_writing(default_gguf, tmp_path, monkeypatch, keep):
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**12, 10**12 - 50_000_000, 50_000_000))
    # the kept file is ~98 MB, its float32 conversion ~540 MB: both need more than 50 MB
    with pytest.raises(UserError, match=r"needs (0\.[5-6]\d|0\.(09|1\d)) GB of disk, .* has 0\.05 GB free"):
        convert_gguf_checkpoint(default_gguf, tmp_path / "out", keep_quantized=keep)
    assert list(tmp_path.iterdir()) == []


def test_an_interrupted_run_leaves_nothing(default_checkpoint, tmp_path, monkeypatch):
    calls = []

    def failing(w, bits, groupsize):
        calls.append(1)
        if len(calls) == 20:
            raise KeyboardInterrupt
        return real(w, bits, groupsize)

    real = weight_only.quantize_rows
    monkeypatch.setattr(weight_only, "quantize_rows", failing)
    with pytest.raises(KeyboardInterrupt):
        quantize_checkpoint(default_checkpoint, "int8", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_an_old_rows_checkpoint_is_one_clear_error(saved, tmp_path):
    """A --keep_quantized checkpoint of the earlier rows format (qweight/scales/zeros, no shape) says
    to convert again, instead of failing on a missing tensor."""
    import json

    old = tmp_path / "old"
    shutil.copytree(saved["int4"], old)
    cfg = json.loads((old / "lit_config.json").read_text())
    layer = next(iter(cfg["quantization"]["layers"]))
    del cfg["quantization"]["layers"][layer]["shape"]
    (old / "lit_config.json").write_text(json.dumps(cfg))
    sd = dict(load_safetensors(old / "lit_model.safetensors"))
    sd[f"{layer}.qweight"] = sd.pop(f"{layer}.codes")
    (tmp_path / "w").mkdir()
    writer = ShardedWriter(tmp_path / "w")
    for k, v in sd.items():
        writer.add(k, v)
    writer.close()
    shutil.move(tmp_path / "w" / "lit_model.safetensors", old / "lit_model.safetensors")
    with pytest.raises(UserError, match="older lit_llama"):
        load_for_inference(old)


def test_a_model_that_does_not_fit_memory_is_refused_before_loading(default_checkpoint, saved, monkeypatch):
    """Copies of the weights (a quantization at load, eager decoding's column-major matrices) that the
    available memory cannot hold are one clear error; a low-bit checkpoint, read in place, still loads."""
    from lit_llama.infer import load

    monkeypatch.setattr(load, "available_memory", lambda: 10**6)  # as the loader sees it
    with pytest.raises(UserError, match=r"with --quantize int8 needs about 0\.\d GB of memory, 0\.0 GB is available"):
        load_for_inference(default_checkpoint, "32-true", quantize="int8")
    with pytest.raises(UserError, match="for eager decoding"):
        load_for_inference(default_checkpoint, "32-true")
    with pytest.raises(UserError, match="in bfloat16"):  # a float32 checkpoint's copy in bfloat16 is smaller, still too big here
        load_for_inference(default_checkpoint, "bf16-true")
    assert isinstance(model_of(load_for_inference(saved["int8"])).lm_head, LowBitLinear)


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_untied_float_embedding_stays_mapped_in_its_dtype(default_checkpoint, tmp_path, dtype):
    """An untied model quantized once: its float embedding is looked up in place in its stored dtype
    (CastEmbedding, file-backed, rows cast to the activations' float32); from float32 the logits are
    those of --quantize at load."""
    from lit_llama.io.checkpoint import save_checkpoint
    from lit_llama.model import LLaMA, Config
    from lit_llama.quant.weight_only import CastEmbedding

    torch.manual_seed(0)
    model = LLaMA(Config.from_name("tiny", vocab_size=49152, n_embd=128, intermediate_size=256))
    sd = {k: v.to(dtype) for k, v in model.state_dict().items()}
    save_checkpoint(tmp_path / "float", model, tokenizer_dir=default_checkpoint, state_dict=sd)
    quantize_checkpoint(tmp_path / "float", "int8", tmp_path / "int8")
    once = model_of(load_for_inference(tmp_path / "int8", "32-true"))
    wte = once.transformer.wte
    assert type(wte) is CastEmbedding and wte.weight.dtype == dtype and ckpt._file_backed(wte.weight.data_ptr())
    idx = torch.tensor([[1, 530, 2800, 30, 4]])
    assert wte(idx).dtype == torch.float32 and torch.equal(wte(idx), sd["transformer.wte.weight"][idx].float())
    if dtype == torch.float32:
        at_load = model_of(load_for_inference(tmp_path / "float", "32-true", quantize="int8"))
        assert torch.equal(once(idx), at_load(idx))
