"""A 7B-shaped LLaMA with random weights: llama.cpp (llama-cpp-python) against lit_llama on the same
GGUF files. Speed and memory depend only on the shapes, so random weights are faithful.

`make` writes, into --work_dir (default: $LIT_LLAMA_BENCH_DIR or /work/bench7b; ~50 GB for 7B):

- model-f16.gguf: LLaMA-7B's shape (dim 4096, 32 layers, 32 heads, FFN 11008, context 4096, untied
  output) with the embedded model's tokenizer (SmolLM2's 49,152 tokens), weights ~N(0, 0.02) in
  float16 and norms of 1, written one tensor at a time;
- model-q4_0.gguf, model-q8_0.gguf: that file quantized by llama.cpp's own quantizer (its defaults:
  output.weight stays Q6_K in the Q4_0 file, as in real files);
- kept-q4_0/, kept-q8_0/: those files converted by scripts/convert_gguf_checkpoint.py with
  --keep_quantized; bf16/: the F16 file converted with --dtype bfloat16; int8/, int4/: written by
  quantize/weight_only.py.

Each step runs only when its output is missing or older than its input; the time and peak memory of
each are kept in make.json. `run` then measures every (system, threads) in a fresh process, one at a
time: load time, time from the process's start to its first token, prefill tok/s of a
--prefill_tokens prompt, decode tok/s of --new_tokens greedy tokens after a --prompt_tokens prompt
(tokens 2..N), the bandwidth that decode speed implies (tok/s x bytes of the GGUF's weights but the
embedding table: the same number for lit_llama's rows as for their llama.cpp peer), and the peak
RssAnon, RssFile and VmHWM of the process. The table is printed and kept in run.json.

    python benchmarks/large_model.py --step make                    # the files (~40 GB, minutes)
    python benchmarks/large_model.py --step run --threads 1,2       # the table
    python benchmarks/large_model.py --systems llama_cpp_q4_0,lit_q4_0 --compile false \\
        --new_tokens 4 --prefill_tokens 64                          # a smoke run
    python benchmarks/large_model.py --step run --write_docs true   # also into docs/benchmarks.md
    python benchmarks/large_model.py --step report --write_docs true  # the last run's table, again

Systems: llama_cpp_q4_0, llama_cpp_q8_0, llama_cpp_f16 and lit_q4_0, lit_q8_0 (the GGUF's integers
kept), lit_int4, lit_int8 (weight-only, groups of 32 for int4), lit_bf16; lit_llama's rows run once
per --compile value (eager and compiled decode step), activations in float32 except bf16's.
`--shape tiny` makes a small model of the same kind (how the benchmark is tested).
"""

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Dict, List, Optional

import numpy as np
import torch

from generation_speed import LitRunner, LlamaCppRunner, llama_cpp_build, llama_cpp_quantize, prompts
from lit_llama.infer.generation import compile_decode_step, decode_step, prepare_cache, warm_up
from lit_llama.infer.load import load_for_inference
from lit_llama.io.default_model import GGUF_NAME, cache_dir
from lit_llama.utils import UserError, atomic_file, run_cli

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_WORK = Path(os.environ.get("LIT_LLAMA_BENCH_DIR", "/work/bench7b"))
WEIGHT_ONLY_SCRIPT = ROOT / "quantize" / "weight_only.py"
DOCS_TITLE = "7B-shaped model (benchmarks/large_model.py)"
N_TOKENS_KEPT = 8  # greedy tokens of the decode prompt recorded per system

SHAPES = {
    "7b": dict(dim=4096, n_layer=32, n_head=32, n_kv_head=32, ffn=11008, context=4096),
    # every row length a multiple of 256, as llama.cpp's K-quants (Q6_K for output.weight) need
    "tiny": dict(dim=256, n_layer=2, n_head=4, n_kv_head=4, ffn=768, context=4096),
}


@dataclass
class System:
    gguf: str  # the GGUF file it reads, or its llama.cpp peer's (whose weight bytes give GB/s)
    checkpoint: Optional[str] = None  # lit_llama: the checkpoint directory in work_dir
    quantize: Optional[str] = None
    precision: str = "32-true"


