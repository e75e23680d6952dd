"""An OpenAI-compatible HTTP API over one model: the request schema, a worker thread that owns the
model and runs queued requests one at a time, and the FastAPI app (serve.py runs it with uvicorn).

Requests are validated and tokenized on the event loop, then queued; the worker generates token
by token and hands text pieces back to the request's own asyncio queue, so concurrent clients never
see each other's tokens. A client that goes away (mid-stream, or while waiting) cancels its request:
the worker drops it from the queue or stops it at the next token.
"""

import asyncio
import hmac
import json
import queue
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Sequence, Union

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lit_llama.chat import TextStream
from lit_llama.generation import generate
from lit_llama.prompts import ChatFormat
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


# ---------------------------------------------------------------- the worker that owns the model


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
    cancelled: threading.Event = field(default_factory=threading.Event)

    def put(self, *event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class Engine:
    """The model, its tokenizer and chat format, and one thread that runs the queued jobs in order."""

    def __init__(self, model, tokenizer, fmt: ChatFormat, device, max_queue: int = 64):
        self.model, self.tokenizer, self.fmt, self.device = model, tokenizer, fmt, torch.device(device)
        self.block_size = model.config.block_size
        self.jobs: "queue.Queue[Optional[Job]]" = queue.Queue()
        self.max_queue = max_queue
        self.stats = {"served": 0, "cancelled": 0, "failed": 0, "tokens": 0}
        self.busy = False
        self.thread = threading.Thread(target=self._work, name="lit_llama-engine", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        if self.jobs.qsize() >= self.max_queue:
            raise APIError(503, f"The server is busy ({self.jobs.qsize()} requests waiting). Try again later.",
                           type="server_error", code="queue_full")
        self.jobs.put(job)

    def close(self) -> None:
        self.jobs.put(None)

    def _work(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            self.busy = True  # before the queue looks empty, so that queued + busy never reads 0 + False early
            if job.cancelled.is_set():
                self.stats["cancelled"] += 1
                self.busy = False
                continue
            try:
                if job.seed is not None:
                    torch.manual_seed(job.seed)
                index = 0
                for prompt in job.prompts:
                    for _ in range(job.n):
                        if not job.cancelled.is_set():
                            self._choice(job, index, prompt)
                        index += 1
                self.stats["cancelled" if job.cancelled.is_set() else "served"] += 1
                job.put("done")
            except Exception as e:  # a bug or a device error: this request fails, the server goes on
                traceback.print_exc()
                self.stats["failed"] += 1
                job.put("error", f"{type(e).__name__}: {e}")
            finally:
                self.busy = False

    def _fit_cache(self, length: int) -> None:
        # generate() grows the KV cache to what a request needs and keeps it; attention runs over the
        # whole cache, so after one long request every short one would pay for it: drop a cache far
        # larger than this request needs (generate() then allocates one that fits)
        attn = self.model.transformer.h[0].attn
        if attn.kv_cache is not None and attn.kv_cache.k.size(2) > max(2 * length, 1024):
            self.model.clear_kv_cache()

    def _choice(self, job: Job, index: int, prompt: List[int]) -> None:
        self._fit_cache(len(prompt) + job.max_tokens)
        stream = TextStream(self.tokenizer.decode, job.stop_strings)
        x = torch.tensor(prompt, dtype=torch.long, device=self.device)
        count = 0
        for token in generate(self.model, x, job.max_tokens, temperature=job.temperature, top_k=job.top_k,
                              top_p=job.top_p, stop_ids=job.stop_ids):
            count += 1
            piece = stream.add(token)
            if piece:
                job.put("text", index, piece)
            if stream.stopped or job.cancelled.is_set():
                break
        rest = stream.flush()
        if rest and not stream.stopped:
            job.put("text", index, rest)
        self.stats["tokens"] += count
        # generate() ends early only at a stop token (the prompt plus max_tokens fit the context)
        reason = "stop" if stream.stopped or count < job.max_tokens else "length"
        job.put("finish", index, reason, count)


# ---------------------------------------------------------------- the HTTP app


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class Server:
    """The request handling, apart from FastAPI's routing (create_app)."""

    def __init__(self, engine: Engine, model_name: str, api_key: Optional[str] = None,
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
        if longest >= self.engine.block_size or (max_tokens or 0) + longest > self.engine.block_size:
            raise APIError(400, f"This model's maximum context length is {self.engine.block_size} tokens. However, "
                                f"you requested {longest + (max_tokens or 0)} tokens ({longest} in the prompt, "
                                f"{max_tokens or 0} for the completion). Please reduce the prompt or {param}.",
                           param=param if longest < self.engine.block_size else "messages",
                           code="context_length_exceeded")
        if max_tokens is not None:
            return max_tokens
        return min(self.default_max_tokens or self.engine.block_size, self.engine.block_size - longest)

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
                "usage": _usage(len(prompt), sum(counts))}

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
                "usage": _usage(prompt_tokens, sum(counts))}

    # -------- results

    async def _events(self, job: Job, request=None):
        """The job's events until it is done; cancels it if the caller stops listening (a streaming
        client went away) or, for a plain request, if the client disconnects."""
        try:
            while True:
                try:
                    event = await asyncio.wait_for(job.events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if request is not None and await request.is_disconnected():
                        return
                    continue
                if event[0] == "error":
                    raise APIError(500, f"The server failed while generating: {event[1]}", type="server_error")
                if event[0] == "done":
                    return
                yield event
        finally:
            job.cancelled.set()  # no effect once it is done; stops it (or drops it from the queue) otherwise

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
            yield _sse({**base, "choices": [], "usage": _usage(prompt_tokens, total)})
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
            yield _sse({**head, "choices": [], "usage": _usage(prompt_tokens, total)})
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
        return {"status": "ok", "model": self.model_name, "queued": e.jobs.qsize(), "busy": e.busy, **e.stats}


WEB_PAGE = Path(__file__).with_name("static") / "chat.html"


def create_app(server: Server):
    """The FastAPI app: /v1/chat/completions, /v1/completions, /v1/models, /health, and the web chat at /."""
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
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

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(WEB_PAGE.read_text(), headers={"Cache-Control": "no-cache"})

    return app
