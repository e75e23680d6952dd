"""Load benchmark of serve.py beside llama.cpp's server: requests per second, generated tokens per
second and latency percentiles at 1, 2, 4, 8 and 16 concurrent clients, with and without the prefix
cache, and the first-token time of a request that shares a long prefix with the one before;
written into docs/benchmarks.md.

Starts each server on this machine (loopback only), then each client sends streamed chat
completions back to back; every request asks for --max_tokens tokens of a different prompt
(greedy; an answer that ends earlier is counted with the tokens it had).

    python benchmarks/serve_load.py [--max_tokens 32] [--servers serve.py,llama_cpp.server] [--threads 2]
"""

import http.client
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import List, Optional

from lit_llama.io.checkpoint import DEFAULT_CHECKPOINT_DIR
from lit_llama.io.default_model import GGUF_NAME, cache_dir
from lit_llama.quant.gptq import default_calibration_text
from lit_llama.utils import UserError, run_cli

ROOT = Path(__file__).resolve().parents[1]

TOPICS = ["the sea", "mountains", "a small town", "the moon", "bread", "trains", "music", "a garden", "winter",
          "bees", "the desert", "a library", "rain", "bicycles", "coffee", "owls"]


def percentile(values: List[float], q: float) -> float:
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def one_request(port: int, model: str, prompt: str, max_tokens: int) -> dict:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}], "stream": True,
                       "max_tokens": max_tokens, "temperature": 0, "stream_options": {"include_usage": True}})
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {r.read()[:300]!r}")
    first, usage, pieces = None, None, 0
    for line in r:
        line = line.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            usage = chunk["usage"]["completion_tokens"]
        if any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
            pieces += 1
            if first is None:
                first = time.perf_counter() - t0
    conn.close()
    # llama_cpp.server sends no usage chunk; it streams one token per chunk
    return {"latency": time.perf_counter() - t0, "ttft": first or 0.0, "tokens": pieces if usage is None else usage}


