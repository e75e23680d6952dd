"""Generation speed: lit_llama (eager and compiled) against transformers and llama.cpp, same weights.

CPU mode (default) times the embedded SmolLM2-135M-Instruct checkpoint in every system, fp32, with the
same thread count:

- lit_llama, eager and `compile` (lit_llama.infer.generation's `generate`, `decode_step`,
  `compile_decode_step` and `prepare_cache`, as they are);
- transformers, LlamaForCausalLM on SDPA: its default generate (dynamic cache) and its fastest
  setting (static cache with generate's automatic torch.compile of the decode step), from a Hugging
  Face folder written by lit_llama.io.export from the checkpoint;
- llama.cpp through llama-cpp-python, on F32 and F16 GGUF files written by lit_llama.io.export from the
  same checkpoint (F32 with a float32 KV cache, F16 with llama.cpp's default float16 cache).
- quantized: lit_llama's weight-only int8 and int4 (groups of 32, `--quantize int8|int4`, eager and
  compiled) and bf16 (`--precision bf16-true`, compiled) against llama.cpp's Q8_0 and Q4_0, quantized
  by llama.cpp itself (`llama_model_quantize`) from the F32 file, and the embedded Q4_1 file as shipped;
  and lit_llama on those three files converted with `--keep_quantized` (their integers as they are).

For each it measures time to first token (prefill of a 512-token prompt + first token), prefill
tokens/s (prompt tokens / TTFT), decode tokens/s (256 new tokens, greedy, batch 1 and batch 8, the
latter counting all 8 rows) and peak RSS, each (system, batch size) in its own process, as medians
over repeated runs after a warm-up run; then the ratio of every system's decode speed to every other,
and whether its first 32 greedy tokens equal lit_llama eager's. The table goes into docs/benchmarks.md.

    python benchmarks/generation_speed.py                 # the full CPU table (~35 min on 2 cores)
    python benchmarks/generation_speed.py --profile true  # torch.profiler table of one decode step

GPU mode (`--device cuda`): a random model of LLaMA-7B's shape in bf16 (no download), lit_llama eager
and compiled and transformers (static cache + compile), with decode tokens/s against the memory-
bandwidth bound: measured copy bandwidth / bytes read per token (every weight but the embedding
table, plus the KV cache of the positions attended). `--model random:tiny --device cpu` runs the
same path on CPU (how it is tested without a GPU).
"""

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

import torch

from lit_llama.eval.perplexity import weights_bytes
from lit_llama.infer.generation import compile_decode_step, decode_step, generate, prepare_cache
from lit_llama.infer.load import load_for_inference
from lit_llama.io.checkpoint import DEFAULT_CHECKPOINT_DIR
from lit_llama.io.convert import HF_NAMES
from lit_llama.io.default_model import GGUF_NAME, cache_dir
from lit_llama.io.export import export_gguf, export_hf, source_tensors
from lit_llama.io.gguf import convert_gguf_checkpoint
from lit_llama.model import Config, LLaMA
from lit_llama.tokenizer import Tokenizer
from lit_llama.utils import UserError

ROOT = Path(__file__).resolve().parents[1]

WORK = Path(os.environ.get("LIT_LLAMA_BENCH_DIR", ROOT / "out" / "generation_speed"))  # the exports
CPU_SYSTEMS = ["lit_llama", "lit_llama_compile", "transformers", "transformers_static_compile",
               "llama_cpp_f32", "llama_cpp_f16"]
# weight-only quantized and bf16 rows (issue 17), against llama.cpp on the same weights quantized by
# llama.cpp itself from the F32 file (Q8_0, Q4_0) and on the file as shipped (Q4_1)
QUANT_SYSTEMS = ["lit_llama_int8", "lit_llama_int8_compile", "lit_llama_int4", "lit_llama_int4_compile",
                 "lit_llama_bf16_compile", "llama_cpp_q8_0", "llama_cpp_q4_0", "llama_cpp_q4_1"]
