"""The OpenAI-compatible HTTP API over an `Engine` (FastAPI), where a request's `model` names the adapter.

    GET  /v1/models                 the base model and every adapter in the adapter folder
    POST /v1/completions            causal LMs; `stream: true` sends server-sent events
    POST /v1/chat/completions       causal LMs, prompt from the tokenizer's chat template; streaming too
    POST /v1/embeddings             encoders: mean-pooled, unit-length vectors
    GET  /admin/adapters            resident adapters and their bytes, the pool's limit
    POST /admin/adapters/load       {"name": ...} load now;  /admin/adapters/unload  {"name": ...}
    GET  /health                    no key needed

Errors use OpenAI's shape (`{"error": {"message", "type", "code"}}`) so clients show the message: 400 bad input,
401 wrong key, 404 unknown adapter, 413 request too large, 500 an adapter whose files cannot be loaded (the others
keep serving), 503 no room for the adapter (larger than the adapter memory, or the memory stayed full of adapters in
use for `adapter_wait_s`).
"""
from __future__ import annotations

import asyncio
import base64
import dataclasses
import hmac
import struct
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import jinja2
from fastapi import Depends, FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from splice.errors import SpliceError
from splice.serve.engine import Engine, Request, SamplingParams
from splice.serve.pool import AdapterLoadError, PoolFull, UnknownAdapter, check_name
from splice.serve.responses import ApiError, ResponseShape, TextStream, sse
from splice.serve.schemas import AdapterName, ChatRequest, CompletionRequest, EmbeddingRequest


@dataclass
class ServeLimits:
    """What one request may ask for; larger requests get a clear 400/413 instead of stalling everyone."""

    max_request_bytes: int = 1 << 20  # body size
    max_prompt_tokens: int = 2048  # per prompt
    max_tokens: int = 512  # generated per prompt (also the default when a request gives none)
    max_prompts: int = 64  # prompts × n in one request
    adapter_wait_s: float = 60.0  # how long a request waits for room in the adapter memory


def _error_body(status: int, message: str, kind: str, code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code}}, status)


