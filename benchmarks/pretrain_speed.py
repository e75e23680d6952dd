"""Pretraining speed: training tokens/s of lit_llama's LLaMA against transformers' LlamaForCausalLM
and litgpt's GPT, built from one config (LLaMA architecture: RMSNorm, SwiGLU, RoPE, no biases,
untied embeddings), randomly initialised, with the same batch, precision, loss and optimizer.

One training step = forward, float32 cross-entropy over the logits, backward, AdamW step (torch's
default implementation), zero_grad. Each system is built fresh in every round, warmed up, then timed
over --steps steps; the rounds interleave the systems so that a noisy (shared) machine slows all of
them alike, and the table gives the median and the spread over rounds. With a GPU whose peak FLOP/s
lit_llama.train.loop knows (A100, H100, H200, L4), it adds the MFU: model FLOPs per token
(lit_llama.train.loop.flops_per_token, PaLM's count) x tokens/s / peak.

    python benchmarks/pretrain_speed.py                          # CPU: a small LLaMA, fp32
    python benchmarks/pretrain_speed.py --preset 1b --device cuda --precision bf16-true   # ~1.1B

litgpt comes from PyPI (`pip install litgpt --no-deps`: its own pins would downgrade huggingface_hub
and jsonargparse, which transformers and this project need newer; torch stays as it is). Without it,
its row says so.
"""

import statistics
import sys
import time
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F

from lit_llama.model import Config, LLaMA
from lit_llama.train.loop import flops_per_token, peak_flops

PRESETS = {
    # a small LLaMA that a 2-core CPU steps through in about a second
    "small": dict(n_layer=4, n_embd=256, n_head=8, n_query_groups=8, vocab_size=32000, block_size=256,
                  micro_batch_size=4),
    # TinyLlama-1.1B's shape (grouped-query attention, 4 key/value heads)
    "1b": dict(n_layer=22, n_embd=2048, n_head=32, n_query_groups=4, intermediate_size=5632, vocab_size=32000,
               block_size=2048, micro_batch_size=8),
}


def lit_config(p: dict):
    keys = ("n_layer", "n_embd", "n_head", "n_query_groups", "intermediate_size", "vocab_size", "block_size")
    return Config(name="bench", padding_multiple=1, **{k: p[k] for k in keys if p.get(k) is not None})


def build_lit_llama(c):
    return LLaMA(c)


def build_transformers(c):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.n_embd, intermediate_size=c.intermediate_size,
                      num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.n_query_groups,
                      max_position_embeddings=c.block_size, rms_norm_eps=c.norm_eps, tie_word_embeddings=False,
                      attention_bias=False, mlp_bias=False, use_cache=False)
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg)
    return lambda x: model(input_ids=x, use_cache=False).logits, model


def build_litgpt(c):
    from litgpt import Config
    from litgpt.model import GPT

    cfg = Config(name="bench", block_size=c.block_size, vocab_size=c.vocab_size, padded_vocab_size=c.vocab_size,
                 n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, n_query_groups=c.n_query_groups,
                 rotary_percentage=1.0, parallel_residual=False, bias=False, norm_class_name="RMSNorm",
                 norm_eps=c.norm_eps, mlp_class_name="LLaMAMLP", intermediate_size=c.intermediate_size,
                 rope_base=int(c.rope_base))
    return GPT(cfg)


SYSTEMS: Dict[str, Callable] = {"lit_llama": build_lit_llama, "transformers": build_transformers,
                                "litgpt": build_litgpt}


def unavailable(name: str) -> Optional[str]:
    try:
        __import__({"lit_llama": "lit_llama.model", "transformers": "transformers", "litgpt": "litgpt.model"}[name])
    except ImportError as e:
        return f"not installed ({e.name}); pip install {name}" + (" --no-deps" if name == "litgpt" else "")
    return None


def make(name: str, config, device, dtype):
    with torch.device(device):
        built = SYSTEMS[name](config)
    forward, module = built if isinstance(built, tuple) else (built, built)
    module.to(dtype=dtype).train()
    return forward, module