# the same three GGUF files converted with --keep_quantized: lit_llama multiplying llama.cpp's own integers
KEPT = ("q8_0", "q4_0", "q4_1")
KEPT_SYSTEMS = [f"lit_llama_gguf_{k}{c}" for k in KEPT for c in ("", "_compile")]
QUANT_SYSTEMS += KEPT_SYSTEMS
ALL_SYSTEMS = CPU_SYSTEMS + QUANT_SYSTEMS
GPU_SYSTEMS = ["lit_llama", "lit_llama_compile", "transformers", "transformers_static_compile"]
LABELS = {"lit_llama": "lit_llama (eager)", "lit_llama_compile": "lit_llama (compile)",
          "transformers": "transformers (sdpa, dynamic cache)",
          "transformers_static_compile": "transformers (sdpa, static cache + compile)",
          "llama_cpp_f32": "llama.cpp F32", "llama_cpp_f16": "llama.cpp F16",
          "lit_llama_int8": "lit_llama int8 (eager)", "lit_llama_int8_compile": "lit_llama int8 (compile)",
          "lit_llama_int4": "lit_llama int4 g32 (eager)", "lit_llama_int4_compile": "lit_llama int4 g32 (compile)",
          "lit_llama_bf16_compile": "lit_llama bf16 (compile)", "llama_cpp_q8_0": "llama.cpp Q8_0",
          "llama_cpp_q4_0": "llama.cpp Q4_0", "llama_cpp_q4_1": "llama.cpp Q4_1 (as shipped)",
          **{f"lit_llama_gguf_{k}{c}": f"lit_llama GGUF {k.upper()} kept ({'compile' if c else 'eager'})"
             for k in KEPT for c in ("", "_compile")}}
LLAMA_CPP_QUANT = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0"}
N_COMPARE = 32  # greedy tokens compared with lit_llama eager


# ---------------------------------------------------------------- shared set-up


def default_checkpoint() -> Path:
    return ROOT / DEFAULT_CHECKPOINT_DIR


def prompts(batch: int, length: int, vocab_size: int, model: str) -> torch.Tensor:
    """`batch` different windows of `length` tokens: offline English text (Python's own docs) for the
    embedded model, random ids for a random model."""
    if model != "embedded":
        return torch.randint(0, vocab_size, (batch, length), generator=torch.Generator().manual_seed(0))
    import pydoc_data.topics

    text = "\n\n".join(pydoc_data.topics.topics.values())[:400_000]
    ids = Tokenizer(default_checkpoint()).encode(text, bos=False)
    return ids[: batch * length].view(batch, length)


def exports(checkpoint: Path, systems: List[str]) -> dict:
    """The checkpoint as a Hugging Face folder and F32/F16 GGUF files, as the systems need them,
    written by lit_llama.io.export (again whenever the checkpoint is newer)."""
    WORK.mkdir(parents=True, exist_ok=True)
    src = checkpoint / "lit_model.safetensors"
    stamp = src.stat().st_mtime if src.exists() else 0
    paths = {"hf": WORK / "hf", "f32": WORK / "model-f32.gguf", "f16": WORK / "model-f16.gguf",
             "q8_0": WORK / "model-q8_0.gguf", "q4_0": WORK / "model-q4_0.gguf"}
    needed = {"hf"} if any(s.startswith("transformers") for s in systems) else set()
    needed |= {s[len("llama_cpp_"):] for s in systems if s.startswith("llama_cpp")} - {"q4_1"}
    kept = {k for k in KEPT if any(s.startswith(f"lit_llama_gguf_{k}") for s in systems)}
    needed |= kept - {"q4_1"}
    if needed & set(LLAMA_CPP_QUANT):
        needed.add("f32")  # llama.cpp quantizes from it
    for kind in ("hf", "f32", "f16", "q8_0", "q4_0"):
        path = paths[kind]
        if kind not in needed:
            continue
        marker = path / "config.json" if kind == "hf" else path
        if marker.exists() and marker.stat().st_mtime >= stamp:
            continue
        if kind == "hf":
            export_hf(checkpoint, path)
        elif kind in LLAMA_CPP_QUANT:
            llama_cpp_quantize(paths["f32"], path, kind)
        else:
            export_gguf(checkpoint, path, kind)
    out = {k: str(v) for k, v in paths.items()}
    out["q4_1"] = str(cache_dir() / GGUF_NAME)  # the embedded model's file as shipped
    for k in sorted(kept):  # converted again whenever its GGUF is newer
        path = WORK / f"kept-{k}"
        if not (path / "lit_config.json").exists() or (path / "lit_config.json").stat().st_mtime < Path(out[k]).stat().st_mtime:
            if path.exists():
                shutil.rmtree(path)
            convert_gguf_checkpoint(Path(out[k]), path, keep_quantized=True)
        out[f"kept_{k}"] = str(path)
    return out


