"""An OpenAI-compatible HTTP API over one model: the request schema, the jobs that run on the
batched engine (lit_llama/infer/engine.py), and the FastAPI app (serve.py runs it with uvicorn).

Requests are validated and tokenized on the event loop, then queued; the engine's thread decodes
every running request's next token in one batch and hands text pieces back to each request's own
asyncio queue, so concurrent clients never see each other's tokens. A client that goes away
(mid-stream, or while waiting) cancels its request: the engine drops it from the queue or frees its
row at the next step.

Why one file: the request schema, the jobs and the routes are one contract with the client, read
together when a field or an error changes.
"""

import asyncio
import hmac
import json
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Sequence, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lit_llama.infer.engine import Engine, EngineFull, Request, SamplingParams
from lit_llama.templates import ChatFormat
from lit_llama.utils import UserError

MAX_BODY_BYTES = 8 << 20
MAX_N = 16
MAX_STOP = 4

# ---------------------------------------------------------------- request schema (OpenAI's names)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, List[TextPart], None] = None
    name: Optional[str] = None


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: str
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, ge=0, le=1)
    top_k: Optional[int] = Field(None, ge=1)  # not OpenAI's; vLLM and llama.cpp's servers have it
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Union[str, List[str], None] = None
    seed: Optional[int] = None
    user: Optional[str] = None
    # accepted with their neutral values only
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[Dict[str, float]] = None


class ChatRequest(_Sampling):
    messages: List[Message] = Field(min_length=1)
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None
    response_format: Optional[Dict[str, Any]] = None
    tools: Optional[List[Any]] = None
    tool_choice: Optional[Any] = None
    parallel_tool_calls: Optional[bool] = None
    functions: Optional[List[Any]] = None
    function_call: Optional[Any] = None
    store: Optional[bool] = None
    metadata: Optional[Dict[str, str]] = None


class CompletionRequest(_Sampling):
    prompt: Union[str, List[str], List[int], List[List[int]]]
    max_tokens: Optional[int] = 16  # OpenAI's default for completions
    echo: bool = False
    logprobs: Optional[int] = None
    suffix: Optional[str] = None
    best_of: Optional[int] = None