def int_source(mode: str) -> System:
    """lit_int8 / lit_int4: the bf16 checkpoint quantized once by quantize/weight_only.py."""
    return System({"int8": "q8_0", "int4": "q4_0"}[mode], checkpoint=mode)


SYSTEMS = {
    "llama_cpp_q4_0": System("q4_0"), "llama_cpp_q8_0": System("q8_0"), "llama_cpp_f16": System("f16"),
    "lit_q4_0": System("q4_0", checkpoint="kept-q4_0"), "lit_q8_0": System("q8_0", checkpoint="kept-q8_0"),
    "lit_int4": int_source("int4"), "lit_int8": int_source("int8"),
    "lit_bf16": System("f16", checkpoint="bf16", precision="bf16-true"),
}
# ours / llama.cpp's, the rows of ratios
PAIRS = [("lit_q4_0", "llama_cpp_q4_0"), ("lit_int4", "llama_cpp_q4_0"), ("lit_q8_0", "llama_cpp_q8_0"),
         ("lit_int8", "llama_cpp_q8_0"), ("lit_bf16", "llama_cpp_f16")]
# checkpoint directories made by scripts/convert_gguf_checkpoint.py: source GGUF, flags
CONVERSIONS = {"kept-q4_0": ("q4_0", ["--keep_quantized", "true"]), "kept-q8_0": ("q8_0", ["--keep_quantized", "true"]),
               "bf16": ("f16", ["--dtype", "bfloat16"])}


def gguf_path(work: Path, kind: str) -> Path:
    return work / f"model-{kind}.gguf"


def split(value: str) -> List[str]:
    return [v.strip() for v in str(value).split(",") if v.strip()]


# ---------------------------------------------------------------- memory


class MemoryPoller:
    """The peak RssAnon and RssFile of a process (/proc/PID/status every `interval` seconds, in a
    thread) and its VmHWM (the kernel's peak RSS), in GB."""

    FIELDS = ("RssAnon", "RssFile", "VmHWM")

    def __init__(self, pid="self", interval: float = 0.02):
        self.path, self.interval = f"/proc/{pid}/status", interval
        self.peak = dict.fromkeys(self.FIELDS, 0)
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _sample(self) -> bool:
        try:
            lines = open(self.path).read().splitlines()
        except OSError:  # the process has ended
            return False
        for line in lines:
            key, _, value = line.partition(":")
            if key in self.peak:
                self.peak[key] = max(self.peak[key], int(value.split()[0]))  # kB
        return True

    def _loop(self) -> None:
        while self._sample() and not self.done.wait(self.interval):
            pass

    def stop(self) -> Dict[str, float]:
        self.done.set()
        self.thread.join()
        self._sample()
        return {f"peak_{k}_gb": v * 1024 / 1e9 for k, v in self.peak.items()}


# ---------------------------------------------------------------- make


def normal_table() -> np.ndarray:
    """The 65,536 quantiles of N(0, 0.02) as float16: indexing it with random uint16 draws float16
    weights of that distribution at the speed of a gather (~30 s for 7B, 7x faster than
    standard_normal + astype)."""
    dist = NormalDist(0.0, 0.02)
    return np.array([dist.inv_cdf((i + 0.5) / 65536) for i in range(65536)], dtype=np.float16)


def tensor_plan(s: dict, vocab: int) -> List[tuple]:
    """(name, numpy shape (rows, columns), dtype) of every tensor, in llama.cpp's order."""
    dim, kv = s["dim"], s["dim"] // s["n_head"] * s["n_kv_head"]
    plan = [("token_embd.weight", (vocab, dim), np.float16)]
    for i in range(s["n_layer"]):
        b = f"blk.{i}"
        plan += [(f"{b}.attn_norm.weight", (dim,), np.float32), (f"{b}.attn_q.weight", (dim, dim), np.float16),
                 (f"{b}.attn_k.weight", (kv, dim), np.float16), (f"{b}.attn_v.weight", (kv, dim), np.float16),
                 (f"{b}.attn_output.weight", (dim, dim), np.float16), (f"{b}.ffn_norm.weight", (dim,), np.float32),
                 (f"{b}.ffn_gate.weight", (s["ffn"], dim), np.float16), (f"{b}.ffn_up.weight", (s["ffn"], dim), np.float16),
                 (f"{b}.ffn_down.weight", (dim, s["ffn"]), np.float16)]
    return plan + [("output_norm.weight", (dim,), np.float32), ("output.weight", (vocab, dim), np.float16)]