class _BodyLimit:
    """ASGI middleware: refuse bodies over `limit` bytes (by Content-Length, or while reading a chunked body)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await _error_body(413, f"request body of {int(declared)} bytes is over the limit of {self.limit}",
                                     "invalid_request_error", "request_too_large")(scope, receive, send)
        # A chunked body has no Content-Length: read it here (at most `limit` bytes), then hand it on.
        chunks, seen, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            more = message.get("more_body", False)
            if seen > self.limit:
                return await _error_body(413, f"request body is over the limit of {self.limit} bytes",
                                         "invalid_request_error", "request_too_large")(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # later calls wait for the disconnect, as the server's own receive does

        return await self.app(scope, replay, send)


def create_app(engine: Engine, tokenizer: Any, *, model_name: str, api_key: str | None = None,
               limits: ServeLimits | None = None) -> FastAPI:
    """The FastAPI app serving `engine` (started and stopped with the app's lifespan).

    Args:
        engine: the engine (not yet started); its pool decides which adapters exist.
        tokenizer: the base model's tokenizer.
        model_name: the id clients use for the base model itself (no adapter).
        api_key: when set, every /v1 and /admin call needs `Authorization: Bearer <api_key>`.
        limits: request bounds.
    """
    limits = limits or ServeLimits()
    api = _Api(engine, tokenizer, model_name, limits)

    async def lifespan(_app):
        engine.start()
        try:
            yield
        finally:
            await run_in_threadpool(engine.stop)

    app = FastAPI(title="splice serve", lifespan=lifespan)
    app.add_middleware(_BodyLimit, limit=limits.max_request_bytes)

    async def check_key(request: HttpRequest) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise ApiError(401, "missing or wrong API key (send 'Authorization: Bearer <key>')",
                           "authentication_error", "invalid_api_key")

    @app.exception_handler(ApiError)
    async def _api_error(_req, exc: ApiError):
        return _error_body(exc.status, exc.message, exc.kind, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_req, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
        return _error_body(400, f"{where}: {first.get('msg', 'invalid request')}", "invalid_request_error")

    @app.exception_handler(SpliceError)
    async def _splice_error(_req, exc: SpliceError):
        return _error_body(400, str(exc), "invalid_request_error")

    guarded = [Depends(check_key)]
    app.get("/health")(lambda: {"status": "ok"})
    app.get("/v1/models", dependencies=guarded)(api.models)
    app.post("/v1/completions", dependencies=guarded)(api.completions)
    app.post("/v1/chat/completions", dependencies=guarded)(api.chat)
    app.post("/v1/embeddings", dependencies=guarded)(api.embeddings)
    app.get("/admin/adapters", dependencies=guarded)(api.adapters)
    app.post("/admin/adapters/load", dependencies=guarded)(api.load)
    app.post("/admin/adapters/unload", dependencies=guarded)(api.unload)
    return app


class _Api:
    def __init__(self, engine: Engine, tokenizer: Any, model_name: str, limits: ServeLimits):
        self.engine, self.tok, self.model_name, self.limits = engine, tokenizer, model_name, limits
        self.pool = engine.pool
        config = engine.model.config
        self.max_positions = getattr(config, "max_position_embeddings", None) or 1 << 30
        eos = getattr(getattr(engine.model, "generation_config", None), "eos_token_id", None)
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if tokenizer.eos_token_id is not None:
            eos.append(tokenizer.eos_token_id)
        self.stop_ids = tuple(sorted(set(eos)))
        self.created = int(time.time())

    # -- adapters ------------------------------------------------------------------------------------------------
    def _adapter(self, model: str) -> str | None:
        if model == self.model_name:
            return None
        try:
            self.pool.path_of(model)
        except UnknownAdapter as exc:
            raise ApiError(404, f"model: {exc}; GET /v1/models lists them (the base is "
                                f"{self.model_name!r})", code="model_not_found") from None
        except SpliceError as exc:
            raise ApiError(400, f"model: {exc}", code="invalid_model_name") from None
        return model

    async def _acquire(self, adapter: str | None, times: int) -> None:
        if adapter is None:
            return
        held = 0
        try:
            for _ in range(times):
                await self._acquire_one(adapter)
                held += 1
        except BaseException as exc:  # the client going away (CancelledError) must not keep the holds either
            for _ in range(held):
                await run_in_threadpool(self.pool.release, adapter)
            if isinstance(exc, (AdapterLoadError, PoolFull)):
                status = 503 if isinstance(exc, PoolFull) else 500
                raise ApiError(status, str(exc), "server_error", "adapter_unavailable") from None
            raise

    async def _submit(self, requests: list[Request]) -> None:
        """Submit all of `requests` (their adapter holds taken) or none: a refusal cancels those already queued and
        gives back the holds of the rest (the engine gave back the refused one's)."""
        for k, r in enumerate(requests):
            try:
                self.engine.submit(r)
            except SpliceError as exc:
                for done in requests[:k]:
                    done.cancel()
                for rest in requests[k + 1:]:
                    if rest.adapter is not None:
                        await run_in_threadpool(self.pool.release, rest.adapter)
                raise ApiError(400, str(exc)) from None

    async def _acquire_one(self, adapter: str) -> None:
        # When the adapter memory is full of adapters that running requests hold, wait for one of them to finish
        # (like a request waiting for a batch slot) rather than fail; give up after `adapter_wait_s`.
        deadline, pause = time.monotonic() + self.limits.adapter_wait_s, 0.02
        while True:
            try:
                return await run_in_threadpool(self.pool.acquire, adapter)
            except PoolFull as exc:
                left = deadline - time.monotonic()
                if not exc.retry or left <= 0:
                    raise
            await asyncio.sleep(min(pause, left))  # the last try falls on the deadline, not up to a pause before it
            pause = min(2 * pause, 0.5)

    async def models(self) -> dict:
        def card(name: str, parent: str | None) -> dict:
            return {"id": name, "object": "model", "created": self.created, "owned_by": "splice",
                    "root": name, "parent": parent}
        names = await run_in_threadpool(self.pool.available)
        return {"object": "list", "data": [card(self.model_name, None)] + [card(n, self.model_name) for n in names]}

    async def adapters(self) -> dict:
        # The pool's lock is held during every forward: read it off the event loop, which must keep streaming.
        resident = await run_in_threadpool(self.pool.resident)
        return {"resident": resident, "bytes": sum(resident.values()), "max_bytes": self.pool.max_bytes,
                "loads": self.pool.loads, "evictions": self.pool.evictions,
                "available": await run_in_threadpool(self.pool.available),
                "engine": {**dataclasses.asdict(self.engine.stats), "running": self.engine.running,
                           "waiting": self.engine.waiting}}

    async def load(self, body: AdapterName) -> dict:
        self._adapter(body.name)
        try:
            await run_in_threadpool(self.pool.load, body.name)
        except (AdapterLoadError, PoolFull) as exc:
            raise ApiError(503 if isinstance(exc, PoolFull) else 500, str(exc), "server_error") from None
        resident = await run_in_threadpool(self.pool.resident)
        return {"name": body.name, "loaded": body.name in resident, "bytes": resident.get(body.name)}

    async def unload(self, body: AdapterName) -> dict:
        try:
            now = await run_in_threadpool(self.pool.unload, check_name(body.name))
        except UnknownAdapter as exc:
            raise ApiError(404, str(exc), code="model_not_found") from None
        return {"name": body.name, "unloaded": now, "deferred": not now}

    # -- generation ----------------------------------------------------------------------------------------------
    def _params(self, body, max_tokens: int | None, prompt_len: int) -> SamplingParams:
        if body.logprobs:
            raise ApiError(400, "logprobs: not supported by this server")
        wanted = max_tokens or min(self.limits.max_tokens, self.max_positions - prompt_len)
        if wanted > self.limits.max_tokens:
            raise ApiError(400, f"max_tokens: {wanted} is over this server's limit of {self.limits.max_tokens}")
        if prompt_len + wanted > self.max_positions:
            raise ApiError(400, f"max_tokens: the prompt ({prompt_len} tokens) plus {wanted} new tokens is over the "
                                f"model's context of {self.max_positions}")
        return SamplingParams(max_tokens=wanted, temperature=body.temperature, top_p=body.top_p, seed=body.seed,
                              stop_token_ids=self.stop_ids)

    def _check_prompt(self, ids: list[int], where: str) -> list[int]:
        if not ids:
            raise ApiError(400, f"{where}: the prompt is empty")
        if len(ids) > self.limits.max_prompt_tokens:
            raise ApiError(400, f"{where}: {len(ids)} tokens is over the limit of {self.limits.max_prompt_tokens}")
        # A causal LM needs room for one new token; a longer prompt would index past the position table.
        room = self.max_positions - (self.engine.kind == "causal-lm")
        if len(ids) > room:
            raise ApiError(400, f"{where}: {len(ids)} tokens is over the model's context of {self.max_positions}"
                                + (" (less one position for the answer)" if self.engine.kind == "causal-lm" else ""))
        vocab = self.engine.model.config.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in ids):
            raise ApiError(400, f"{where}: token ids must be integers in [0, {vocab})")
        return ids

    def _encode_prompts(self, prompt) -> list[list[int]]:
        if isinstance(prompt, str):
            prompt = [prompt]
        if prompt and all(isinstance(t, int) for t in prompt):
            prompt = [prompt]
        if not prompt:
            raise ApiError(400, "prompt: empty")
        if len(prompt) > self.limits.max_prompts:
            raise ApiError(400, f"prompt: {len(prompt)} prompts is over the limit of {self.limits.max_prompts}")
        return [self._check_prompt(list(p) if not isinstance(p, str) else self._tokens(p), f"prompt[{i}]")
                for i, p in enumerate(prompt)]

    def _tokens(self, text: str, special: bool = True) -> list[int]:
        if len(text) > 32 * self.limits.max_prompt_tokens:  # refuse before tokenizing megabytes
            raise ApiError(400, f"prompt: {len(text)} characters is over the limit")
        return self.tok(text, add_special_tokens=special).input_ids

    def _chat_prompt(self, body: ChatRequest) -> list[int]:
        messages = []
        for i, m in enumerate(body.messages):
            content = m.content or ""
            if isinstance(content, list):
                if any(part.get("type") != "text" for part in content):
                    raise ApiError(400, f"messages[{i}].content: only text parts are supported")
                content = "".join(str(part.get("text", "")) for part in content)
            messages.append({"role": m.role, "content": content})
        if getattr(self.tok, "chat_template", None):
            try:
                text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            except jinja2.TemplateError as exc:  # the template's own checks ("roles must alternate", ...)
                raise ApiError(400, f"messages: the model's chat template refused them: {exc}") from None
            return self._check_prompt(self._tokens(text, special=False), "messages")
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
        return self._check_prompt(self._tokens(text), "messages")

    def _need_causal_lm(self) -> None:
        if self.engine.kind != "causal-lm":
            raise ApiError(400, f"model: {self.model_name!r} is an encoder; completions need a causal LM "
                                f"(this server answers /v1/embeddings)")

    async def completions(self, body: CompletionRequest, http: HttpRequest):
        self._need_causal_lm()
        adapter = self._adapter(body.model)
        prompts = self._encode_prompts(body.prompt)
        if len(prompts) * body.n > self.limits.max_prompts:
            raise ApiError(400, f"n: {len(prompts)} prompts × n={body.n} is over the limit of "
                                f"{self.limits.max_prompts}")
        params = [self._params(body, body.max_tokens, len(p)) for p in prompts]
        jobs = [(p, prm) for p, prm in zip(prompts, params) for _ in range(body.n)]
        return await self._generate(body, http, adapter, jobs, chat=False, echo=body.echo)

    async def chat(self, body: ChatRequest, http: HttpRequest):
        self._need_causal_lm()
        adapter = self._adapter(body.model)
        if body.n > self.limits.max_prompts:
            raise ApiError(400, f"n: {body.n} is over the limit of {self.limits.max_prompts}")
        ids = self._chat_prompt(body)
        params = self._params(body, body.max_completion_tokens or body.max_tokens, len(ids))
        return await self._generate(body, http, adapter, [(ids, params)] * body.n, chat=True)

    async def _generate(self, body, http: HttpRequest, adapter: str | None, jobs, *, chat: bool,
                        echo: bool = False):
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        await self._acquire(adapter, len(jobs))
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        streams = [TextStream(self.tok, stops, ids if echo else None) for ids, _ in jobs]
        requests = [Request(list(ids), adapter, _emitter(loop, queue, i), params) for i, (ids, params) in
                    enumerate(jobs)]
        await self._submit(requests)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        shape = ResponseShape(rid, body.model, chat, self.created)
        prompt_tokens = sum(len(ids) for ids, _ in jobs)
        if body.stream:
            usage = bool((body.stream_options or {}).get("include_usage"))
            return _CancellingStream(requests, self._stream(queue, requests, streams, shape, prompt_tokens, usage),
                                     media_type="text/event-stream")
        try:
            await self._collect(queue, requests, streams, http)
        finally:
            for r in requests:
                r.cancel()  # no-op for finished rows; frees the rows of a client that went away
        return shape.full(streams, prompt_tokens)

    async def _collect(self, queue, requests, streams, http: HttpRequest) -> None:
        open_, checked = len(requests), time.monotonic()
        while open_:
            try:
                i, ev = await asyncio.wait_for(queue.get(), timeout=0.5)
                open_ -= self._apply(i, ev, requests, streams)
            except asyncio.TimeoutError:
                pass
            # Tokens may arrive without a pause for minutes: look for a departed client every half second anyway.
            if open_ and time.monotonic() - checked >= 0.5:
                if await http.is_disconnected():
                    return
                checked = time.monotonic()

    def _apply(self, i: int, ev, requests, streams) -> int:
        """Feed one engine event to stream i; returns 1 when that stream is finished."""
        kind, value = ev
        s = streams[i]
        if kind == "token" and s.finish is None:
            if s.add(value, value in self.stop_ids):
                requests[i].cancel()  # a stop string ended it early
            return 0
        if kind == "error":
            s.error = value
        if s.finish is None:
            s.finish = "stop" if value in ("stop", "cancelled") else value if kind == "done" else "error"
        return 1

    async def _stream(self, queue, requests, streams, shape, prompt_tokens: int, usage: bool) -> AsyncIterator[str]:
        try:
            if shape.chat:
                for i in range(len(streams)):
                    yield sse(shape.chunk(i, {"role": "assistant", "content": ""}, None))
            open_ = len(requests)
            while open_:
                i, ev = await queue.get()
                done = self._apply(i, ev, requests, streams)
                open_ -= done
                piece = streams[i].take()
                if streams[i].error:
                    yield sse({"error": {"message": streams[i].error, "type": "server_error"}})
                elif piece or done:
                    yield sse(shape.chunk(i, piece, streams[i].finish if done else None))
            if usage:
                yield sse(shape.usage_chunk(streams, prompt_tokens))
            yield "data: [DONE]\n\n"
        finally:  # the client went away (or we are done): free its rows at the engine's next turn
            for r in requests:
                r.cancel()

    # -- embeddings ----------------------------------------------------------------------------------------------
    async def embeddings(self, body: EmbeddingRequest, http: HttpRequest):
        if self.engine.kind != "encoder":
            raise ApiError(400, f"model: {self.model_name!r} is a causal LM; embeddings need an encoder")
        adapter = self._adapter(body.model)
        inputs = self._encode_prompts(body.input)
        await self._acquire(adapter, len(inputs))
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        requests = [Request(ids, adapter, _emitter(loop, queue, i), embed=True) for i, ids in enumerate(inputs)]
        await self._submit(requests)
        vectors: list[Any] = [None] * len(inputs)
        open_ = len(requests)
        while open_:
            i, (kind, value) = await queue.get()
            if kind == "embedding":
                vectors[i] = value
            elif kind == "error":
                raise ApiError(500, value, "server_error")
            else:
                open_ -= 1
        data = [{"object": "embedding", "index": i,
                 "embedding": v if body.encoding_format == "float"
                 else base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode()} for i, v in enumerate(vectors)]
        tokens = sum(len(x) for x in inputs)
        return {"object": "list", "data": data, "model": body.model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


class _CancellingStream(StreamingResponse):
    """Cancels its requests however the response ends. The body generator's own `finally` runs only if the
    generator was started, and a client gone before the first chunk never starts it."""

    def __init__(self, requests: list[Request], content, **kwargs):
        super().__init__(content, **kwargs)
        self._requests = requests

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for r in self._requests:
                r.cancel()


def _emitter(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, i: int) -> Callable:
    def emit(ev) -> None:  # runs on the engine's thread: hand over and return at once
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (i, ev))
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
            pass
    return emit