class APIError(Exception):
    """An error answered as OpenAI does: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def validation_error(e: ValidationError) -> APIError:
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err.get("loc", ()))
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {loc}", param=loc)
    if kind == "missing":
        return APIError(400, f"Missing required parameter: '{loc}'.", param=loc)
    return APIError(400, f"Invalid value for '{loc}': {err.get('msg', 'invalid')}.", param=loc,
                    code="invalid_value" if loc else None)


def parse_body(raw: bytes, cls):
    if len(raw) > MAX_BODY_BYTES:
        raise APIError(413, f"The request body is larger than {MAX_BODY_BYTES >> 20} MiB.")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"We could not parse the JSON body of your request ({e}). The body must be a JSON "
                            f"object.", code="invalid_json")
    if not isinstance(body, dict):
        raise APIError(400, "The body of your request must be a JSON object.", code="invalid_json")
    try:
        return cls.model_validate(body)
    except ValidationError as e:
        raise validation_error(e)


def _unsupported(req, **neutral) -> None:
    for name, ok in neutral.items():
        value = getattr(req, name)
        if value is not None and not ok(value):
            raise APIError(400, f"'{name}'={value!r} is not supported by this server.", param=name,
                           code="unsupported_value")


def stop_list(stop) -> List[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP:
        raise APIError(400, f"'stop' may have at most {MAX_STOP} sequences, got {len(stops)}.", param="stop")
    if any(not s for s in stops):
        raise APIError(400, "'stop' sequences must not be empty.", param="stop")
    return stops


# ---------------------------------------------------------------- jobs on the batched engine


@dataclass
class Job:
    prompts: List[List[int]]  # one or more prompts (token ids); each gets n choices
    n: int
    max_tokens: int
    temperature: float
    top_p: float
    top_k: Optional[int]
    stop_ids: Sequence[int]
    stop_strings: Sequence[str]
    seed: Optional[int]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    requests: List[Request] = field(default_factory=list)  # choice i is requests[i]

    def put(self, *event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def cancel(self) -> None:
        for r in self.requests:
            r.cancel()

    @property
    def cached_tokens(self) -> int:
        # the prompt counts once however many choices it has: its first choice's cached tokens
        return sum(self.requests[i * self.n].cached_tokens for i in range(len(self.prompts)))


class Jobs:
    """The server's side of the engine: each job's choices become requests of the batched engine
    (lit_llama/infer/engine.py), which runs them as rows of one batch with the other jobs'; their text
    comes back as events on the job's own asyncio queue."""

    def __init__(self, model, tokenizer, fmt: ChatFormat, device, max_queue: int = 64, max_batch_size: int = 8,
                 max_seq_length: Optional[int] = None, compile: bool = False, cache_rows: Optional[int] = None,
                 prefix_cache: bool = True, drafter=None, draft_tokens: int = 5):
        self.tokenizer, self.fmt = tokenizer, fmt
        self.engine = Engine(model, tokenizer, max_batch_size=max_batch_size, max_seq_length=max_seq_length,
                             cache_rows=cache_rows, compile=compile, max_waiting=max_queue, prefix_cache=prefix_cache,
                             device=device, drafter=drafter, draft_tokens=draft_tokens)
        self.capacity = self.engine.capacity
        self.block_size = model.config.block_size
        self.stats = {"served": 0, "cancelled": 0, "failed": 0, "tokens": 0}
        self._lock = threading.Lock()
        self.engine.start()

    def submit(self, job: Job) -> None:
        params = SamplingParams(max_new_tokens=job.max_tokens, temperature=job.temperature, top_k=job.top_k,
                                top_p=job.top_p, stop_ids=tuple(job.stop_ids), stop_strings=tuple(job.stop_strings))
        remaining = [len(job.prompts) * job.n]
        for prompt in job.prompts:
            for _ in range(job.n):
                index = len(job.requests)
                seed = None if job.seed is None else hash((job.seed, index)) & (2 ** 63 - 1)
                job.requests.append(Request(prompt, replace(params, seed=seed),
                                            on_update=lambda r, piece, i=index: self._update(job, i, r, piece, remaining)))
        try:
            self.engine.submit(*job.requests)
        except EngineFull:
            raise APIError(503, f"The server is busy ({self.engine.queued()} requests waiting). Try again later.",
                           type="server_error", code="queue_full")
        except UserError as e:
            raise APIError(400, str(e))

    def _update(self, job: Job, index: int, r: Request, piece: str, remaining: List[int]) -> None:
        # on the engine's thread
        if piece:
            job.put("text", index, piece)
        if r.finish_reason is None:
            return
        if r.finish_reason == "error":
            job.put("error", r.error)
        elif r.finish_reason != "cancelled":
            job.put("finish", index, r.finish_reason, len(r.tokens))
        with self._lock:
            self.stats["tokens"] += len(r.tokens)
            remaining[0] -= 1
            if remaining[0]:
                return
            reasons = {q.finish_reason for q in job.requests}
            key = "failed" if "error" in reasons else "cancelled" if "cancelled" in reasons else "served"
            self.stats[key] += 1
        job.put("done")

    @property
    def busy(self) -> bool:
        return self.engine.busy

    def queued(self) -> int:
        return self.engine.queued()

    def close(self) -> None:
        self.engine.close()


# ---------------------------------------------------------------- the HTTP app