def add_metadata(writer, s: dict, source) -> int:
    """The model's hyperparameters, and every tokenizer.* field of `source` (a GGUFReader) as it is;
    returns the vocabulary size."""
    import gguf

    writer.add_name(f"random LLaMA ({s['dim']} x {s['n_layer']})")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_context_length(s["context"])
    writer.add_embedding_length(s["dim"])
    writer.add_block_count(s["n_layer"])
    writer.add_feed_forward_length(s["ffn"])
    writer.add_head_count(s["n_head"])
    writer.add_head_count_kv(s["n_kv_head"])
    writer.add_rope_dimension_count(s["dim"] // s["n_head"])
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    for key, field in source.fields.items():
        if key.startswith("tokenizer."):
            sub = field.types[1] if len(field.types) > 1 else None
            writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub)
    vocab = len(source.fields["tokenizer.ggml.tokens"].contents())
    writer.add_vocab_size(vocab)
    return vocab


def write_random_gguf(path: Path, s: dict, seed: int = 0) -> None:
    """An F16 GGUF of shape `s` with random weights, written one tensor at a time: the tensor infos
    first, then each tensor's data as it is drawn (peak memory: one tensor)."""
    import gguf

    source = gguf.GGUFReader(cache_dir() / GGUF_NAME)  # the embedded model's tokenizer
    table, rng = normal_table(), np.random.default_rng(seed)
    with atomic_file(path) as tmp:
        writer = gguf.GGUFWriter(tmp, "llama")
        plan = tensor_plan(s, add_metadata(writer, s, source))
        for name, shape, dtype in plan:
            writer.add_tensor_info(name, shape, np.dtype(dtype), int(np.prod(shape)) * np.dtype(dtype).itemsize)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for name, shape, dtype in plan:
            if dtype == np.float32:  # the norms
                data = np.ones(shape, dtype=np.float32)
            else:
                data = table[rng.integers(0, 65536, size=shape, dtype=np.uint16)]
            writer.write_tensor_data(data)
        writer.close()


def fresh(output: Path, source: Path) -> bool:
    return output.exists() and output.stat().st_mtime >= source.stat().st_mtime


