"""An OpenAI-compatible HTTP server for a course model: FastAPI in front of `shared.engine`.

    python -m shared.serve --model shakespeare-char --port 8000        # then, from Python:

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.completions.create(model="shakespeare-char", prompt="ROMEO:\\n", max_tokens=64)

The subset of OpenAI's API (https://platform.openai.com/docs/api-reference) it speaks:

- `GET /v1/models`, `GET /v1/models/{id}`: the one model served.
- `POST /v1/completions`: prompt (a string, or a list of one), max_tokens (default 16),
  temperature (0-2, 0 = greedy), top_p, stop (up to 4 strings), seed, stream,
  stream_options.include_usage, and vLLM's extension top_k.
- `POST /v1/chat/completions`: messages -> a prompt through the model's chat template, with
  the same options (max_tokens or max_completion_tokens, default 256 or the server's
  limit if lower). A tokenizer with
  `shared.tinyworld`'s special tokens uses that template (`tinyworld.encode_chat`, which is
  `format_chat(..., add_generation_prompt=True)` encoded so that message text cannot smuggle
  in a special token). Any other tokenizer gets the plain template of the Shakespeare
  corpus, a play script: each message becomes "ROLE:\\ncontent\\n\\n", then "ASSISTANT:\\n"
  follows, and the reply ends at a blank line (the stop string "\\n\\n" is always added).
- `stream=true` sends server-sent events, one `data: {chunk}` per engine step in OpenAI's
  chunk format, then `data: [DONE]`; the text of the chunks joined is the text of the
  non-streamed answer. Every answer reports `usage` (prompt, completion, total tokens).
- `GET /health`: 200 with the engine's queue lengths while its thread runs, else 503.

Bad requests get an OpenAI-style error body {"error": {"message", "type", "param", "code"}}:
400 for invalid values, unknown or unsupported fields (n > 1, logprobs, echo, penalties,
tools...), malformed JSON, a prompt longer than the context or with characters the tokenizer
cannot encode; 404 for an unknown model or route; 429 when the queue is full; 503 while
shutting down. The engine only ever sees validated requests, so the server stays healthy.

Underneath, `shared.engine.Engine` batches all requests continuously (Orca, Yu et al. 2022,
https://www.usenix.org/conference/osdi22/presentation/yu) in a background thread, which the
app's lifespan starts and stops: at shutdown the thread is joined and unfinished requests end
with an error. Production servers such as vLLM (Kwon et al. 2023, "Efficient Memory Management
for Large Language Model Serving with PagedAttention", https://arxiv.org/abs/2309.06180) and
Hugging Face TGI add what is left out here: a paged KV cache and prefix caching (week7/05
builds them), chunked prefill, several models or LoRA adapters per server, authentication and
rate limits per key, n > 1 and best_of, logprobs, tool calls and JSON mode, metrics.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import threading
import time
import uuid
from typing import Literal

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from shared.engine import Delta, Engine, EngineFull, EngineStopped, SamplingParams

DEFAULT_CHAT_MAX_TOKENS = 256
PLAIN_CHAT_STOP = "\n\n"  # a speech in the plays ends at a blank line


# --------------------------------------------------------------------------------------
# Request bodies (pydantic validates them; FastAPI turns failures into our 400s)
# --------------------------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")  # an unknown field is an error, as OpenAI's


class StreamOptions(_Body):
    include_usage: bool = False


class _SamplingFields(_Body):
    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=1)  # not OpenAI's: vLLM's extension (extra_body)
    n: int = Field(1, ge=1, le=1)  # one choice per request (see the module docstring)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted and ignored
    # Accepted only at their defaults (anything else is a 400 naming the field):
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4 or not all(stops):
            raise ValueError("stop must be up to 4 non-empty strings")
        return stops


class CompletionRequest(_SamplingFields):
    prompt: str | list[str]
    max_tokens: int = Field(16, ge=1)
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list | None = None
    tool_choice: str | dict | None = None
    response_format: dict | None = None


# Fields this server accepts only at these values.
UNSUPPORTED = dict(presence_penalty=0.0, frequency_penalty=0.0, logit_bias=None, echo=False,
                   logprobs=None, best_of=None, suffix=None, top_logprobs=None, tools=None,
                   tool_choice=None, response_format=None)


# --------------------------------------------------------------------------------------
# Errors in OpenAI's format
# --------------------------------------------------------------------------------------


class APIError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = (
            status, message, param, code, type)

    def response(self) -> JSONResponse:
        body = {"message": self.message, "type": self.type, "param": self.param,
                "code": self.code}
        return JSONResponse({"error": body}, status_code=self.status)


def _validation_error(exc: RequestValidationError) -> APIError:
    first = exc.errors()[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return APIError(400, "the request body is not valid JSON", code="invalid_json")
    if first.get("type") == "extra_forbidden":
        return APIError(400, f"unrecognized request argument supplied: {param}", param)
    where = f"{param}: " if param else ""
    return APIError(400, f"{where}{first.get('msg', 'invalid value')}", param, "invalid_value")


# --------------------------------------------------------------------------------------
# The app
# --------------------------------------------------------------------------------------


def _chat_prompt(engine: Engine, messages: list[ChatMessage]) -> tuple[list[int], list[str]]:
    """messages -> (prompt ids, extra stop strings) through the tokenizer's chat template."""
    tok = engine.tokenizer
    if "<|assistant|>" in getattr(tok, "special_tokens", {}):
        from shared.tinyworld import encode_chat

        ids, _ = encode_chat(tok, [{"role": m.role, "content": m.text()} for m in messages],
                             add_generation_prompt=True)
        return ids, []  # <|end|> is an eos id of the engine
    text = "".join(f"{m.role.upper()}:\n{m.text()}\n\n" for m in messages) + "ASSISTANT:\n"
    return tok.encode(text), [PLAIN_CHAT_STOP]


