"""LoRA finetuning speed and memory: lit_llama against Hugging Face peft, same model, data and settings.

Both systems finetune the embedded SmolLM2-135M-Instruct (transformers loads the same GGUF file our
checkpoint was converted from) with LoRA r=8, alpha=16, dropout 0.05 on q and v, AdamW lr 3e-4,
fp32, on the same token windows of offline English text. Each runs in its own process so that peak
RSS is its own. Prints a table and writes it into docs/benchmarks.md.

    python benchmarks/finetune_lora.py [--steps 12] [--micro_batch_size 4] [--seq_len 256]
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from lit_llama.io.checkpoint import DEFAULT_CHECKPOINT_DIR, load_model
from lit_llama.io.default_model import GGUF_NAME, cache_dir
from lit_llama.peft.lora import LoRAConfig, add_lora
from lit_llama.tokenizer import Tokenizer
from lit_llama.train.loop import loss_fn

ROOT = Path(__file__).resolve().parents[1]


def token_windows(n: int, seq_len: int) -> torch.Tensor:
    """Windows of seq_len + 1 tokens of Python's own documentation text (offline English)."""
    import pydoc_data.topics

    text = "\n\n".join(pydoc_data.topics.topics.values())
    ids = Tokenizer(ROOT / DEFAULT_CHECKPOINT_DIR).encode(text[:2_000_000])
    return ids[: n * (seq_len + 1)].view(n, seq_len + 1)


def ours(batches):
    model = add_lora(load_model(ROOT / DEFAULT_CHECKPOINT_DIR), LoRAConfig()).train()
    return model, lambda x, y: loss_fn(model(x), y)


def peft(batches):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(cache_dir(), gguf_file=GGUF_NAME, dtype=torch.float32)
    hf.config.use_cache = False
    model = get_peft_model(hf, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"],
                                          task_type="CAUSAL_LM")).train()
    return model, lambda x, y: torch.nn.functional.cross_entropy(model(input_ids=x).logits.flatten(0, 1), y.flatten())


def run_one(system: str, steps: int, micro_batch_size: int, seq_len: int) -> dict:
    import resource

    torch.manual_seed(0)
    data = token_windows(steps * micro_batch_size, seq_len)
    model, step_loss = {"lit_llama": ours, "peft": peft}[system](data)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-4)
    times, losses = [], []
    for i in range(steps):
        batch = data[i * micro_batch_size:(i + 1) * micro_batch_size]
        t0 = time.perf_counter()
        loss = step_loss(batch[:, :-1], batch[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    steady = sorted(times[2:])  # the first steps warm up allocators and kernels
    median = steady[len(steady) // 2]
    return {"system": system, "trainable": trainable, "tokens_per_s": micro_batch_size * seq_len / median,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
            "first_loss": losses[0], "last_loss": losses[-1]}


def main(steps: int = 12, micro_batch_size: int = 4, seq_len: int = 256, system: str = "") -> None:
    """Benchmark LoRA finetuning of the embedded model against peft.

    Args:
        steps: optimizer steps per system (the median step time after 2 warmup steps is used).
        micro_batch_size: sequences per step.
        seq_len: tokens per sequence.
        system: run one system in this process and print its JSON (used internally).
    """
    if system:
        print(json.dumps(run_one(system, steps, micro_batch_size, seq_len)))
        return
    rows = []
    for name in ("lit_llama", "peft"):
        cmd = [sys.executable, __file__, "--system", name, "--steps", str(steps),
               "--micro_batch_size", str(micro_batch_size), "--seq_len", str(seq_len)]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if out.returncode != 0:
            sys.exit(f"{name} failed:\n{out.stderr[-2000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    ref = rows[1]
    lines = [f"LoRA finetuning, SmolLM2-135M-Instruct, fp32, {torch.get_num_threads()} threads, micro batch "
             f"{micro_batch_size} x {seq_len} tokens, r=8 on q,v, median of {steps - 2} steps",
             "", "| system | trainable params | tokens/s | vs peft | peak RSS (GB) | loss first -> last |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['system']} | {r['trainable']:,} | {r['tokens_per_s']:.0f} | "
                     f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x | {r['peak_rss_gb']:.2f} | "
                     f"{r['first_loss']:.3f} -> {r['last_loss']:.3f} |")
    table = "\n".join(lines)
    print(table)
    from benchmarks.report import write_section

    write_section("LoRA finetuning (CPU)", table, "python benchmarks/finetune_lora.py")


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main, as_positional=False)
