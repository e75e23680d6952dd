"""Speculative decoding: decode tokens/s with and without drafts, on answers that copy their input
(repeating a passage, renaming a variable in code) and on free generation, beside llama.cpp's prompt
lookup (llama-cpp-python's LlamaPromptLookupDecoding) on the shipped GGUF; written into
docs/benchmarks.md.

Greedy, one sequence, the embedded model in float32 through the batched engine (max_batch_size 1),
eager and compiled: no drafts, prompt lookup, and a draft model. No smaller model with SmolLM2's
tokenizer can be had offline, so the draft model here is a stand-in, the model itself rounded to
3 bits (gptq.rtn, groups of 32): it measures how acceptance turns into tokens per step, not a
draft that is cheaper than the model. Each configuration runs every task once to warm up (compiling
its graphs), then once timed.

    python benchmarks/speculative.py [--new_tokens 200] [--draft_tokens 5] [--threads 2]
"""

import sys
import time
from pathlib import Path
from typing import Optional

import torch

from lit_llama.infer.engine import Engine, Request, SamplingParams
from lit_llama.infer.load import load_for_inference
from lit_llama.infer.speculative import DraftModel, PromptLookup
from lit_llama.io.checkpoint import DEFAULT_CHECKPOINT_DIR
from lit_llama.io.default_model import GGUF_NAME, cache_dir
from lit_llama.model import LLaMA
from lit_llama.quant.gptq import rtn
from lit_llama.templates import ChatFormat, get_template
from lit_llama.utils import run_cli

ROOT = Path(__file__).resolve().parents[1]

CODE = '''def mean_and_spread(values):
    total = 0.0
    for v in values:
        total += v
    mean = total / len(values)
    spread = 0.0
    for v in values:
        spread += (v - mean) ** 2
    return mean, (spread / len(values)) ** 0.5
'''


def tasks() -> dict:
    from pydoc_data.topics import topics

    passage = " ".join(topics["if"].split())[:900]
    return {"repeat a passage": f"Repeat the following text exactly, word for word:\n\n{passage}",
            "rename in code": f"Rewrite this Python function with the variable `total` renamed to `sum_of_values`. "
                              f"Change nothing else.\n\n{CODE}",
            "free generation": "Write a short story about a lighthouse keeper who finds a message in a bottle."}


def rounded_copy(model: LLaMA, bits: int = 3, groupsize: int = 32) -> LLaMA:
    state = {k: rtn(v, bits, groupsize).dequantize() if k.startswith("transformer.h.") and v.dim() == 2 else v
             for k, v in model.state_dict().items()}
    copy = LLaMA(model.config)
    copy.load_state_dict(state)
    return copy.eval()


def run_lit(model, tokenizer, prompts: dict, new_tokens: int, drafter, draft_tokens: int, compile: bool) -> dict:
    engine = Engine(model, tokenizer, max_batch_size=1, cache_rows=1, max_seq_length=1024, compile=compile,
                    drafter=drafter, draft_tokens=draft_tokens)
    params = SamplingParams(max_new_tokens=new_tokens, stop_ids=tuple(tokenizer.stop_ids))
    out = {}
    for name, ids in prompts.items():
        engine.run([Request(ids, params)])  # warm-up (and compilation)
        before = dict(engine.stats)
        r = Request(ids, params)
        t0 = time.perf_counter()
        engine.submit(r)
        engine.step()  # the prefill and the first token
        t1 = time.perf_counter()
        engine.run([r])
        t2 = time.perf_counter()
        s = {k: engine.stats[k] - before[k] for k in ("draft_tokens", "accepted_draft_tokens", "decode_rows")}
        out[name] = {"tokens": r.tokens, "decode_s": t2 - t1, "drafted": s["draft_tokens"],
                     "accepted": s["accepted_draft_tokens"], "steps": s["decode_rows"], "prefill_s": t1 - t0}
    model.clear_kv_cache()
    return out


def run_llama_cpp(gguf: Path, prompts: dict, new_tokens: int, draft_tokens: int, lookup: bool, threads: int,
                  stop_ids) -> dict:
    from llama_cpp import Llama
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    draft = LlamaPromptLookupDecoding(max_ngram_size=3, num_pred_tokens=draft_tokens) if lookup else None
    llm = Llama(model_path=str(gguf), n_ctx=1024, n_threads=threads, n_threads_batch=threads, draft_model=draft,
                verbose=False)
    out = {}
    for name, ids in prompts.items():
        for timed in (False, True):
            llm.reset()
            tokens, t0, t1 = [], time.perf_counter(), None
            for t in llm.generate(ids, temp=0.0, top_k=1, reset=True):
                if t1 is None:
                    t1 = time.perf_counter()
                if t in stop_ids:
                    break
                tokens.append(t)
                if len(tokens) >= new_tokens:
                    break
            t2 = time.perf_counter()
        out[name] = {"tokens": tokens, "decode_s": t2 - t1, "prefill_s": t1 - t0, "drafted": None, "accepted": None,
                     "steps": None}
    del llm
    return out


