"""LoRA and QLoRA: exactness at init, the update against a hand-made weight change, parameter
counts, merging, the LoRA file, training steps, the merge script end to end, and peft."""

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from conftest import run_script
from lit_llama.io.checkpoint import CheckpointError, load_model, save_checkpoint, save_weights_file
from lit_llama.peft.lora import (LORA_FILE, LoRAConfig, LoRALinear, LoRAQKVLinear, add_lora, load_lora, lora_state_dict,
                            merge_lora, save_lora)
from lit_llama.model import Config, LLaMA

ALL = LoRAConfig(r=4, alpha=8, query=True, key=True, value=True, projection=True, mlp=True)
CASES = {"tiny-qv": ("tiny", LoRAConfig()), "gqa-qv": ("tiny-gqa", LoRAConfig()), "gqa-all": ("tiny-gqa", ALL),
         "gqa-k": ("tiny-gqa", LoRAConfig(query=False, key=True, value=False, dropout=0.0))}


def tiny(name: str = "tiny-gqa", seed: int = 0) -> LLaMA:
    torch.manual_seed(seed)
    return LLaMA(Config.from_name(name)).eval()


def tokens(shape=(2, 10), vocab=500) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(1))


def lora_pairs(model: nn.Module):
    """(module, part, A, B) for every adapted matrix; part is "q"/"k"/"v" or None."""
    for m in model.modules():
        if isinstance(m, LoRAQKVLinear):
            yield from ((m, p, m.lora_A[p], m.lora_B[p]) for p in m.lora_A)
        elif isinstance(m, LoRALinear):
            yield m, None, m.lora_A, m.lora_B


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    # B = 0 would make every update zero; give B values as a few training steps would
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, A, B in lora_pairs(model):
            B.copy_(0.05 * torch.randn(B.shape, generator=g))
    return model


def lora_model(name: str, config: LoRAConfig, seed: int = 0) -> LLaMA:
    return randomize(add_lora(tiny(name, seed), config), seed + 1)


@pytest.mark.parametrize("case", CASES)
@torch.no_grad()
def test_logits_equal_the_base_at_init(case):
    name, config = CASES[case]
    base = tiny(name)
    x = tokens()
    assert torch.equal(add_lora(copy.deepcopy(base), config)(x), base(x))


def expected_trainable(c: Config, lc: LoRAConfig) -> int:
    hs, r = c.head_size, lc.r
    q, kv = c.n_head * hs, c.n_query_groups * hs
    per_layer = r * (c.n_embd + q) * lc.query + r * (c.n_embd + kv) * (lc.key + lc.value)
    per_layer += r * (q + c.n_embd) * lc.projection
    per_layer += r * 3 * (c.n_embd + c.intermediate_size) * lc.mlp
    return c.n_layer * per_layer


@pytest.mark.parametrize("case", CASES)
def test_only_lora_is_trainable_and_counts_follow_the_formula(case):
    name, config = CASES[case]
    model = add_lora(tiny(name), config)
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A" in n or ".lora_B" in n for n in trainable)
    assert sum(trainable.values()) == expected_trainable(model.config, config)
    assert set(lora_state_dict(model)) == set(trainable)
    assert model.lora_config == config


def test_7b_query_value_count_is_alpaca_loras():
    with torch.device("meta"):
        model = add_lora(LLaMA(Config.from_name("7B")), LoRAConfig())
    # Alpaca-LoRA's "trainable params: 4194304" (r=8 on q_proj and v_proj)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 4_194_304
    assert model.transformer.h[0].attn.c_attn.lora_A["q"].is_meta