def run_measured(cmd: List[str]) -> dict:
    """Run `cmd` (from the repo root), with its wall time and peak memory; a failure raises."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    poller = MemoryPoller(proc.pid)
    out, _ = proc.communicate()
    mem = poller.stop()
    if proc.returncode != 0:
        raise UserError(f"{' '.join(cmd)} failed ({proc.returncode}): {out.strip()[-2000:]}")
    return {"seconds": time.perf_counter() - t, **mem, "command": " ".join(cmd)}


def dir_size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def needed(systems: List[str]) -> List[str]:
    """The work_dir files the systems read, in the order they are made."""
    names = {"f16"}
    for name in systems:
        s = SYSTEMS[name]
        names |= {s.gguf} | ({s.checkpoint} if s.checkpoint else set())
    names |= {CONVERSIONS[n][0] for n in names if n in CONVERSIONS}
    names |= {"bf16" for n in names if n in ("int8", "int4")}
    order = ["f16", "q4_0", "q8_0", "kept-q4_0", "kept-q8_0", "bf16", "int8", "int4"]
    return [n for n in order if n in names]


def checkpoint_command(work: Path, name: str):
    """(input, output directory, command) of a checkpoint directory: a GGUF converted by
    scripts/convert_gguf_checkpoint.py, or int8 / int4 written by quantize/weight_only.py."""
    if name in CONVERSIONS:
        kind, flags = CONVERSIONS[name]
        src, out = gguf_path(work, kind), work / name
        return src, out, ["scripts/convert_gguf_checkpoint.py", "--gguf_path", str(src), "--output_dir", str(out), *flags]
    src, out = work / "bf16" / "lit_config.json", work / name
    return src, out, [str(WEIGHT_ONLY_SCRIPT.relative_to(ROOT)), "--checkpoint_dir", str(work / "bf16"),
                      "--quantize", name, "--output_dir", str(out)]


def make_one(work: Path, name: str, shape: str) -> Optional[dict]:
    """Make one work_dir file unless it is fresh; its record (time, memory), None when skipped."""
    t = time.perf_counter()
    if name == "f16":
        if gguf_path(work, "f16").exists():
            return None
        write_random_gguf(gguf_path(work, "f16"), SHAPES[shape])
    elif name in ("q4_0", "q8_0"):
        if fresh(gguf_path(work, name), gguf_path(work, "f16")):
            return None
        llama_cpp_quantize(gguf_path(work, "f16"), gguf_path(work, name), name)
    else:
        src, out, cmd = checkpoint_command(work, name)
        if fresh(out / "lit_config.json", src):
            return None
        if out.exists():
            shutil.rmtree(out)  # before the new one is written: the disk holds one copy
        return run_measured([sys.executable, *cmd])
    return {"seconds": time.perf_counter() - t}


def read_record(work: Path, shape: str) -> Optional[dict]:
    """make.json of work_dir, if any; a model of another shape there is an error."""
    path = work / "make.json"
    record = json.loads(path.read_text()) if path.exists() else None
    if record is not None and record["shape"] != shape:
        raise UserError(f"{work} holds a model of shape {record['shape']!r}, not {shape!r}: use another --work_dir")
    return record


def make(work: Path, shape: str, systems: List[str]) -> dict:
    """Make the files the systems need; make.json keeps each step's time, peak memory and size."""
    work.mkdir(parents=True, exist_ok=True)
    record_path = work / "make.json"
    record = read_record(work, shape) or {"shape": shape, "steps": {}}
    for name in needed(systems):
        step = make_one(work, name, shape)
        if step is not None:
            out = work / name if (work / name).is_dir() else gguf_path(work, name)
            record["steps"][name] = {**step, "size_gb": dir_size(out) / 1e9}
            print(f"made {out}: {step['seconds']:.0f} s, {record['steps'][name]['size_gb']:.2f} GB", file=sys.stderr)
            with atomic_file(record_path) as tmp:
                tmp.write_text(json.dumps(record, indent=2))
    return record


# ---------------------------------------------------------------- one system, in its own process


class LitModel(LitRunner):
    """lit_llama loaded as the inference scripts load it (generation_speed.LitRunner's `run`: the
    `generate` loop as it is); the compiled step compiled and warmed up here, its time kept."""

    def __init__(self, checkpoint: Path, s: System, compile: bool, length: int):
        _, self.model, _ = load_for_inference(checkpoint, s.precision, quantize=s.quantize, compile=compile)
        self.device = torch.device("cpu")
        self.loaded = time.time()
        self.compile_s = None
        if compile:
            self.step = compile_decode_step(self.device)
            self.compile_s = warm_up(self.model, self.step, self.device, length)
        else:
            self.step = decode_step
            prepare_cache(self.model, length)  # the same cache size as the compiled step's


def measure(spec: dict) -> dict:
    """Load, then decode (--prompt_tokens, --new_tokens) and prefill (--prefill_tokens): one row."""
    poller = MemoryPoller()
    torch.set_num_threads(spec["threads"])
    s, work = SYSTEMS[spec["system"]], Path(spec["work_dir"])
    P, N, F = spec["prompt_tokens"], spec["new_tokens"], spec["prefill_tokens"]
    length = max(P + N, F + 1)
    if s.checkpoint is None:
        runner = LlamaCppRunner({"exports": {s.gguf: str(gguf_path(work, s.gguf))}, "threads": spec["threads"]},
                                s.gguf, 1, length)
        loaded, compile_s, vocab = time.time(), None, runner.n_vocab
    else:
        runner = LitModel(work / s.checkpoint, s, spec["compile"], length)
        loaded, compile_s, vocab = runner.loaded, runner.compile_s, runner.model.config.vocab_size
    t = time.time()
    first, decode_s, tokens = runner.run(prompts(1, P, vocab, "random"), N)
    prefill_s = runner.run(prompts(1, F, vocab, "random"), 1)[0]
    return {"load_s": loaded - spec["spawn_time"], "first_token_s": t + first - spec["spawn_time"], "compile_s": compile_s,
            "decode_tok_s": (N - 1) / decode_s, "prefill_tok_s": F / prefill_s, "tokens": tokens[:N_TOKENS_KEPT],
            **poller.stop()}