def time_steps(forward, module, x, steps: int, warmup: int, autocast: bool) -> tuple:
    """(wall-clock seconds, this process's CPU seconds) per training step, after `warmup` untimed
    steps. On a shared CPU the CPU time is the steadier measure of the work a step takes."""
    opt = torch.optim.AdamW(module.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)

    def step():
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = forward(x[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    sync()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    sync()
    return (time.perf_counter() - t0) / steps, (time.process_time() - c0) / steps


def main(preset: str = "small", device: str = "cpu", precision: str = "32-true", steps: int = 5, warmup: int = 2,
         rounds: int = 3, micro_batch_size: Optional[int] = None, block_size: Optional[int] = None,
         compile: bool = False, threads: Optional[int] = None) -> None:
    """Print a markdown table of training tokens/s per system.

    Args:
        preset: the model shape: small (CPU) or 1b (GPU).
        device: cpu or cuda.
        precision: 32-true, bf16-true (weights and optimizer in bf16) or bf16-mixed (autocast).
        steps: timed training steps per round and system.
        warmup: untimed steps before them.
        rounds: rounds over all systems (median and spread reported).
        micro_batch_size: sequences per step (default: the preset's).
        block_size: tokens per sequence (default: the preset's).
        compile: torch.compile each model.
        threads: torch CPU threads (default: torch's).
    """
    if threads:
        torch.set_num_threads(threads)
    p = dict(PRESETS[preset])
    B, T = micro_batch_size or p["micro_batch_size"], block_size or p["block_size"]
    config = lit_config({**p, "block_size": T})
    dtype = torch.bfloat16 if precision == "bf16-true" else torch.float32
    dev = torch.device(device)
    x = torch.randint(0, config.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(0)).to(dev)
    fpt = flops_per_token(config, T)
    peak = peak_flops(dev, precision)
    names = [n for n in SYSTEMS if unavailable(n) is None]
    times: Dict[str, list] = {n: [] for n in names}  # (wall, cpu) seconds per step, per round
    params: Dict[str, int] = {}
    for r in range(rounds):
        for name in names:
            torch.manual_seed(r)
            forward, module = make(name, config, dev, dtype)
            params[name] = sum(q.numel() for q in module.parameters())
            if compile:
                forward = torch.compile(forward)
            times[name].append(time_steps(forward, module, x, steps, warmup, precision == "bf16-mixed"))
            del forward, module
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            print(f"round {r + 1}/{rounds} {name}: {B * T / times[name][-1][0]:.0f} tokens/s", file=sys.stderr)
    if len(set(params.values())) > 1:
        print(f"warning: parameter counts differ: {params}", file=sys.stderr)
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"\n{preset}: {config.n_layer} layers, n_embd {config.n_embd}, {config.n_head} heads "
          f"({config.n_query_groups} kv), MLP {config.intermediate_size}, vocab {config.vocab_size}; "
          f"batch {B} x {T} tokens; {precision}{', compiled' if compile else ''}; {where}; torch {torch.__version__}\n")
    cpu = dev.type == "cpu"
    print("| system | parameters | tokens/s (median) | range over rounds | vs lit_llama |"
          + (" tokens per CPU-second | vs lit_llama |" if cpu else "") + (" MFU |" if peak else ""))
    print("|---|---|---|---|---|" + ("---|---|" if cpu else "") + ("---|" if peak else ""))
    median = {n: [statistics.median(B * T / t[k] for t in times[n]) for k in (0, 1)] for n in times}
    for name in SYSTEMS:
        if name not in times:
            print(f"| {name} | | {unavailable(name)} | | |" + (" | |" if cpu else "") + (" |" if peak else ""))
            continue
        wall = [B * T / t[0] for t in times[name]]
        (med, med_cpu), (base, base_cpu) = median[name], median.get("lit_llama", median[name])
        row = (f"| {name} | {params[name] / 1e6:.1f}M | {med:,.0f} | {min(wall):,.0f}-{max(wall):,.0f} "
               f"| {med / base:.2f}x |")
        row += f" {med_cpu:,.0f} | {med_cpu / base_cpu:.2f}x |" if cpu else ""
        print(row + (f" {med * fpt / peak:.1%} |" if peak else ""))


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main, as_positional=False)