def _usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class Server:
    """The request handling, apart from FastAPI's routing (create_app)."""

    def __init__(self, engine: Jobs, model_name: str, api_key: Optional[str] = None,
                 default_max_tokens: Optional[int] = None):
        self.engine, self.model_name, self.api_key = engine, model_name, api_key
        self.default_max_tokens = default_max_tokens  # for chat requests without max_tokens; None: the context
        self.created = int(time.time())

    # -------- checks shared by both endpoints

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"The model `{name}` does not exist. This server has `{self.model_name}`.",
                           param="model", code="model_not_found")

    def sampling(self, req) -> dict:
        _unsupported(req, presence_penalty=lambda v: v == 0, frequency_penalty=lambda v: v == 0,
                     logit_bias=lambda v: not v)
        temperature = 1.0 if req.temperature is None else req.temperature
        top_p = 1.0 if req.top_p is None else req.top_p
        if top_p == 0:  # only the most likely token
            temperature, top_p = 0.0, 1.0
        return dict(temperature=temperature, top_p=top_p, top_k=req.top_k, seed=req.seed)

    def budget(self, prompts: List[List[int]], max_tokens: Optional[int], param: str) -> int:
        longest = max(len(p) for p in prompts)
        if any(len(p) == 0 for p in prompts):
            raise APIError(400, "The prompt is empty.", param="prompt")
        if max_tokens is not None and max_tokens < 1:
            raise APIError(400, f"Invalid '{param}': {max_tokens}. It must be at least 1.", param=param,
                           code="invalid_value")
        # a request's prompt and answer share one row of the KV cache: its length is the limit
        limit = self.engine.capacity
        if longest >= limit or (max_tokens or 0) + longest > limit:
            what = ("This model's maximum context length" if limit == self.engine.block_size
                    else "This server's KV cache holds at most" + f" {limit} tokens per request (--max_seq_length), and its"
                    " maximum context length")
            raise APIError(400, f"{what} is {limit} tokens. However, you requested {longest + (max_tokens or 0)} "
                                f"tokens ({longest} in the prompt, {max_tokens or 0} for the completion). Please reduce "
                                f"the prompt or {param}.",
                           param=param if longest < limit else "messages", code="context_length_exceeded")
        if max_tokens is not None:
            return max_tokens
        return min(self.default_max_tokens or limit, limit - longest)

    def job(self, prompts, max_tokens, stop_ids, stop_strings, n, sampling) -> Job:
        return Job(prompts=prompts, n=n, max_tokens=max_tokens, stop_ids=stop_ids, stop_strings=stop_strings,
                   loop=asyncio.get_running_loop(), **sampling)

    # -------- endpoints

    async def chat(self, raw: bytes, request):
        from starlette.concurrency import run_in_threadpool

        req = parse_body(raw, ChatRequest)
        self.check_model(req.model)
        _unsupported(req, logprobs=lambda v: not v, top_logprobs=lambda v: not v,
                     response_format=lambda v: v.get("type") == "text", tools=lambda v: not v,
                     tool_choice=lambda v: v == "none", functions=lambda v: not v, function_call=lambda v: v == "none")
        sampling = self.sampling(req)
        messages = []
        for m in req.messages:
            content = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content or [])
            messages.append({"role": "system" if m.role == "developer" else m.role, "content": content})
        fmt = self.engine.fmt
        try:
            prompt = await run_in_threadpool(fmt.prompt_ids, messages)
        except UserError as e:
            raise APIError(400, str(e), param="messages")
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        max_tokens = self.budget([prompt], max_tokens, param)
        job = self.job([prompt], max_tokens, fmt.stop_ids, [*fmt.stop_strings, *stop_list(req.stop)], req.n, sampling)
        self.engine.submit(job)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.model_name,
                "system_fingerprint": None}
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        if req.stream:
            return self._stream_chat(job, head, len(prompt), include_usage)
        texts, reasons, counts = await self._collect(job, request, req.n)
        return {**head, "object": "chat.completion",
                "choices": [{"index": i, "message": {"role": "assistant", "content": texts[i]}, "logprobs": None,
                             "finish_reason": reasons[i]} for i in range(req.n)],
                "usage": _usage(len(prompt), sum(counts), job.cached_tokens)}

    async def completions(self, raw: bytes, request):
        req = parse_body(raw, CompletionRequest)
        self.check_model(req.model)
        _unsupported(req, logprobs=lambda v: not v, suffix=lambda v: not v, best_of=lambda v: v == req.n)
        sampling = self.sampling(req)
        tok = self.engine.tokenizer
        p = req.prompt
        if isinstance(p, str) or (isinstance(p, list) and p and all(isinstance(x, int) for x in p)):
            p = [p]
        if not p:
            raise APIError(400, "The prompt is empty.", param="prompt")
        vocab = tok.vocab_size
        prompts = []
        for x in p:
            ids = tok.encode(x).tolist() if isinstance(x, str) else list(x)
            if any(not 0 <= i < vocab for i in ids):
                raise APIError(400, f"The prompt has token ids outside the vocabulary (0..{vocab - 1}).", param="prompt")
            prompts.append(ids)
        texts_in = [x if isinstance(x, str) else tok.decode(x) for x in p]
        max_tokens = self.budget(prompts, req.max_tokens, "max_tokens")
        job = self.job(prompts, max_tokens, tok.stop_ids, stop_list(req.stop), req.n, sampling)
        self.engine.submit(job)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.model_name, "system_fingerprint": None}
        prompt_tokens = sum(len(x) for x in prompts)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        echo = [texts_in[i // req.n] if req.echo else "" for i in range(len(prompts) * req.n)]
        if req.stream:
            return self._stream_completion(job, head, prompt_tokens, include_usage, echo)
        total = len(prompts) * req.n
        texts, reasons, counts = await self._collect(job, request, total)
        return {**head, "choices": [{"index": i, "text": echo[i] + texts[i], "logprobs": None,
                                     "finish_reason": reasons[i]} for i in range(total)],
                "usage": _usage(prompt_tokens, sum(counts), job.cached_tokens)}

    # -------- results

    async def _events(self, job: Job, request=None):
        """The job's events until it is done; cancels it if the caller stops listening (a streaming
        client went away) or, for a plain request, if the client disconnects."""
        checked = time.monotonic()
        try:
            while True:
                event = None
                try:
                    event = await asyncio.wait_for(job.events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    pass
                # every half second, events or not (a batched job's tokens keep coming)
                if request is not None and time.monotonic() - checked >= 0.5:
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        return
                if event is None:
                    continue
                if event[0] == "error":
                    raise APIError(500, f"The server failed while generating: {event[1]}", type="server_error")
                if event[0] == "done":
                    return
                yield event
        finally:
            job.cancel()  # no effect once it is done; stops it (or drops it from the queue) otherwise

    async def _collect(self, job: Job, request, total: int):
        texts, reasons, counts = [""] * total, [None] * total, [0] * total
        async for event in self._events(job, request):
            if event[0] == "text":
                texts[event[1]] += event[2]
            else:
                reasons[event[1]], counts[event[1]] = event[2], event[3]
        return texts, reasons, counts

    async def _stream_chat(self, job: Job, head: dict, prompt_tokens: int, include_usage: bool):
        base = {**head, "object": "chat.completion.chunk"}
        usage = {"usage": None} if include_usage else {}
        started, total = set(), 0
        try:
            async for event in self._events(job):
                i = event[1]
                if i not in started:
                    started.add(i)
                    yield _sse({**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                     "logprobs": None, "finish_reason": None}], **usage})
                if event[0] == "text":
                    yield _sse({**base, "choices": [{"index": i, "delta": {"content": event[2]}, "logprobs": None,
                                                     "finish_reason": None}], **usage})
                else:
                    total += event[3]
                    yield _sse({**base, "choices": [{"index": i, "delta": {}, "logprobs": None,
                                                     "finish_reason": event[2]}], **usage})
        except APIError as e:
            yield _sse(e.body())
            return
        if include_usage:
            yield _sse({**base, "choices": [], "usage": _usage(prompt_tokens, total, job.cached_tokens)})
        yield "data: [DONE]\n\n"

    async def _stream_completion(self, job: Job, head: dict, prompt_tokens: int, include_usage: bool, echo):
        usage = {"usage": None} if include_usage else {}
        started, total = set(), 0
        try:
            async for event in self._events(job):
                i = event[1]
                text = ""
                if i not in started:
                    started.add(i)
                    text = echo[i]
                if event[0] == "text":
                    yield _sse({**head, "choices": [{"index": i, "text": text + event[2], "logprobs": None,
                                                     "finish_reason": None}], **usage})
                else:
                    total += event[3]
                    yield _sse({**head, "choices": [{"index": i, "text": text, "logprobs": None,
                                                     "finish_reason": event[2]}], **usage})
        except APIError as e:
            yield _sse(e.body())
            return
        if include_usage:
            yield _sse({**head, "choices": [], "usage": _usage(prompt_tokens, total, job.cached_tokens)})
        yield "data: [DONE]\n\n"

    def authorized(self, headers) -> Optional[APIError]:
        if not self.api_key:
            return None
        auth = headers.get("authorization", "")
        if not auth:
            return APIError(401, "You didn't provide an API key. Send it as 'Authorization: Bearer KEY'.",
                            code="invalid_api_key")
        given = auth[len("Bearer "):] if auth.startswith("Bearer ") else ""
        if not hmac.compare_digest(given.encode(), self.api_key.encode()):
            return APIError(401, "Incorrect API key provided.", code="invalid_api_key")
        return None

    def models(self) -> dict:
        return {"object": "list", "data": [self.model_card()]}

    def model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "lit_llama"}

    def health(self) -> dict:
        e = self.engine
        return {"status": "ok", "model": self.model_name, "queued": e.queued(), "busy": e.busy, **e.stats}

    def metrics(self) -> str:
        """The engine's counters and gauges in Prometheus' text format, under llama.cpp's server's names
        where it has one."""
        m = self.engine.engine.metrics()
        rows = [("prompt_tokens_total", "counter", "prompt tokens of the requests admitted", m["prompt_tokens"]),
                ("tokens_predicted_total", "counter", "tokens generated", m["generated_tokens"]),
                ("prompt_tokens_cached_total", "counter", "prompt tokens whose keys and values came from the prefix "
                 "cache", m["cached_prompt_tokens"]),
                ("prefix_cache_hits_total", "counter", "requests that reused a cached prefix", m["prefix_cache_hits"]),
                ("requests_finished_total", "counter", "requests finished (stop or length)", m["finished"]),
                ("requests_cancelled_total", "counter", "requests cancelled (the client went away)", m["cancelled"]),
                ("requests_failed_total", "counter", "requests that failed", m["failed"]),
                ("decode_steps_total", "counter", "batched decode steps", m["steps"]),
                ("draft_tokens_total", "counter", "tokens drafted for speculative decoding", m["draft_tokens"]),
                ("draft_tokens_accepted_total", "counter", "drafted tokens the model accepted",
                 m["accepted_draft_tokens"]),
                ("requests_processing", "gauge", "requests running (decoding or being prefilled)", m["requests_running"]),
                ("requests_deferred", "gauge", "requests waiting for a row", m["requests_waiting"]),
                ("predicted_tokens_seconds", "gauge", "generated tokens per second over the last steps",
                 m["tokens_per_second"])]
        out = []
        for name, kind, help, value in rows:
            out += [f"# HELP lit_llama:{name} {help}", f"# TYPE lit_llama:{name} {kind}", f"lit_llama:{name} {value}"]
        return "\n".join(out) + "\n"