def llama_cpp_quantize(src: Path, dst: Path, kind: str) -> None:
    """`dst`, the F32 GGUF quantized by llama.cpp's own quantizer to `kind` (its defaults: the
    output tensor at higher precision, as `llama-quantize` does)."""
    import llama_cpp as lc

    params = lc.llama_model_quantize_default_params()
    params.ftype = getattr(lc, LLAMA_CPP_QUANT[kind])
    params.nthread = len(os.sched_getaffinity(0))
    tmp = dst.with_suffix(".tmp")
    if lc.llama_model_quantize(str(src).encode(), str(tmp).encode(), params) != 0:
        raise UserError(f"llama.cpp could not quantize {src} to {kind}")
    tmp.rename(dst)


def random_lit_model(name: str, device: torch.device, dtype: torch.dtype):
    """A LLaMA of the named shape with random weights (std 0.02), made directly on `device` in `dtype`."""
    config = Config.from_name(name)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LLaMA(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux


# ---------------------------------------------------------------- one run of each system
# Each returns (ttft seconds, decode seconds for new_tokens - 1 steps, first N_COMPARE tokens of row 0).


class LitRunner:
    def __init__(self, spec: dict, device: torch.device, compile: bool, quantize: Optional[str] = None,
                 precision: str = "32-true"):
        if spec["model"] == "embedded":
            # what generate.py runs: the same loading (and CPU weight layout)
            _, self.model, _ = load_for_inference(Path(spec["checkpoint"]), precision, quantize=quantize,
                                                  compile=compile)
        else:
            self.model = random_lit_model(spec["model"].split(":", 1)[1], device, getattr(torch, spec["dtype"]))
        self.device = device
        self.step = compile_decode_step(device) if compile else decode_step

    @torch.inference_mode()
    def run(self, prompt: torch.Tensor, new_tokens: int):
        prompt = prompt.to(self.device)
        B, T = prompt.shape
        if B == 1:
            # what users run: generate() as it is, never stopping early
            t0 = time.perf_counter()
            stamps, tokens = [], []
            for t in generate(self.model, prompt[0], new_tokens, temperature=0.0, step=self.step):
                stamps.append(time.perf_counter())
                tokens.append(t)
            assert len(tokens) == new_tokens, len(tokens)
            return stamps[0] - t0, stamps[-1] - stamps[0], tokens[:N_COMPARE]
        # generate() takes one sequence: the same prefill + greedy decode loop over a batch, with the
        # same cache preparation and (possibly compiled) decode step
        prepare_cache(self.model, T + new_tokens, batch_size=B)
        sync(self.device)
        t0 = time.perf_counter()
        logits = self.model(prompt, torch.arange(T, device=self.device), last=True)[:, -1]
        token = logits.argmax(-1)
        first = [int(token[0])]
        t1 = time.perf_counter()
        rows = [token]
        for i in range(new_tokens - 1):
            logits = self.step(self.model, token.view(B, 1), torch.tensor([T + i], device=self.device))
            token = logits.argmax(-1)
            rows.append(token)
        sync(self.device)
        t2 = time.perf_counter()
        tokens = first + [int(r[0]) for r in rows[1:N_COMPARE]]
        return t1 - t0, t2 - t1, tokens


class HFRunner:
    def __init__(self, spec: dict, device: torch.device, static_compile: bool):
        from transformers import LlamaForCausalLM

        if spec["model"] == "embedded":
            self.model = LlamaForCausalLM.from_pretrained(spec["exports"]["hf"], dtype=torch.float32,
                                                          attn_implementation="sdpa").to(device).eval()
        else:
            self.model = self._from_random(spec, device)
        self.device = device
        self.static_compile = static_compile

    @staticmethod
    def _from_random(spec: dict, device: torch.device):
        """transformers' model with exactly the random lit_llama model's weights (the export mapping)."""
        from transformers import LlamaConfig, LlamaForCausalLM

        dtype = getattr(torch, spec["dtype"])
        lit = random_lit_model(spec["model"].split(":", 1)[1], device, dtype)
        c = lit.config
        config = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.n_embd, intermediate_size=c.intermediate_size,
                             num_hidden_layers=c.n_layer, num_attention_heads=c.n_head,
                             num_key_value_heads=c.n_query_groups, max_position_embeddings=c.block_size,
                             rms_norm_eps=c.norm_eps, rope_theta=c.rope_base, tie_word_embeddings=c.tie_embeddings,
                             attn_implementation="sdpa", dtype=dtype)
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
        sd = {HF_NAMES[s.role].format(i=s.layer): s.get().contiguous() for s in source_tensors(c, lit.state_dict())}
        del lit
        model.load_state_dict(sd, assign=True, strict=False)
        if c.tie_embeddings:
            model.tie_weights()
        # the rotary frequencies are a non-persistent buffer, still on the meta device: make them anew
        model.model.rotary_emb = type(model.model.rotary_emb)(config=config).to(device)
        return model.to(device).eval()

    @torch.inference_mode()
    def run(self, prompt: torch.Tensor, new_tokens: int):
        from transformers import CompileConfig, GenerationConfig
        from transformers.generation.streamers import BaseStreamer

        class Stamps(BaseStreamer):
            def __init__(self):
                self.times, self.calls = [], 0

            def put(self, value):
                self.calls += 1
                if self.calls > 1:  # the first call is the prompt
                    self.times.append(time.perf_counter())

            def end(self):
                pass

        kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                      pad_token_id=0, eos_token_id=None)
        if self.static_compile:
            compile_config = CompileConfig(fullgraph=True, dynamic=False,
                                           mode="reduce-overhead" if self.device.type == "cuda" else "default")
            compile_config._compile_all_devices = True  # generate() compiles on CUDA only unless told
            kwargs.update(cache_implementation="static", compile_config=compile_config)
        config = GenerationConfig(**kwargs)
        prompt = prompt.to(self.device)
        streamer = Stamps()
        sync(self.device)
        t0 = time.perf_counter()
        out = self.model.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=config,
                                  streamer=streamer)
        sync(self.device)
        new = out[0, prompt.size(1):].tolist()
        assert len(new) == new_tokens == len(streamer.times), (len(new), len(streamer.times))
        return streamer.times[0] - t0, streamer.times[-1] - streamer.times[0], new[:N_COMPARE]