def memory_cgroup(limit_gb: float) -> Path:
    """A memory cgroup (v2, else v1's memory controller) that holds a process's memory, page cache
    included, to `limit_gb`: a machine with that much memory, for the bigger-than-memory rows."""
    name = f"lit_llama_bench_{os.getpid()}"
    for root, limit_file in ((Path("/sys/fs/cgroup"), "memory.max"), (Path("/sys/fs/cgroup/unified"), "memory.max"),
                             (Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes")):
        if (root / "cgroup.procs").exists() and (limit_file != "memory.max" or (root / "cgroup.controllers").exists()
                                                  and "memory" in (root / "cgroup.controllers").read_text()):
            group = root / name
            group.mkdir(exist_ok=True)
            (group / limit_file).write_text(str(int(limit_gb * 1e9)))
            return group
    raise UserError("--memory_limit_gb needs a memory cgroup that this user can create (root, cgroup v1 or v2)")


def run_child(spec: dict, timeout: float) -> dict:
    """One (system, threads, compile) in a fresh process (inside a memory cgroup of
    spec["memory_limit_gb"] where given); a failure becomes the row's error."""
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "MKL_NUM_THREADS": str(spec["threads"])}
    spec = {**spec, "spawn_time": time.time()}
    cmd = [sys.executable, __file__, "--child", json.dumps(spec)]
    group = memory_cgroup(spec["memory_limit_gb"]) if spec.get("memory_limit_gb") else None
    enter = None if group is None else (lambda: (group / "cgroup.procs").write_text(str(os.getpid())))
    try:
        out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, preexec_fn=enter)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    finally:
        if group is not None:
            group.rmdir()
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1][:300].replace("|", "/")  # a table cell
        why = f"killed by signal {-out.returncode} (out of memory?)" if out.returncode < 0 else last
        return {"error": why}
    return json.loads(out.stdout.strip().splitlines()[-1])


def weight_bytes(path: Path) -> int:
    """Bytes a decode step reads: every tensor of the GGUF file but the token embedding table."""
    import gguf

    return sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors if t.name != "token_embd.weight")


def set_page_cache(paths: List[Path], state: str) -> None:
    """Before a system's process: its files read once into the page cache (warm: a second start) or
    every clean page dropped (cold: a start after a reboot; needs root), so that every row starts alike."""
    if state == "cold":
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3")
        return
    for path in paths:
        for f in ([path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())):
            with open(f, "rb") as fh:
                while fh.read(64 << 20):
                    pass


def run(work: Path, systems: List[str], threads: List[int], compiles: List[bool], spec: dict, timeout: float) -> List[dict]:
    """Every (threads, system, compile) measured in a process of its own, one at a time: the rows."""
    missing = [str(p) for p in {gguf_path(work, SYSTEMS[n].gguf) for n in systems} |
               {work / SYSTEMS[n].checkpoint for n in systems if SYSTEMS[n].checkpoint} if not p.exists()]
    if missing:
        raise UserError(f"missing {', '.join(sorted(missing))}: run --step make first")
    rows, sizes = [], {}
    for n in threads:
        for name in systems:
            for compile in compiles if SYSTEMS[name].checkpoint else [False]:
                kind = SYSTEMS[name].gguf
                sizes.setdefault(kind, weight_bytes(gguf_path(work, kind)))
                s = SYSTEMS[name]
                set_page_cache([work / s.checkpoint if s.checkpoint else gguf_path(work, kind)], spec["page_cache"])
                row = {"system": name, "threads": n, "compile": compile,
                       **run_child({**spec, "system": name, "threads": n, "compile": compile}, timeout)}
                if "decode_tok_s" in row:
                    row["gb_s"] = row["decode_tok_s"] * sizes[kind] / 1e9
                result = row.get("error") or f"{row['decode_tok_s']:.2f} tok/s decode"
                print(f"{label(row)}, {n} threads: {result}", file=sys.stderr)
                rows.append(row)
    return rows