WEB_PAGE = Path(__file__).with_name("static") / "chat.html"


def create_app(server: Server):
    """The FastAPI app: /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics, and the web
    chat at /."""
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.datastructures import Headers
    from starlette.exceptions import HTTPException

    app = FastAPI(title="lit_llama", docs_url=None, redoc_url=None, openapi_url=None)

    def error_response(e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return error_response(e)

    @app.exception_handler(HTTPException)
    async def _http_error(request, e: HTTPException):
        # unknown routes and methods, in OpenAI's error shape
        message = "Unknown request URL: " + f"{request.method} {request.url.path}." if e.status_code == 404 \
            else f"{e.detail}: {request.method} {request.url.path}."
        return error_response(APIError(e.status_code, message, code="unknown_url" if e.status_code == 404 else None))

    class Auth:
        # a plain ASGI middleware (Starlette's BaseHTTPMiddleware would hide client disconnects)
        def __init__(self, app):
            self.app = app

        async def __call__(self, scope, receive, send):
            if scope["type"] == "http" and scope["path"].startswith("/v1"):
                denied = server.authorized(Headers(scope=scope))
                if denied is not None:
                    await error_response(denied)(scope, receive, send)
                    return
            await self.app(scope, receive, send)

    app.add_middleware(Auth)

    def streaming(result):
        if isinstance(result, dict):
            return result
        return StreamingResponse(result, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return streaming(await server.chat(await request.body(), request))

    @app.post("/v1/completions")
    async def completions(request: Request):
        return streaming(await server.completions(await request.body(), request))

    @app.get("/v1/models")
    async def models():
        return server.models()

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        server.check_model(model_id)
        return server.model_card()

    @app.get("/health")
    async def health():
        return server.health()

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(server.metrics(), media_type="text/plain; version=0.0.4")

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(WEB_PAGE.read_text(), headers={"Cache-Control": "no-cache"})

    return app