def run_level(port: int, model: str, clients: int, per_client: int, max_tokens: int) -> dict:
    results, errors = [], []
    barrier = threading.Barrier(clients)

    def client(i):
        barrier.wait()
        for j in range(per_client):
            topic = TOPICS[(i * per_client + j) % len(TOPICS)]
            try:
                results.append(one_request(port, model, f"Write a long, detailed story about {topic}.", max_tokens))
            except Exception as e:  # noqa: BLE001 (counted and reported)
                errors.append(str(e))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, e.g. {errors[0]}")
    lat, ttft = [r["latency"] for r in results], [r["ttft"] for r in results]
    return {"clients": clients, "requests": len(results), "wall": wall, "rps": len(results) / wall,
            "tok_s": sum(r["tokens"] for r in results) / wall, "tokens": statistics.mean(r["tokens"] for r in results),
            "p50": percentile(lat, 0.5), "p90": percentile(lat, 0.9), "p99": percentile(lat, 0.99),
            "ttft50": percentile(ttft, 0.5), "ttft90": percentile(ttft, 0.9)}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: List[str], threads: Optional[int], port: int):
    """Start a server process listening on `port`; returns it once GET /v1/models answers."""
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: List[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()  # keep the pipe drained
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/v1/models")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            time.sleep(0.3)
    proc.terminate()
    raise UserError(f"{' '.join(args[:3])} did not start: {''.join(lines)[-500:]}")


def long_document(tokens: int = 1500) -> str:
    """About `tokens` tokens of English (Python's reference documentation) for the prefix test."""
    return default_calibration_text()[: tokens * 4]


def prefix_test(port: int, model: str) -> dict:
    """First-token times of two requests sharing a long document (a system message), different
    questions: the second can take the document's keys and values from the prefix cache."""
    doc = long_document()

    def ask(question):
        body = json.dumps({"model": model, "stream": True, "max_tokens": 4, "temperature": 0,
                           "stream_options": {"include_usage": True},
                           "messages": [{"role": "system", "content": doc}, {"role": "user", "content": question}]})
        t0 = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        first, usage = None, {}
        for line in r:
            line = line.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            if first is None and any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                first = time.perf_counter() - t0
        conn.close()
        return first or time.perf_counter() - t0, usage

    a, usage = ask("What is this text about?")
    b, usage_b = ask("Summarize it in one sentence.")
    cached = ((usage_b or {}).get("prompt_tokens_details") or {}).get("cached_tokens")
    return {"first": a, "second": b, "prompt_tokens": (usage or {}).get("prompt_tokens"), "cached": cached}


SERVERS = {
    "serve.py": lambda ckpt, gguf, port, threads: ["serve.py", "--port", str(port), "--checkpoint_dir", str(ckpt)],
    "serve.py --prefix_cache_gb 0": lambda ckpt, gguf, port, threads: [
        "serve.py", "--port", str(port), "--checkpoint_dir", str(ckpt), "--prefix_cache_gb", "0"],
    "serve.py --compile": lambda ckpt, gguf, port, threads: [
        "serve.py", "--port", str(port), "--checkpoint_dir", str(ckpt), "--compile", "true"],
    "serve.py --max_batch_size 1": lambda ckpt, gguf, port, threads: [
        "serve.py", "--port", str(port), "--checkpoint_dir", str(ckpt), "--max_batch_size", "1"],
    # llama-cpp-python's server runs one request at a time (a lock around its one model); --cache:
    # its prompt cache (LlamaRAMCache); by default a new request interrupts the one running (which
    # then ends empty): --interrupt_requests false makes it wait its turn
    "llama_cpp.server": lambda ckpt, gguf, port, threads: [
        "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", Path(ckpt).name, "--port", str(port),
        "--n_ctx", "4096", "--n_threads", str(threads or os.cpu_count()), "--n_threads_batch",
        str(threads or os.cpu_count()), "--cache", "true", "--interrupt_requests", "false"],
}


def main(checkpoint_dir: Path = DEFAULT_CHECKPOINT_DIR, max_tokens: int = 32, requests_per_client: int = 1,
         levels: str = "1,2,4,8,16", servers: str = "serve.py,serve.py --prefix_cache_gb 0,llama_cpp.server",
         threads: Optional[int] = None, write: bool = True) -> None:
    """Measure serve.py (and llama.cpp's server on the same GGUF) under 1 to 16 concurrent clients,
    and the first-token time of a request sharing a 1,500-token prefix with the one before; write the
    tables into docs/benchmarks.md.

    Args:
        checkpoint_dir: the model to serve (default: the embedded SmolLM2-135M-Instruct, whose GGUF
            llama.cpp's server runs as shipped).
        max_tokens: tokens asked for per request.
        requests_per_client: requests each client sends, one after the other (at least 8 per level in all).
        levels: the numbers of concurrent clients, comma-separated.
        servers: which to run, comma-separated: serve.py, "serve.py --prefix_cache_gb 0" (no prefix
            cache), "serve.py --compile", "serve.py --max_batch_size 1", llama_cpp.server.
        threads: OMP_NUM_THREADS for serve.py and --n_threads for llama.cpp (default: all cores).
        write: write the tables into docs/benchmarks.md.
    """
    levels_ = [int(x) for x in levels.split(",")]
    names = [n.strip() for n in servers.split(",")]
    unknown = [n for n in names if n not in SERVERS]
    if unknown:
        raise UserError(f"unknown --servers {', '.join(unknown)}; known: {', '.join(SERVERS)}")
    gguf = cache_dir() / GGUF_NAME
    if "llama_cpp.server" in names:
        import importlib.util

        if importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("sse_starlette") is None:
            raise UserError("llama_cpp.server needs llama-cpp-python (scripts/install_llama_cpp.sh) and its server's "
                            "packages (pip install -e '.[bench]'); or leave it out of --servers")
    load_before = os.getloadavg()[0]
    model = Path(checkpoint_dir).name
    results = {}
    for name in names:
        port = free_port()
        proc = start_server(SERVERS[name](checkpoint_dir, gguf, port, threads), threads, port)
        try:
            one_request(port, model, "Hello", 4)  # warm-up (and, compiled, the first graphs)
            rows = []
            for c in levels_:
                per = max(requests_per_client, -(-8 // c))  # at least 8 requests per level
                r = run_level(port, model, c, per, max_tokens)
                rows.append(r)
                print(f"{name}: {c:>3} clients: {r['requests']} requests in {r['wall']:.1f} s, {r['rps']:.2f} req/s, "
                      f"{r['tok_s']:.1f} tok/s, latency p50 {r['p50']:.2f} s p90 {r['p90']:.2f} s, "
                      f"first token p50 {r['ttft50']:.2f} s", flush=True)
            prefix = prefix_test(port, model)
            print(f"{name}: prefix test {prefix}", flush=True)
            results[name] = (rows, prefix)
        finally:
            proc.terminate()
            proc.wait(30)
    load_after = os.getloadavg()[0]
    table = ["| server | clients | requests | requests/s | generated tokens/s | latency p50 | p90 | first token p50 | p90 |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, (rows, _) in results.items():
        for r in rows:
            table.append(f"| {name} | {r['clients']} | {r['requests']} | {r['rps']:.2f} | {r['tok_s']:.1f} | "
                         f"{r['p50']:.2f} s | {r['p90']:.2f} s | {r['ttft50']:.2f} s | {r['ttft90']:.2f} s |")
    ratios = ["| server | tokens/s, 8 clients / 1 client | first token, first request | second request (shared prefix) "
              "| ratio | cached tokens reported |", "|---|---:|---:|---:|---:|---:|"]
    for name, (rows, p) in results.items():
        by = {r["clients"]: r["tok_s"] for r in rows}
        ratio = f"{by[8] / by[1]:.2f}x" if by.get(1) and 8 in by else "-"
        ratios.append(f"| {name} | {ratio} | {p['first']:.2f} s | {p['second']:.2f} s | {p['first'] / p['second']:.1f}x "
                      f"| {p['cached'] if p['cached'] is not None else 'not reported'} of {p['prompt_tokens'] or '?'} |")
    goals = []
    if "serve.py" in results:
        rows, p = results["serve.py"]
        by = {r["clients"]: r["tok_s"] for r in rows}
        if 1 in by and 8 in by:
            goals.append(f"serve.py: 8 clients give {by[8] / by[1]:.2f}x the tokens/s of one (goal at least 3x: "
                         f"{'met' if by[8] >= 3 * by[1] else 'not met'})")
        goals.append(f"serve.py: first token of a request sharing a {p['prompt_tokens']}-token prompt's prefix "
                     f"{p['first'] / p['second']:.1f}x sooner (goal at least 5x: "
                     f"{'met' if p['first'] >= 5 * p['second'] else 'not met'})")
    note = (f"\n\nStreamed chat completions of {max_tokens} tokens (greedy), each client sending its requests back "
            f"to back, one prompt per request, against each server on this machine (loopback)"
            f"{f', {threads} threads' if threads else ''}. serve.py runs the float32 checkpoint converted from the "
            f"GGUF; llama_cpp.server (llama-cpp-python, one request at a time, its prompt cache on) runs the GGUF as "
            f"shipped ({GGUF_NAME}). \"First token\" includes the wait for a row. Prefix test: two requests whose "
            f"system message is the same ~1,500-token document, different questions, 4 tokens each; the second's "
            f"first-token time against the first's. Load average {load_before:.1f} before the run and "
            f"{load_after:.1f} at its end on {os.cpu_count()} cores: compare rows of one run rather than runs.")
    text = "\n".join(table) + "\n\n" + "\n".join(ratios) + note + "".join(f"\n- {g}" for g in goals)
    print(text)
    if write:
        from report import write_section  # benchmarks/report.py: this script's folder is first on sys.path

        cmd = "python benchmarks/serve_load.py" + "".join(f" --{k} {v!r}" for k, v in
                                                          (("threads", threads), ("servers", servers)) if v)
        write_section(f"Serving load ({model})", text, cmd)


if __name__ == "__main__":
    run_cli(main)
