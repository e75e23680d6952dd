"""Serve a model over an OpenAI-compatible HTTP API, with a web chat page: `python serve.py`."""

import os
import socket
import sys
from pathlib import Path
from typing import Optional

import uvicorn

from lit_llama.infer.engine import cache_row_bytes
from lit_llama.infer.load import FinetunedArgs, LoadArgs, load_chat_model
from lit_llama.infer.speculative import SpeculativeArgs
from lit_llama.io.checkpoint import DEFAULT_INFERENCE_DIR
from lit_llama.serve.server import Jobs, Server, create_app
from lit_llama.templates import get_template
from lit_llama.utils import UserError, run_cli


def main(
    checkpoint_dir: Path = DEFAULT_INFERENCE_DIR,
    weights: FinetunedArgs = FinetunedArgs(),
    template: Optional[str] = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: Optional[str] = None,
    model_name: Optional[str] = None,
    max_queue: int = 64,
    max_batch_size: int = 8,
    max_seq_length: int = 4096,
    prefix_cache_gb: float = 1.0,
    compile: bool = False,
    default_max_tokens: int = 1024,
    loading: LoadArgs = LoadArgs(),
    speculative: SpeculativeArgs = SpeculativeArgs(),
) -> None:
    """OpenAI-compatible server: POST /v1/chat/completions and /v1/completions (with "stream": true as
    server-sent events), GET /v1/models, GET /health, GET /metrics (Prometheus), and a web chat page
    at /. Requests run together, as rows of one batch: a newcomer joins the running batch at the next
    step and a finished one leaves it at once (continuous batching); a prompt that starts like a
    recent one reuses its keys and values (prefix cache).

    Args:
        checkpoint_dir: the model's checkpoint directory (default: the embedded SmolLM2-135M-Instruct).
        template: the chat template (checkpoint, chatml, llama-2, alpaca, vicuna, baize); default: the
            one recorded with the weights, else the checkpoint's own.
        host: the address to listen on; the default answers only this machine.
        port: the TCP port (0: any free one, printed at start).
        api_key: if given, every /v1 request must send `Authorization: Bearer API_KEY` (default: the
            LIT_LLAMA_API_KEY environment variable, which keeps the key out of the process list).
        model_name: the model id clients name (default: the checkpoint directory's name).
        max_queue: requests allowed to wait for a row of the batch; more are answered 503.
        max_batch_size: requests decoded together (each choice of a request with n > 1 counts).
        max_seq_length: tokens (prompt and answer) one request may hold in the KV cache; longer
            requests are answered 400. Each row of the cache costs memory for this many positions.
        prefix_cache_gb: memory for cache rows beyond max_batch_size that keep recent prompts'
            keys and values for reuse (a request takes the row sharing the longest prefix with its
            prompt, else the least recently used); 0: no prefix cache, every prompt is computed.
        compile: compile the batched decode step (a few graphs, one per batch-size and key-length
            bucket, compiled as they are first needed; faster decoding after that).
        default_max_tokens: the longest answer of a chat request that sets no max_tokens (OpenAI's
            default is the rest of the context, which makes every such request pay for a KV cache of the
            whole context); 0 for the rest of the context.
    """
    api_key = api_key or os.environ.get("LIT_LLAMA_API_KEY") or None
    if not 0 <= port < 65536:
        raise UserError(f"--port must be in 0..65535, got {port}")
    if max_queue < 1:
        raise UserError(f"--max_queue must be at least 1, got {max_queue}")
    if max_batch_size < 1:
        raise UserError(f"--max_batch_size must be at least 1, got {max_batch_size}")
    if max_seq_length < 2:
        raise UserError(f"--max_seq_length must be at least 2, got {max_seq_length}")
    if prefix_cache_gb < 0:
        raise UserError(f"--prefix_cache_gb must be at least 0, got {prefix_cache_gb}")
    if default_max_tokens < 0:
        raise UserError(f"--default_max_tokens must be at least 0, got {default_max_tokens}")
    speculative.check()
    if template not in (None, "checkpoint"):
        get_template(template)  # an unknown name fails before any loading
    # bind first: a port in use is one clear line, before minutes of loading
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}")
    fabric, model, tokenizer, fmt, source = load_chat_model(checkpoint_dir, loading.precision, template=template,
                                                            quantize=loading.quantize, compile=compile,
                                                            kv_cache_dtype=loading.kv_cache_dtype, **vars(weights))
    drafter = speculative.drafter(tokenizer, fabric, loading.precision)
    name = model_name or Path(checkpoint_dir).name
    max_seq_length = min(max_seq_length, model.config.block_size)
    row = cache_row_bytes(model, max_seq_length)
    rows = max_batch_size + int(prefix_cache_gb * 1e9 // row)
    print(f"KV cache: {rows} rows of {max_seq_length} tokens ({rows * row / 1e9:.2f} GB), up to {max_batch_size} "
          f"decoding at once, prefix cache {'on' if prefix_cache_gb > 0 else 'off'}", file=sys.stderr, flush=True)
    jobs = Jobs(model, tokenizer, fmt, fabric.device, max_queue=max_queue, max_batch_size=max_batch_size,
                max_seq_length=max_seq_length, compile=compile, cache_rows=rows, prefix_cache=prefix_cache_gb > 0,
                drafter=drafter, draft_tokens=speculative.draft_tokens)
    server = Server(jobs, name, api_key, default_max_tokens=default_max_tokens or None)
    app = create_app(server)
    port = sock.getsockname()[1]
    url_host = f"[{host}]" if ":" in host else host
    print(f"serving {name} (chat template {fmt.template.name}: {source}) at http://{url_host}:{port} "
          f"- OpenAI API under /v1, web chat at /{', API key required' if api_key else ''}",
          file=sys.stderr, flush=True)
    if not api_key and host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {host} without --api_key: anyone who can reach it can use the model",
              file=sys.stderr, flush=True)
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2)
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    run_cli(main)