@pytest.mark.parametrize("case", ["tiny-qv", "gqa-qv", "gqa-all"])
@torch.no_grad()
def test_forward_equals_base_with_updated_weights(case):
    """The reference is a plain model whose weights get scale * B @ A added by hand, each q/k/v
    part into its own rows of the fused c_attn weight."""
    name, config = CASES[case]
    model = lora_model(name, config)
    ref = tiny(name)
    c = ref.config
    q, kv = c.n_head * c.head_size, c.n_query_groups * c.head_size
    rows = {"q": slice(0, q), "k": slice(q, q + kv), "v": slice(q + kv, q + 2 * kv)}
    s = config.alpha / config.r
    for block, lora_block in zip(ref.transformer.h, model.transformer.h):
        a = lora_block.attn.c_attn
        for p in a.lora_A:
            block.attn.c_attn.weight[rows[p]] += s * a.lora_B[p] @ a.lora_A[p]
        for parent, lora_parent, names in ((block.attn, lora_block.attn, ["c_proj"]),
                                           (block.mlp, lora_block.mlp, ["c_fc1", "c_fc2", "c_proj"])):
            for n in names:
                m = getattr(lora_parent, n)
                if isinstance(m, LoRALinear):
                    getattr(parent, n).weight += s * m.lora_B @ m.lora_A
    x = tokens()
    out, expected = model(x), ref(x)
    assert not torch.allclose(expected, tiny(name)(x), atol=1e-3)  # the update does change the logits
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_query_value_lora_leaves_keys_exactly_as_the_base():
    model = lora_model("tiny-gqa", LoRAConfig())
    c = model.config
    h = torch.randn(2, 5, c.n_embd)
    attn = model.transformer.h[0].attn.c_attn
    q, kv = c.n_head * c.head_size, c.n_query_groups * c.head_size
    out, base = attn(h), attn.base(h)
    assert torch.equal(out[..., q:q + kv], base[..., q:q + kv])
    assert not torch.allclose(out[..., :q], base[..., :q])


@pytest.mark.parametrize("case", ["tiny-qv", "gqa-all"])
@torch.no_grad()
def test_merge_gives_the_same_logits_and_the_base_keys(case):
    name, config = CASES[case]
    model = lora_model(name, config)
    x = tokens()
    unmerged = model(x)
    merged = merge_lora(model)
    torch.testing.assert_close(merged(x), unmerged, rtol=1e-5, atol=1e-5)
    assert list(merged.state_dict()) == list(tiny(name).state_dict())
    assert not any(isinstance(m, (LoRALinear, LoRAQKVLinear)) for m in merged.modules())
    assert merged.lora_config is None


@pytest.mark.parametrize("case", ["gqa-qv", "gqa-all"])
@torch.no_grad()
def test_save_and_load_roundtrip(tmp_path, case):
    name, config = CASES[case]
    model = lora_model(name, config)
    path = save_lora(model, tmp_path)
    assert path == tmp_path / LORA_FILE
    x = tokens()
    for where in (tmp_path, path):  # the folder or the file
        loaded = load_lora(tiny(name), where)
        assert loaded.lora_config == config
        assert torch.equal(loaded(x), model(x))
    # a model that already has the same LoRA just gets the weights (resuming)
    assert torch.equal(load_lora(add_lora(tiny(name), config), path)(x), model(x))