class LlamaCppRunner:
    """llama.cpp through llama-cpp-python's C API: one sequence per row, all rows decoded in one batch
    per step (as llama.cpp's `batched` example), greedy argmax over the logits."""

    def __init__(self, spec: dict, kind: str, batch: int, context: int):
        import llama_cpp as lc

        self.lc = lc
        lc.llama_backend_init()
        mp = lc.llama_model_default_params()
        self.model = lc.llama_model_load_from_file(spec["exports"][kind].encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {spec['exports'][kind]}")
        cp = lc.llama_context_default_params()
        cp.n_ctx = batch * context
        cp.n_seq_max = batch
        cp.n_batch = cp.n_ubatch = max(512, batch)
        cp.n_threads = cp.n_threads_batch = spec["threads"]
        cp.no_perf = True
        if kind == "f32":  # the same precision as the others end to end; llama.cpp's default cache is F16
            cp.type_k = cp.type_v = lc.GGML_TYPE_F32
        self.ctx = lc.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        self.batch = lc.llama_batch_init(max(512, batch), 0, 1)
        self.n_batch = cp.n_batch

    def _decode(self, tokens, positions, seqs, logits) -> None:
        b = self.batch
        b.n_tokens = len(tokens)
        for j, (t, p, s, l) in enumerate(zip(tokens, positions, seqs, logits)):
            b.token[j], b.pos[j], b.n_seq_id[j], b.logits[j] = t, p, 1, l
            b.seq_id[j][0] = s
        if self.lc.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")

    def _argmax(self, i: int) -> int:
        import numpy as np

        ptr = self.lc.llama_get_logits_ith(self.ctx, i)
        return int(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).argmax())

    def run(self, prompt: torch.Tensor, new_tokens: int):
        lc = self.lc
        lc.llama_memory_clear(lc.llama_get_memory(self.ctx), True)
        rows = prompt.tolist()
        B, T = len(rows), len(rows[0])
        t0 = time.perf_counter()
        tokens = []
        for s, row in enumerate(rows):  # prefill each sequence in chunks of n_batch
            for start in range(0, T, self.n_batch):
                chunk = row[start:start + self.n_batch]
                last = start + len(chunk) == T
                self._decode(chunk, range(start, start + len(chunk)), [s] * len(chunk),
                             [False] * (len(chunk) - 1) + [last])
            tokens.append(self._argmax(len(chunk) - 1))
        t1 = time.perf_counter()
        first = [tokens[0]]
        for i in range(new_tokens - 1):
            self._decode(tokens, [T + i] * B, range(B), [True] * B)
            tokens = [self._argmax(j) for j in range(B)]
            if len(first) < N_COMPARE:
                first.append(tokens[0])
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, first

    def close(self):
        self.lc.llama_batch_free(self.batch)
        self.lc.llama_free(self.ctx)
        self.lc.llama_model_free(self.model)