def create_app(engine: Engine | str, **engine_kwargs) -> FastAPI:
    """The FastAPI app serving `engine`, or the zoo model of that name (`zoo.load`).

    engine_kwargs go to `Engine` when a name is given. The app's lifespan starts the
    engine's thread and stops it (so use `with TestClient(app)`, uvicorn, or
    `BackgroundServer`; a bare TestClient never starts the engine and answers 503).
    """
    if isinstance(engine, str):
        from shared import zoo

        model, tok = zoo.load(engine)
        engine = Engine(model, tok, name=engine, **engine_kwargs)
    elif engine_kwargs:
        raise ValueError("engine_kwargs are only for a model name, not an Engine")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title=f"llm-course server: {engine.name}", lifespan=lifespan)
    app.state.engine = engine
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return _validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        code = "not_found" if exc.status_code == 404 else None
        return APIError(exc.status_code, str(exc.detail), code=code).response()

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):  # a bug here, not the client's fault
        return APIError(500, f"internal error: {type(exc).__name__}", None, "internal_error",
                        "server_error").response()

    def model_card() -> dict:
        return {"id": engine.name, "object": "model", "created": created,
                "owned_by": "llm-course"}

    @app.get("/health")
    async def health():
        body = {"status": "ok" if engine.is_alive else "unavailable", "model": engine.name,
                "running": engine.num_running, "waiting": engine.num_waiting}
        return JSONResponse(body, status_code=200 if engine.is_alive else 503)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id}")
    async def get_model(model_id: str):
        if model_id != engine.name:
            raise APIError(404, f"the model {model_id!r} does not exist", "model",
                           "model_not_found")
        return model_card()

    def check_common(body: _SamplingFields, max_tokens: int) -> SamplingParams:
        if body.model != engine.name:
            raise APIError(404, f"the model {body.model!r} does not exist; this server has "
                                f"{engine.name!r}", "model", "model_not_found")
        for name, default in UNSUPPORTED.items():
            if getattr(body, name, default) not in (default, 0, False, [], {}):
                raise APIError(400, f"{name} is not supported by this server", name,
                               "unsupported_parameter")
        if max_tokens > engine.max_new_tokens:
            raise APIError(400, f"max_tokens must be <= {engine.max_new_tokens}, got "
                                f"{max_tokens}", "max_tokens", "invalid_value")
        if not engine.is_alive:
            raise APIError(503, "the engine is not running", None, "unavailable",
                           "server_error")
        return SamplingParams(max_tokens=max_tokens, temperature=body.temperature,
                              top_p=body.top_p, top_k=body.top_k, stop=tuple(body.stop or ()),
                              seed=body.seed)

    def submit(ids: list[int], params: SamplingParams, param: str):
        """Queue on the engine; deltas arrive on an asyncio queue of this event loop."""
        try:
            engine.check_prompt(ids)
        except ValueError as e:
            raise APIError(400, str(e), param, "context_length_exceeded") from None
        loop, deltas = asyncio.get_running_loop(), asyncio.Queue()

        def on_event(delta: Delta):  # runs on the engine's thread
            with contextlib.suppress(RuntimeError):  # the loop may be closed at shutdown
                loop.call_soon_threadsafe(deltas.put_nowait, delta)

        try:
            return engine.submit(ids, params, on_event), deltas
        except EngineFull as e:
            raise APIError(429, f"the server is busy: {e}", None, "rate_limit_exceeded",
                           "rate_limit_error") from None
        except EngineStopped as e:
            raise APIError(503, str(e), None, "unavailable", "server_error") from None

    def usage(req) -> dict:
        n_in, n_out = len(req.prompt_ids), len(req.output_ids)
        return {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}

    async def finish(req, deltas) -> None:
        """Wait for the end of a request; an engine error becomes a 503."""
        try:
            while (await deltas.get()).finish_reason is None:
                pass
        finally:
            req.cancel()  # a no-op once finished; frees the slot if this task is cancelled
        if req.finish_reason == "error":
            raise APIError(503, req.error or "engine error", None, "unavailable",
                           "server_error")

    def sse(req, deltas, chunk, include_usage: bool) -> StreamingResponse:
        """Server-sent events: chunk(text, finish_reason) per delta, usage, [DONE]."""

        async def events():
            try:
                first = chunk(None, None)
                if first is not None:
                    yield f"data: {json.dumps(first)}\n\n"
                while True:
                    delta = await deltas.get()
                    if delta.finish_reason == "error":
                        err = {"message": req.error, "type": "server_error", "param": None,
                               "code": "unavailable"}
                        yield f"data: {json.dumps({'error': err})}\n\n"
                        break
                    if delta.text or delta.finish_reason:
                        yield f"data: {json.dumps(chunk(delta.text, delta.finish_reason))}\n\n"
                    if delta.finish_reason is not None:
                        break
                if include_usage and req.finish_reason != "error":
                    yield f"data: {json.dumps(chunk(None, None, usage(req)))}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                req.cancel()  # the client went away: free the slot

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise APIError(400, "this server takes exactly one prompt per request", "prompt",
                           "invalid_value")
        params = check_common(body, body.max_tokens)
        try:
            ids = engine.encode(prompts[0])
        except ValueError as e:
            raise APIError(400, f"the prompt cannot be encoded: {e}", "prompt",
                           "invalid_prompt") from None
        req, deltas = submit(ids, params, "prompt")
        cid, t = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def chunk(text, finish_reason, use=None):
            if text is None and use is None:
                return None  # completions streams have no role chunk
            choices = [] if use else [{"text": text, "index": 0, "logprobs": None,
                                       "finish_reason": finish_reason}]
            c = {"id": cid, "object": "text_completion", "created": t, "model": engine.name,
                 "choices": choices}
            return c | {"usage": use} if use else c

        if body.stream:
            include = bool(body.stream_options and body.stream_options.include_usage)
            return sse(req, deltas, chunk, include)
        await finish(req, deltas)
        return {"id": cid, "object": "text_completion", "created": t, "model": engine.name,
                "choices": [{"text": req.text, "index": 0, "logprobs": None,
                             "finish_reason": req.finish_reason}],
                "usage": usage(req)}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest):
        max_tokens = (body.max_completion_tokens or body.max_tokens
                      or min(DEFAULT_CHAT_MAX_TOKENS, engine.max_new_tokens))
        params = check_common(body, max_tokens)
        try:
            ids, extra_stop = _chat_prompt(engine, body.messages)
        except ValueError as e:
            raise APIError(400, f"the messages cannot be encoded: {e}", "messages",
                           "invalid_prompt") from None
        if extra_stop:
            stops = tuple(dict.fromkeys(params.stop + tuple(extra_stop)))
            params = dataclasses.replace(params, stop=stops)
        req, deltas = submit(ids, params, "messages")
        cid, t = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def chunk(text, finish_reason, use=None):
            if use:
                choices = []
            else:
                if text is None:  # the first chunk announces the role
                    delta = {"role": "assistant", "content": ""}
                else:
                    delta = {"content": text} if text else {}
                choices = [{"index": 0, "delta": delta, "logprobs": None,
                            "finish_reason": finish_reason}]
            c = {"id": cid, "object": "chat.completion.chunk", "created": t,
                 "model": engine.name, "choices": choices}
            return c | {"usage": use} if use else c

        if body.stream:
            include = bool(body.stream_options and body.stream_options.include_usage)
            return sse(req, deltas, chunk, include)
        await finish(req, deltas)
        return {"id": cid, "object": "chat.completion", "created": t, "model": engine.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": req.text},
                             "logprobs": None, "finish_reason": req.finish_reason}],
                "usage": usage(req)}

    return app