# ---------------------------------------------------------------- table


COLUMNS = [("decode tok/s", "decode_tok_s", ".2f"), ("GB/s", "gb_s", ".1f"), ("prefill tok/s", "prefill_tok_s", ".1f"),
           ("load s", "load_s", ".1f"), ("start→first token s", "first_token_s", ".1f"), ("compile s", "compile_s", ".1f"),
           ("peak RssAnon GB", "peak_RssAnon_gb", ".2f"), ("peak RssFile GB", "peak_RssFile_gb", ".2f"),
           ("VmHWM GB", "peak_VmHWM_gb", ".2f")]


def label(row: dict) -> str:
    if not SYSTEMS[row["system"]].checkpoint:
        return row["system"]
    return f"{row['system']} ({'compile' if row['compile'] else 'eager'})"


def fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def table(rows: List[dict]) -> str:
    lines = ["| system | threads | " + " | ".join(c[0] for c in COLUMNS) + " |", "|---|---|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = [f"failed: {r['error']}"] + [""] * (len(COLUMNS) - 1) if "error" in r else \
                [fmt(r.get(key), spec) for _, key, spec in COLUMNS]
        lines.append(f"| {label(r)} | {r['threads']} | " + " | ".join(cells) + " |")
    peers = {(r["system"], r["threads"]): r for r in rows if not SYSTEMS[r["system"]].checkpoint and "error" not in r}
    for r in rows:  # ours / llama.cpp's, same threads
        peer = next((peers.get((p, r["threads"])) for o, p in PAIRS if o == r["system"]), None)
        if peer is None or "error" in r:
            continue
        cells = ["" if key == "compile_s" or not peer.get(key) or r.get(key) is None else f"{r[key] / peer[key]:.2f}x"
                 for _, key, _ in COLUMNS]
        lines.append(f"| {label(r)} / {peer['system']} | {r['threads']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def header(shape: str, spec: dict) -> str:
    lines = open("/proc/cpuinfo").read().splitlines()
    flags = next((l.split(":", 1)[1].split() for l in lines if l.startswith("flags")), [])
    cpu = next((l.split(":", 1)[1].strip() for l in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
                if l.startswith("Model name")), "unknown CPU")
    has = ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in ("avx512f", "avx512_bf16", "amx_tile"))
    try:
        import llama_cpp

        lcp = f"llama-cpp-python {llama_cpp.__version__}"
    except ImportError:
        lcp = "no llama-cpp-python"
    s = SHAPES[shape]
    return (f"LLaMA of shape {shape} (dim {s['dim']}, {s['n_layer']} layers, {s['n_head']} heads, FFN {s['ffn']}, "
            f"vocabulary 49,152, untied), random weights; CPU {cpu} ({has}); torch {torch.__version__}, {lcp}. "
            f"Decode: {spec['new_tokens']} greedy tokens after a {spec['prompt_tokens']}-token prompt, tok/s over tokens "
            f"2..{spec['new_tokens']}; prefill: a {spec['prefill_tokens']}-token prompt / time to its first token; "
            "GB/s: decode tok/s x bytes of the GGUF's weights but the embedding table (lit_llama's rows: their llama.cpp "
            "peer's file); each row one run in a fresh process; load and first-token times from the process's start; "
            "lit_llama activations float32 except bf16's; llama.cpp's default F16 KV cache; "
            f"page cache {spec.get('page_cache', 'warm')} at each start; "
            + (f"each process in a memory cgroup of {spec['memory_limit_gb']} GB (page cache included); "
               if spec.get("memory_limit_gb") else "") + "load average after the run "
            f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}. " + llama_cpp_build())


def write_docs_section(text: str) -> None:
    from report import write_section  # benchmarks/report.py: this script's folder is first on sys.path

    write_section(DOCS_TITLE, text, " ".join(["python benchmarks/large_model.py"] + sys.argv[1:]))


# ---------------------------------------------------------------- main


def main(step: str = "all", work_dir: Path = DEFAULT_WORK, shape: str = "7b", systems: str = ",".join(SYSTEMS),
         threads: str = "2", compile: str = "false,true", new_tokens: int = 32, prompt_tokens: int = 20,
         prefill_tokens: int = 512, timeout: float = 3600.0, page_cache: str = "warm", memory_limit_gb: float = 0.0,
         write_docs: bool = False, child: str = "") -> None:
    """Benchmark a 7B-shaped random LLaMA in llama.cpp and lit_llama on the same GGUF files.

    Args:
        step: make (the files), run (the table), all (both), or report (the table of the last run,
            from work_dir/run.json, printed and with --write_docs written again).
        work_dir: where the files go (tens of GB for 7B; outside the repository).
        shape: 7b, or tiny (a small model of the same kind, for tests).
        systems: comma-separated: llama_cpp_q4_0, llama_cpp_q8_0, llama_cpp_f16, lit_q4_0, lit_q8_0,
            lit_int4, lit_int8, lit_bf16.
        threads: comma-separated thread counts (torch.set_num_threads; llama.cpp's n_threads, n_threads_batch).
        compile: comma-separated: false (eager decode step), true (compiled), for lit_llama's rows.
        new_tokens: greedy tokens generated for decode speed (tok/s over tokens 2..new_tokens).
        prompt_tokens: the decode prompt's length.
        prefill_tokens: the prefill prompt's length.
        timeout: seconds a system's process may run.
        page_cache: warm (each system's files read into the page cache before its process starts: a
            second start) or cold (the page cache dropped first: a first start; needs root).
        memory_limit_gb: run each system's process in a memory cgroup of this size (page cache
            included; 0: no limit): a model whose file is larger runs from its memory map, paging
            its weights in from the file at every step, where anonymous copies would be killed.
        write_docs: write the table into docs/benchmarks.md, section "7B-shaped model".
        child: internal: a JSON spec of one system to measure in this process.
    """
    if child:
        print(json.dumps(measure(json.loads(child))))
        return
    names, n_threads = split(systems), [int(t) for t in split(threads)]
    compiles = [{"false": False, "true": True}[c.lower()] for c in split(compile)]
    unknown = [n for n in names if n not in SYSTEMS] + ([shape] if shape not in SHAPES else [])
    if unknown or step not in ("make", "run", "all", "report") or new_tokens < 2 or page_cache not in ("warm", "cold"):
        raise UserError(f"unknown {unknown or step!r} (or --new_tokens under 2); see --help")
    work = Path(work_dir).resolve()
    if work == ROOT or ROOT in work.parents:
        raise UserError(f"--work_dir {work} is inside the repository; give one outside it")
    if step == "report":
        record = json.loads((work / "run.json").read_text())
        text = record["header"] + "\n\n" + table(record["rows"])
        print(text)
        if write_docs:
            write_docs_section(text)
        return
    read_record(work, shape)
    if step in ("make", "all"):
        make(work, shape, names)
    if step == "make":
        return
    spec = {"work_dir": str(work), "new_tokens": new_tokens, "prompt_tokens": prompt_tokens, "prefill_tokens": prefill_tokens,
            "memory_limit_gb": memory_limit_gb, "page_cache": page_cache}
    rows = run(work, names, n_threads, compiles, spec, timeout)
    text = header(shape, spec) + "\n\n" + table(rows)
    with atomic_file(work / "run.json") as tmp:
        tmp.write_text(json.dumps({"shape": shape, **spec, "header": text.split("\n\n")[0], "rows": rows}, indent=2))
    print(text)
    if write_docs:
        write_docs_section(text)


if __name__ == "__main__":
    run_cli(main)