def lit_runner(spec: dict, system: str, device: torch.device, compile: bool) -> LitRunner:
    """The LitRunner of a lit_llama* system: int8 / int4 quantized while loading, bf16, or a GGUF kept."""
    kind = system[len("lit_llama"):].replace("_compile", "").strip("_")
    if kind.startswith("gguf_"):  # the GGUF file's integers, as they are
        spec = {**spec, "checkpoint": spec["exports"][f"kept_{kind[len('gguf_'):]}"]}
    return LitRunner(spec, device, compile=compile, quantize=kind if kind in ("int8", "int4") else None,
                     precision="bf16-true" if kind == "bf16" else "32-true")


def run_system(spec: dict) -> dict:
    """Warm-up + `repeats` timed runs of one (system, batch size) in this process."""
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    system, B, P, N = spec["system"], spec["batch"], spec["prompt_tokens"], spec["new_tokens"]
    t_load = time.perf_counter()
    weights = None
    if system.startswith("lit_llama"):
        runner = lit_runner(spec, system, device, compile=system.endswith("compile"))
        vocab = runner.model.config.vocab_size
        weights = weights_bytes(runner.model)
    elif system.startswith("transformers"):
        runner = HFRunner(spec, device, static_compile=system.endswith("compile"))
        vocab = runner.model.config.vocab_size
    else:
        runner = LlamaCppRunner(spec, system[len("llama_cpp_"):], B, P + N)
        vocab = runner.n_vocab
        weights = runner.lc.llama_model_size(runner.model)
    load_s = time.perf_counter() - t_load
    prompt = prompts(B, P, vocab, spec["model"])
    t = time.perf_counter()
    ttft, decode, tokens = runner.run(prompt, N)
    warmup_s = time.perf_counter() - t
    runs = [runner.run(prompt, N) for _ in range(spec["repeats"])]
    ttfts, decodes = [r[0] for r in runs], [r[1] for r in runs]
    assert all(r[2] == tokens for r in runs), "greedy tokens changed between runs"
    if hasattr(runner, "close"):
        runner.close()
    return {"system": system, "batch": B, "ttft_s": statistics.median(ttfts), "prefill_tok_s": B * P / statistics.median(ttfts),
            "decode_tok_s": B * (N - 1) / statistics.median(decodes), "decode_runs_tok_s": [B * (N - 1) / d for d in decodes],
            "peak_mem_gb": peak_memory_gb(device), "load_s": load_s, "warmup_s": warmup_s, "tokens": tokens,
            "weights_bytes": weights}