# --------------------------------------------------------------------------------------
# Running it
# --------------------------------------------------------------------------------------


class BackgroundServer:
    """uvicorn serving `app` in a thread, for notebooks and tests.

        with BackgroundServer(create_app("shakespeare-char")) as server:
            client = OpenAI(base_url=server.url + "/v1", api_key="unused")

    port=0 picks a free port (read `server.port`). Leaving the block shuts uvicorn down
    (the lifespan stops the engine) and joins the thread.
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0,
                 timeout: float = 30.0):
        config = uvicorn.Config(app, host=host, port=port, log_level="warning",
                                timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.host, self.port, self.timeout = host, port, timeout
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + self.timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(self.timeout)
        if self.thread.is_alive():
            raise RuntimeError(f"the server thread did not stop within {self.timeout} s")

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m shared.serve",
        description="Serve a zoo model with an OpenAI-compatible API (continuous batching).")
    parser.add_argument("--model", default="shakespeare-char", help="zoo model name")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-batch-size", type=int, default=16,
                        help="sequences decoded together at most")
    parser.add_argument("--max-new-tokens", type=int, default=1024,
                        help="the largest max_tokens a request may ask for")
    args = parser.parse_args(argv)
    app = create_app(args.model, max_batch_size=args.max_batch_size,
                     max_new_tokens=args.max_new_tokens)
    uvicorn.run(app, host=args.host, port=args.port, timeout_graceful_shutdown=5)


if __name__ == "__main__":
    main()