def main(checkpoint_dir: Path = DEFAULT_CHECKPOINT_DIR, new_tokens: int = 200, draft_tokens: int = 5,
         threads: Optional[int] = None, llama_cpp: bool = True, write: bool = True) -> None:
    """Measure speculative decoding (see the module's docstring) and write the table.

    Args:
        checkpoint_dir: the model (default: the embedded SmolLM2-135M-Instruct, whose GGUF llama.cpp runs).
        new_tokens: the most tokens per answer (an answer ends earlier at the end-of-turn token).
        draft_tokens: the most tokens drafted per step (lit_llama and llama.cpp alike).
        threads: CPU threads (default: torch's).
        llama_cpp: also run llama.cpp with and without prompt lookup.
        write: write the table into docs/benchmarks.md.
    """
    if threads:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    _, model, tokenizer = load_for_inference(checkpoint_dir, "32-true")
    fmt = ChatFormat(get_template("checkpoint", tokenizer), tokenizer)
    prompts = {k: fmt.prompt_ids([{"role": "user", "content": v}]) for k, v in tasks().items()}
    draft = rounded_copy(model)
    configs = [("lit_llama eager", None, False), ("lit_llama eager + prompt lookup", PromptLookup(), False),
               ("lit_llama eager + draft model (3-bit copy)", DraftModel(draft), False),
               ("lit_llama compiled", None, True), ("lit_llama compiled + prompt lookup", PromptLookup(), True)]
    results = {}
    for label, drafter, compile in configs:
        print(f"{label} ...", file=sys.stderr, flush=True)
        results[label] = run_lit(model, tokenizer, prompts, new_tokens, drafter, draft_tokens, compile)
    base = {label: configs[0][0] if "eager" in label else "lit_llama compiled" for label in results}
    if llama_cpp and Path(checkpoint_dir).resolve() == (ROOT / DEFAULT_CHECKPOINT_DIR).resolve():
        for label, lookup in (("llama.cpp Q4_1", False), ("llama.cpp Q4_1 + prompt lookup", True)):
            print(f"{label} ...", file=sys.stderr, flush=True)
            results[label] = run_llama_cpp(cache_dir() / GGUF_NAME, prompts, new_tokens, draft_tokens, lookup,
                                           threads, set(tokenizer.stop_ids))
            base[label] = "llama.cpp Q4_1"
    table = ["| system | task | tokens | decode tok/s | speed-up | drafts accepted | tokens per step | same tokens |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for label, res in results.items():
        for task, r in res.items():
            n = len(r["tokens"])
            rate = (n - 1) / r["decode_s"] if r["decode_s"] > 0 else float("nan")
            ref = results[base[label]][task]
            ref_rate = (len(ref["tokens"]) - 1) / ref["decode_s"]
            acc = f"{r['accepted']}/{r['drafted']} ({r['accepted'] / r['drafted']:.0%})" if r["drafted"] else "-"
            per_step = f"{(n - 1) / r['steps']:.2f}" if r["steps"] else "-"
            same = "ref" if base[label] == label else ("yes" if r["tokens"] == ref["tokens"] else
                                                       f"first {next((i for i, (a, b) in enumerate(zip(r['tokens'], ref['tokens'])) if a != b), min(n, len(ref['tokens'])))}")
            table.append(f"| {label} | {task} | {n} | {rate:.1f} | {rate / ref_rate:.2f}x | {acc} | {per_step} | {same} |")
    best = {task: max((results[l][task] for l in results if l.startswith("lit_llama") and "draft model" not in l),
                      key=lambda r: (len(r["tokens"]) - 1) / r["decode_s"]) for task in prompts}
    note = (f"\n\nGreedy, up to {new_tokens} new tokens, {draft_tokens} drafted tokens at most per step, {threads} "
            f"threads; decode tok/s counts the tokens after the first (the prefill's) over the time after it. "
            f"Speed-up: against the same system without drafts, same run. 'same tokens': equal to that system's "
            f"tokens without drafts (else the first index where they part: a near-tie that a multi-token pass "
            f"rounds the other way). The draft model is a stand-in (the model rounded to 3 bits, as costly as "
            f"the model): its row shows acceptance and tokens per step, not a speed-up a small draft would give.")
    lines = []
    for task in prompts:
        r = best[task]
        lines.append(f"- {task}: best lit_llama {(len(r['tokens']) - 1) / r['decode_s']:.1f} tok/s")
    text = "\n".join(table) + note + "\n" + "\n".join(lines)
    print(text)
    if write:
        from report import write_section  # benchmarks/report.py: this script's folder is first on sys.path

        cmd = "python benchmarks/speculative.py" + (f" --threads {threads}" if threads != 2 else "")
        write_section("Speculative decoding (SmolLM2-135M-Instruct)", text, cmd)


if __name__ == "__main__":
    run_cli(main)