# ---------------------------------------------------------------- bandwidth bound (GPU mode)


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Empirical memory bandwidth in bytes/s: a large tensor copy reads and writes every byte."""
    x = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    sync(device)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        y.copy_(x)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best


def bytes_per_token(model_name: str, dtype: torch.dtype, position: float) -> float:
    """Bytes a decode step must read at batch 1: every weight but the embedding table (one row of it),
    and the keys and values of `position` earlier tokens."""
    c = Config.from_name(model_name)
    size = torch.empty((), dtype=dtype).element_size()
    hs, kv = c.head_size, c.n_query_groups * c.head_size
    per_layer = c.n_embd * (c.n_head * hs + 2 * kv) + c.n_head * hs * c.n_embd + 3 * c.n_embd * c.intermediate_size + 2 * c.n_embd
    weights = c.n_layer * per_layer + c.n_embd + c.vocab_size * c.n_embd  # + final norm + output head
    kv_bytes = 2 * c.n_layer * kv * position
    return (weights + kv_bytes) * size


# ---------------------------------------------------------------- profile


def profile(spec: dict, system: str, steps: int = 1, compile: bool = False) -> None:
    """torch.profiler tables of `steps` decode step(s) of a lit_llama* system at position
    prompt_tokens + new_tokens/2."""
    from torch.profiler import ProfilerActivity, profile as tprofile

    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    runner = lit_runner(spec, system, device, compile=compile)
    model, step = runner.model, runner.step
    P, N = spec["prompt_tokens"], spec["new_tokens"]
    prompt = prompts(1, P, model.config.vocab_size, spec["model"]).to(device)
    with torch.inference_mode():
        prepare_cache(model, P + N, batch_size=1)
        model(prompt, torch.arange(P, device=device))
        token, pos = prompt[:, -1:], P
        for _ in range(N // 2):  # warm up (and compile) and move to the middle of the generation
            token = step(model, token, torch.tensor([pos], device=device)).argmax(-1).view(1, 1)
            pos += 1
        sync(device)
        t = time.perf_counter()
        for _ in range(10):
            token = step(model, token, torch.tensor([pos], device=device)).argmax(-1).view(1, 1)
        sync(device)
        wall = (time.perf_counter() - t) / 10
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with tprofile(activities=activities, record_shapes=True) as prof:
            for _ in range(steps):
                token = step(model, token, torch.tensor([pos], device=device)).argmax(-1).view(1, 1)
            sync(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    kv = model.transformer.h[0].attn.kv_cache.k.size(2)
    print(f"{system} decode step ({'compiled' if compile else 'eager'}), {spec['model']}, {spec['threads']} threads, "
          f"position {pos}, KV cache {kv}: {wall * 1e3:.2f} ms/step without the profiler, {steps} step(s) profiled")
    print(prof.key_averages().table(sort_by=sort, row_limit=25))
    print("by input shape:")
    print(prof.key_averages(group_by_input_shape=True).table(sort_by=sort, row_limit=20))


# ---------------------------------------------------------------- table


def fmt(x, spec=".1f"):
    return "n/a" if x is None else format(x, spec)


def make_table(results: List[dict], failures: dict, spec: dict, batch_sizes: List[int]) -> str:
    by = {(r["system"], r["batch"]): r for r in results}
    systems = [s for s in spec["systems"] if (s, 1) in by or any((s, b) in by for b in batch_sizes)]
    ref_tokens = by.get(("lit_llama", 1), {}).get("tokens")
    P = spec["prompt_tokens"]
    mem = "peak GPU memory (GB)" if spec["device"] == "cuda" else "peak RSS (GB)"
    head = ["system", f"prefill tok/s ({P})", "TTFT (s)"] + [f"decode tok/s b={b}" for b in batch_sizes] + \
           ["weights (MB)", "weights x tok/s (GB/s)", mem, "first run (s)", f"same {N_COMPARE} greedy tokens"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in systems:
        r1 = by.get((s, 1), {})
        same = "ref" if s == "lit_llama" else ("n/a" if not ref_tokens or "tokens" not in r1 else
                                               ("yes" if r1["tokens"] == ref_tokens else "no"))
        row = [LABELS.get(s, s), fmt(r1.get("prefill_tok_s"), ".0f"), fmt(r1.get("ttft_s"), ".3f")]
        for b in batch_sizes:
            r = by.get((s, b))
            row.append(fmt(r["decode_tok_s"]) if r else ("failed" if (s, b) in failures else "n/a"))
        wb = r1.get("weights_bytes")
        row += [fmt(wb / 1e6 if wb else None, ".0f"), fmt(wb * r1["decode_tok_s"] / 1e9 if wb else None, ".1f"),
                fmt(r1.get("peak_mem_gb"), ".2f"), fmt(r1.get("warmup_s"), ".1f"), same]
        lines.append("| " + " | ".join(row) + " |")
    # decode speed ratios, row system over column system, at batch 1
    present = [s for s in systems if (s, 1) in by]
    if len(present) > 1:
        lines += ["", "Decode speed ratio at batch 1 (row / column):", "",
                  "| | " + " | ".join(LABELS.get(s, s) for s in present) + " |", "|---|" + "---|" * len(present)]
        for a in present:
            ra = by[a, 1]["decode_tok_s"]
            lines.append(f"| {LABELS.get(a, a)} | " + " | ".join(f"{ra / by[b, 1]['decode_tok_s']:.2f}x" for b in present) + " |")
    for (s, b), why in failures.items():
        lines.append(f"\n{LABELS.get(s, s)} at batch {b} failed: {why}")
    return "\n".join(lines)


def goals(results: List[dict]) -> List[str]:
    """The issue's targets at batch 1, fp32: best lit_llama >= 1.5x transformers' best, >= 0.8x llama.cpp F32."""
    d = {r["system"]: r["decode_tok_s"] for r in results if r["batch"] == 1}
    lit = max([d[s] for s in ("lit_llama", "lit_llama_compile") if s in d], default=None)
    hf = max([d[s] for s in ("transformers", "transformers_static_compile") if s in d], default=None)
    out = []
    if lit and hf:
        out.append(f"lit_llama best / transformers best: {lit / hf:.2f}x (target >= 1.5x: {'met' if lit / hf >= 1.5 else 'not met'})")
    if lit and "llama_cpp_f32" in d:
        r = lit / d["llama_cpp_f32"]
        out.append(f"lit_llama best / llama.cpp F32: {r:.2f}x (target >= 0.8x: {'met' if r >= 0.8 else 'not met'})")
    # issue 17's: fp32 compiled >= llama.cpp F32, int8 compiled >= Q8_0, int4 >= 0.8x Q4_0
    for ours, peer, target in (("lit_llama_compile", "llama_cpp_f32", 1.0), ("lit_llama_int8_compile", "llama_cpp_q8_0", 1.0),
                               ("lit_llama_int4_compile", "llama_cpp_q4_0", 0.8)):
        if ours in d and peer in d:
            r = d[ours] / d[peer]
            out.append(f"{LABELS[ours]} / {LABELS[peer]}: {r:.2f}x (target >= {target}x: {'met' if r >= target else 'not met'})")
    for k in KEPT:  # the same file's integers in both (no target set)
        ours = max([d[s] for s in (f"lit_llama_gguf_{k}", f"lit_llama_gguf_{k}_compile") if s in d], default=None)
        if ours and f"llama_cpp_{k}" in d:
            out.append(f"lit_llama GGUF {k.upper()} kept (best) / {LABELS[f'llama_cpp_{k}']}: {ours / d[f'llama_cpp_{k}']:.2f}x")
    return out


def llama_cpp_build() -> str:
    """Which llama.cpp kernels this build has (scripts/install_llama_cpp.sh leaves AMX out where its
    quantized kernels crash)."""
    try:
        import llama_cpp
    except ImportError:
        return ""
    info = llama_cpp.llama_print_system_info().decode().replace("|", ",").strip(" ,")
    return f"llama.cpp build: {info}" + ("" if "AMX" in info else " (no AMX kernels)") + "."


def versions() -> str:
    import platform

    parts = [f"python {platform.python_version()}", f"torch {torch.__version__}"]
    for mod, name in (("transformers", "transformers"), ("llama_cpp", "llama-cpp-python")):
        try:
            parts.append(f"{name} {__import__(mod).__version__}")
        except ImportError:
            pass
    return ", ".join(parts)


# ---------------------------------------------------------------- main


def main(device: str = "cpu", threads: Optional[int] = None, prompt_tokens: int = 512, new_tokens: int = 256,
         batch_sizes: List[int] = [1, 8], repeats: int = 3, systems: Optional[List[str]] = None,
         model: Optional[str] = None, profile: bool = False, profile_steps: int = 1, profile_compile: bool = False,
         write_docs: Optional[bool] = None, run: str = "") -> None:
    """Benchmark generation speed of lit_llama against transformers and llama.cpp on the same weights.

    Args:
        device: cpu, or cuda for the GPU mode (a random 7B-shaped model in bf16).
        threads: CPU threads for every system (default: the CPUs this process may use).
        prompt_tokens: prompt length for prefill and time to first token.
        new_tokens: tokens generated per run (decode speed counts new_tokens - 1 steps).
        batch_sizes: batch sizes for decode tokens/s (prefill and TTFT are reported at batch 1).
        repeats: timed runs per (system, batch size) after one warm-up run; medians are reported.
        systems: which systems to run (default: all for the device): lit_llama, lit_llama_compile,
            transformers, transformers_static_compile, llama_cpp_f32, llama_cpp_f16; quantized and
            bf16: lit_llama_int8, lit_llama_int8_compile, lit_llama_int4, lit_llama_int4_compile,
            lit_llama_bf16_compile, llama_cpp_q8_0, llama_cpp_q4_0 (quantized by llama.cpp from the
            F32 file), llama_cpp_q4_1 (the embedded GGUF as shipped); lit_llama_gguf_q8_0,
            lit_llama_gguf_q4_0, lit_llama_gguf_q4_1 (and _compile): those three files converted with
            --keep_quantized.
        model: `embedded` (the default on CPU) or `random:<config name>` (default on cuda: random:7B).
        profile: print a torch.profiler table of decode step(s) of the first lit_llama system of --systems
            instead of benchmarking.
        profile_steps: decode steps inside the profile.
        profile_compile: profile the compiled decode step instead of the eager one.
        write_docs: write the table into docs/benchmarks.md (default: yes for a full default run).
        run: internal: a JSON spec of one (system, batch size) to run in this process.
    """
    if run:
        print(json.dumps(run_system(json.loads(run))))
        return
    if device not in ("cpu", "cuda"):
        sys.exit(f"error: --device must be cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but torch sees no CUDA device")
    threads = threads or len(os.sched_getaffinity(0))
    model = model or ("embedded" if device == "cpu" else "random:7B")
    default_systems = ALL_SYSTEMS if device == "cpu" and model == "embedded" else GPU_SYSTEMS
    systems = systems or default_systems
    unknown = [s for s in systems if s not in ALL_SYSTEMS]
    if unknown or (model != "embedded" and any(s.startswith("llama_cpp") for s in systems)):
        sys.exit(f"error: unknown or unsupported systems {unknown or systems} for model {model}")
    spec = {"device": device, "threads": threads, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
            "repeats": repeats, "model": model, "dtype": "float32" if device == "cpu" else "bfloat16",
            "checkpoint": str(default_checkpoint()), "systems": systems}
    if model == "embedded":
        try:
            spec["exports"] = exports(default_checkpoint(), systems)
        except UserError as e:
            sys.exit(f"error: {e}")
    if profile:
        lit = [s for s in systems if s.startswith("lit_llama")] or ["lit_llama"]
        globals()["profile"](spec, lit[0], profile_steps, profile_compile)
        return
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error"}
    load_before = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    results, failures = [], {}
    for system in systems:
        for b in batch_sizes:
            cmd = [sys.executable, __file__, "--run", json.dumps({**spec, "system": system, "batch": b})]
            t = time.perf_counter()
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
            if out.returncode != 0:
                why = (out.stderr.strip().splitlines() or ["no output"])[-1][:300]
                failures[system, b] = why
                print(f"{system} b={b}: FAILED ({why})", file=sys.stderr)
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            results.append(r)
            print(f"{system} b={b}: decode {r['decode_tok_s']:.1f} tok/s (runs {', '.join(f'{x:.1f}' for x in r['decode_runs_tok_s'])}), "
                  f"TTFT {r['ttft_s']:.3f} s, {time.perf_counter() - t:.0f} s", file=sys.stderr)
    name = "SmolLM2-135M-Instruct (embedded), fp32 unless the row says otherwise" if model == "embedded" else f"{model} ({spec['dtype']}, random weights)"
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    intro = (f"{name}; {threads} threads (load average before the run {load_before}, after {load}); prompt {prompt_tokens} tokens, {new_tokens} new tokens, greedy; medians of "
             f"{repeats} runs after a warm-up run, each system and batch size in its own process; {versions()}. "
             "Prefill tok/s = prompt tokens / time to first token; decode tok/s counts every row of the batch. "
             "llama.cpp F32 uses a float32 KV cache, the others llama.cpp's default float16 one. "
             "Weights: bytes held (lit_llama) or llama.cpp's model size; weights x tok/s approximates the "
             "bandwidth a decode step achieves (each weight read once per token). "
             f"{llama_cpp_build()}")
    table = intro + "\n\n" + make_table(results, failures, spec, batch_sizes)
    if device == "cuda" or model != "embedded":
        cfg_name = model.split(":", 1)[1]
        bw = copy_bandwidth(torch.device(device))
        per_token = bytes_per_token(cfg_name, getattr(torch, spec["dtype"]), prompt_tokens + new_tokens / 2)
        bound = bw / per_token
        table += (f"\n\nMemory-bandwidth bound at batch 1: {bw / 1e9:.0f} GB/s measured copy bandwidth / "
                  f"{per_token / 1e9:.2f} GB read per token = {bound:.1f} tok/s.")
        for r in results:
            if r["batch"] == 1:
                table += f"\n- {LABELS.get(r['system'], r['system'])}: {r['decode_tok_s'] / bound:.0%} of the bound"
    lines = goals(results)
    if lines:
        table += "\n\n" + "\n".join(f"- {l}" for l in lines)
    print(table)
    default_run = (prompt_tokens, new_tokens, batch_sizes, repeats, systems) == (512, 256, [1, 8], 3, default_systems)
    if write_docs if write_docs is not None else default_run:
        from report import write_section  # benchmarks/report.py: this script's folder is first on sys.path

        title = "Generation speed (CPU)" if device == "cpu" and model == "embedded" else f"Generation speed ({device}, {model})"
        if title == "Generation speed (CPU)" and not default_run and any(s in QUANT_SYSTEMS for s in systems):
            title = "Generation speed, quantized and bf16 (CPU)"  # a run of these rows keeps the full table
        command = " ".join(["python benchmarks/generation_speed.py"] + sys.argv[1:])
        write_section(title, table, command)


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main, as_positional=False)
