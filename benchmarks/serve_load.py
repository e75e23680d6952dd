"""Load benchmark of serve.py: requests per second, generated tokens per second and latency
percentiles at 1, 4 and 16 concurrent clients, written into docs/benchmarks.md.

Starts `serve.py --port 0` on this machine (loopback only), then each client sends streamed chat
completions back to back; every request asks for exactly --max_tokens tokens of a different prompt
(greedy; an answer that ends earlier is counted with the tokens it had). The server runs requests
one at a time on its one model, so throughput stays flat while latency grows with the queue.

    python benchmarks/serve_load.py [--checkpoint_dir ...] [--max_tokens 32] [--requests_per_client 2]
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lit_llama.checkpoint import DEFAULT_CHECKPOINT_DIR  # noqa: E402
from lit_llama.utils import UserError, run_cli  # noqa: E402

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
    first, tokens = None, 0
    for line in r:
        line = line.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
        if first is None and any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
            first = time.perf_counter() - t0
    conn.close()
    return {"latency": time.perf_counter() - t0, "ttft": first or 0.0, "tokens": tokens}


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


def start_server(checkpoint_dir: Path, threads: Optional[int]):
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.Popen([sys.executable, "serve.py", "--port", "0", "--checkpoint_dir", str(checkpoint_dir)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if " at http://127.0.0.1:" in line:
            port = int(line.split(" at http://127.0.0.1:")[1].split()[0])
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep the pipe drained
            break
    else:
        raise UserError("serve.py did not start")
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc, port
        except OSError:
            time.sleep(0.2)
    proc.terminate()
    raise UserError("serve.py does not answer /health")


def main(checkpoint_dir: Path = DEFAULT_CHECKPOINT_DIR, max_tokens: int = 32, requests_per_client: int = 2,
         levels: str = "1,4,16", threads: Optional[int] = None, write: bool = True) -> None:
    """Measure serve.py under 1, 4 and 16 concurrent clients and write the table into docs/benchmarks.md.

    Args:
        checkpoint_dir: the model to serve (default: the embedded SmolLM2-135M-Instruct).
        max_tokens: tokens asked for per request.
        requests_per_client: requests each client sends, one after the other (at least 8 per level in all).
        levels: the numbers of concurrent clients, comma-separated.
        threads: OMP_NUM_THREADS for the server (default: torch's choice).
        write: write the table into docs/benchmarks.md.
    """
    levels_ = [int(x) for x in levels.split(",")]
    load_before = os.getloadavg()[0]
    proc, port = start_server(checkpoint_dir, threads)
    model = Path(checkpoint_dir).name
    try:
        one_request(port, model, "Hello", 4)  # warm-up
        rows = []
        for c in levels_:
            per = max(requests_per_client, -(-8 // c))  # at least 8 requests per level
            r = run_level(port, model, c, per, max_tokens)
            rows.append(r)
            print(f"{c:>3} clients: {r['requests']} requests in {r['wall']:.1f} s, {r['rps']:.2f} req/s, "
                  f"{r['tok_s']:.1f} tok/s, latency p50 {r['p50']:.2f} s p90 {r['p90']:.2f} s p99 {r['p99']:.2f} s, "
                  f"first token p50 {r['ttft50']:.2f} s", flush=True)
        load_after = os.getloadavg()[0]
    finally:
        proc.terminate()
        proc.wait(30)
    table = ["| clients | requests | requests/s | generated tokens/s | latency p50 | p90 | p99 | first token p50 | p90 |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        table.append(f"| {r['clients']} | {r['requests']} | {r['rps']:.2f} | {r['tok_s']:.1f} | {r['p50']:.2f} s | "
                     f"{r['p90']:.2f} s | {r['p99']:.2f} s | {r['ttft50']:.2f} s | {r['ttft90']:.2f} s |")
    note = (f"\n\nStreamed chat completions of {max_tokens} tokens (greedy, {rows[0]['tokens']:.0f} generated on "
            f"average), each client sending its requests back to back, against `serve.py` on this machine "
            f"(loopback){f', OMP_NUM_THREADS={threads}' if threads else ''}. Requests run one at a time on the "
            f"one model, so requests/s stays flat and latency grows with the number of clients waiting; "
            f"\"first token\" includes the wait in the queue. Load average {load_before:.1f} before the run and "
            f"{load_after:.1f} at its end on {os.cpu_count()} cores: on a shared machine other processes take part "
            f"of the CPU, so compare rows of one run rather than runs.")
    text = "\n".join(table) + note
    print(text)
    if write:
        from benchmarks.report import write_section

        cmd = "python benchmarks/serve_load.py" + (f" --threads {threads}" if threads else "")
        write_section(f"Serving load ({model})", text, cmd)


if __name__ == "__main__":
    run_cli(main)