def test_loading_onto_another_base_or_bad_tensors_is_a_clear_error(tmp_path):
    path = save_lora(lora_model("tiny-gqa", LoRAConfig()), tmp_path)
    with pytest.raises(CheckpointError, match="LoRA for another base model: .*n_query_groups=2"):
        load_lora(tiny("tiny"), path)
    with pytest.raises(CheckpointError, match="LoRA for another base model"):
        load_lora(LLaMA(Config.from_name("tiny-gqa", n_layer=1)), path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_lora(tiny(), tmp_path / "nothing")
    # same base config, wrong tensor shape
    model = lora_model("tiny-gqa", LoRAConfig())
    tensors = lora_state_dict(model)
    k = "transformer.h.0.attn.c_attn.lora_A.q"
    tensors[k] = torch.zeros(3, 64)
    meta = {**LoRAConfig().__dict__, "base": model.config.asdict()}
    save_weights_file(tmp_path / "bad.safetensors", tensors, meta)
    plain = tiny()
    with pytest.raises(CheckpointError, match=r"lora_A.q has shape \(3, 64\)"):
        load_lora(plain, tmp_path / "bad.safetensors")
    assert getattr(plain, "lora_config", None) is None and type(plain.transformer.h[0].attn.c_attn) is nn.Linear
    save_weights_file(tmp_path / "plain.safetensors", tensors, {"something": 1})
    with pytest.raises(CheckpointError, match="not a LoRA file"):
        load_lora(tiny(), tmp_path / "plain.safetensors")


def train(model: LLaMA, steps: int = 8, lr: float = 1e-2):
    """Losses of `steps` AdamW steps on one fixed batch (next-token prediction)."""
    model.train()
    x = tokens((4, 16))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        logits = model(x[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_training_lowers_the_loss_and_changes_only_lora():
    model = add_lora(tiny(), LoRAConfig())
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    losses = train(model)
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(torch.equal(model.state_dict()[k], v) for k, v in frozen.items())


# ---------------------------------------------------------------- QLoRA


@pytest.mark.parametrize("mode", ["nf4", "fp4"])
def test_qlora_forward_frozen_weights_and_training(mode):
    pytest.importorskip("bitsandbytes")
    from bitsandbytes.nn import Linear4bit

    from lit_llama.quant.bnb import quantize_linears

    base = tiny("tiny")  # untied: has an lm_head
    x = tokens()
    with torch.no_grad():
        ref = base(x)
    model = add_lora(quantize_linears(copy.deepcopy(base), mode), LoRAConfig())
    linears = [m for m in model.transformer.h.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 2 * 5 and all(isinstance(m, Linear4bit) for m in linears)
    assert type(model.lm_head) is nn.Linear  # the head stays full precision
    assert type(model.transformer.h[0].attn.c_attn.base) is Linear4bit
    assert all(not m.weight.requires_grad for m in linears)
    assert all(".lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    with torch.no_grad():
        out = model(x)
    # 4-bit weights err by ~10%, and so do the logits here (nf4 0.10, fp4 0.16); a misplaced or
    # wrongly scaled weight would give errors of order 1
    assert (out - ref).norm() / ref.norm() < 0.25
    losses = train(model)
    assert losses[-1] < losses[0] - 0.05, losses


@torch.no_grad()
def test_qlora_merge_dequantizes_and_keeps_the_logits():
    pytest.importorskip("bitsandbytes")
    from bitsandbytes.nn import Linear4bit

    from lit_llama.quant.bnb import quantize_linears

    model = randomize(add_lora(quantize_linears(tiny(), "nf4"), LoRAConfig()))
    x = tokens()
    unmerged = model(x)
    merged = merge_lora(model)
    # the adapted layers are dequantized with the update folded in; the others stay 4-bit
    c_attn = [b.attn.c_attn for b in merged.transformer.h]
    assert all(type(m) is nn.Linear and m.weight.dtype == torch.float32 for m in c_attn)
    assert type(merged.transformer.h[0].attn.c_proj) is Linear4bit
    torch.testing.assert_close(merged(x), unmerged, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(96, 64), (40, 64), (96, 176)])  # (out, in): whole 32-row tiles or not
def test_4bit_layer_keeps_the_generic_cpu_path(shape):
    """bitsandbytes, on CPUs with AVX512-BF16 (this kind of machine, not an AVX2-only one), would
    repack a Linear4bit's weight at its first inference forward for a bfloat16 kernel: that fails
    on shapes that are not whole 32-row tiles with whole 64-weight scale blocks, and it is one-way,
    leaving a layer with no backward for the training steps after an evaluation pass. Our layers
    keep the generic path on every CPU: any shape runs, in float32, and trains after evaluating."""
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as bnbF

    from lit_llama.quant.bnb import quantize_linears
    from lit_llama.quant.quantization import dequantize_weight

    torch.manual_seed(0)
    out_features, in_features = shape
    block = nn.Sequential(nn.Linear(in_features, out_features))
    model = nn.Module()
    model.transformer = nn.Module()
    model.transformer.h = nn.ModuleList([block])
    quantize_linears(model, "nf4")
    layer = block[0]
    w = bnbF.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    x = torch.randn(3, in_features)
    with torch.no_grad():
        y = layer.eval()(x)
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    torch.testing.assert_close(y, x @ w.T + layer.bias, rtol=1e-5, atol=1e-5)
    assert torch.equal(dequantize_weight(layer), w)
    # training after the evaluation pass: the gradient reaches the layer's input
    x.requires_grad_(True)
    layer.train()(x).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, 2 * (x @ w.T + layer.bias).detach() @ w, rtol=1e-4, atol=1e-4)


def test_quantize_rejects_unknown_modes():
    from lit_llama.quant.bnb import quantize_linears
    from lit_llama.utils import UserError

    with pytest.raises(UserError, match="unknown quantization mode 'int3'"):
        quantize_linears(tiny(), "int3")


# ---------------------------------------------------------------- scripts/merge_lora.py


def write_tokenizer(folder: Path, vocab: int = 500) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))


@pytest.fixture
def base_dir(tmp_path) -> Path:
    src = tmp_path / "tok"
    src.mkdir()
    write_tokenizer(src)
    save_checkpoint(tmp_path / "base", tiny(), tokenizer_dir=src)
    return tmp_path / "base"


def test_merge_script_writes_a_checkpoint_with_the_lora_logits(tmp_path, base_dir):
    model = randomize(add_lora(load_model(base_dir), ALL))
    save_lora(model, tmp_path / "lora")
    r = run_script("scripts/merge_lora.py", "--checkpoint_dir", base_dir, "--lora_path", tmp_path / "lora",
                   "--output_dir", tmp_path / "merged")
    assert r.returncode == 0, r.stderr
    merged = load_model(tmp_path / "merged")
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
    assert json.loads((tmp_path / "merged" / "lit_config.json").read_text()) == model.config.asdict()
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(merged(x), model.eval()(x), rtol=1e-5, atol=1e-5)
    r = run_script("generate.py", "--checkpoint_dir", tmp_path / "merged", "--prompt", "t1 t2 t3",
                   "--max_new_tokens", "3", "--temperature", "0")
    assert r.returncode == 0, r.stderr


def test_merge_script_bad_input_is_one_error_line(tmp_path, base_dir):
    save_lora(lora_model("tiny", LoRAConfig()), tmp_path / "other")  # tiny is not tiny-gqa
    cases = [(tmp_path / "other", "LoRA for another base model"), (tmp_path / "nothing", "does not exist")]
    for lora, message in cases:
        r = run_script("scripts/merge_lora.py", "--checkpoint_dir", base_dir, "--lora_path", lora,
                       "--output_dir", tmp_path / "out")
        assert r.returncode != 0
        assert r.stderr.startswith("error:") and message in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- against peft


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers' deprecations, called by peft
@torch.no_grad()
def test_matches_peft_on_transformers_llama(tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import LlamaConfig, LlamaForCausalLM

    from lit_llama.io.convert import convert_hf_checkpoint

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      rms_norm_eps=1e-5, tie_word_embeddings=False,
                                      attn_implementation="eager")).float().eval()
    for p in hf.parameters():  # larger than HF's init, so that attention is far from uniform
        p.copy_(0.3 * torch.randn_like(p) if p.dim() > 1 else 1 + 0.3 * torch.randn_like(p))
    hf.save_pretrained(tmp_path / "hf")
    write_tokenizer(tmp_path / "hf", 320)
    convert_hf_checkpoint(tmp_path / "hf", tmp_path / "lit")
    targets = ["q_proj", "v_proj", "o_proj", "up_proj"]
    hf = peft.get_peft_model(hf, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                                 target_modules=targets, init_lora_weights=True)).eval()
    ours = add_lora(load_model(tmp_path / "lit"), LoRAConfig(projection=True, mlp=True)).eval()
    x = tokens(vocab=320)
    at_init = hf(x).logits
    torch.testing.assert_close(ours(x), at_init, rtol=1e-4, atol=1e-4)  # both start at B = 0

    # random updates in peft, copied into ours; our c_fc1 and mlp.c_proj LoRA, which peft's has
    # not, keep B = 0
    g = torch.Generator().manual_seed(2)
    for n, p in hf.named_parameters():
        if "lora_B" in n:
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    for i, layer in enumerate(hf.base_model.model.model.layers):
        block = ours.transformer.h[i]
        pairs = {(block.attn.c_attn, "q"): layer.self_attn.q_proj, (block.attn.c_attn, "v"): layer.self_attn.v_proj,
                 (block.attn.c_proj, None): layer.self_attn.o_proj, (block.mlp.c_fc2, None): layer.mlp.up_proj}
        for (m, part), theirs in pairs.items():
            A = m.lora_A[part] if part else m.lora_A
            B = m.lora_B[part] if part else m.lora_B
            A.copy_(theirs.lora_A["default"].weight)
            B.copy_(theirs.lora_B["default"].weight)
    expected = hf(x).logits
    assert not torch.allclose(expected, at_init, atol=1e-2)
    torch.testing.assert_close(ours(x), expected, rtol=1e-4, atol=1e-4)
