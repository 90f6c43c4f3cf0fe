"""The local server's ASGI app: OpenAI's chat and text completions on llama-cpp-python's
`Llama`, with slots and a queue (slots.py), OpenAI-shaped errors everywhere and streams that
never end silently.

Routes (with or without the `/v1` prefix, as llama-server): `POST /v1/chat/completions`,
`POST /v1/completions`, `GET /v1/models`, `GET /health` or `/v1/health` (503 while the model
loads or after it failed, 200 once it answers; it needs no key, every other route does when
the server has one: `Authorization: Bearer KEY` or `X-Api-Key: KEY`, as llama-server). An unknown path is a 404, a known path with
another method a 405, both in OpenAI's error shape.

A generation runs in a worker thread; its chunks reach the client as they come (server-sent
events, `data: {…}` then `data: [DONE]`). A stream that fails after it started ends with an
`error` event (the `openai` client raises it) rather than silently. A client that goes away
frees its slot at the next token (streaming) or once its answer is done (not streaming); one
that goes away while queued never takes a slot. A chat request that offers tools gets the
calls of the answer (Qwen2.5's `<tool_call>` blocks) as `tool_calls`, as llama-server
(tool_calls.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator

from chatbot_trainer.serve import protocol, tool_calls
from chatbot_trainer.serve.protocol import ApiError, GenerationRequest
from chatbot_trainer.serve.slots import Busy, Slots

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MODELS = "/v1/models"
HEALTH = "/health"
METHODS = {CHAT: "POST", COMPLETIONS: "POST", MODELS: "GET", HEALTH: "GET"}
CORS = [(b"access-control-allow-origin", b"*")]


class Cancelled(Exception):
    """The client went away, or the server stopped waiting for the generation."""


class TokenCounter:
    """A logits processor that changes nothing and counts: llama-cpp-python calls it once per
    sampled token with the tokens so far, so the first call sees the prompt's length and the
    number of calls is the number of sampled tokens (the usage a stream does not report)."""

    def __init__(self) -> None:
        self.prompt_tokens: int | None = None
        self.sampled = 0

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        if self.prompt_tokens is None:
            self.prompt_tokens = len(input_ids)
        self.sampled += 1
        return scores

    def completion_tokens(self, finish_reason: str | None) -> int:
        # The token that ended the answer (end of turn, a stop string's last token) is sampled
        # but not part of the answer, as in llama-cpp-python's own usage.
        return max(0, self.sampled - (1 if finish_reason in ("stop", "tool_calls") else 0))


class ModelServer:
    """The ASGI app. `load()` (in a thread) builds the slots' model instances; until then every
    route but /health answers 503."""

    def __init__(self, alias: str, parallel: int = 1, max_queue: int = 64,
                 api_key: str | None = None) -> None:
        self.alias = alias
        self.parallel = parallel
        self.max_queue = max_queue
        self.api_key = api_key
        self.slots: Slots[Any] | None = None
        self.failure: str | None = None
        self.executor = ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="slot")
        self._instances: list[Any] | None = None
        self.created = int(time.time())

    # ------------------------------------------------------------------ loading

    def load(self, build: Callable[[], Any]) -> None:
        """Build `parallel` model instances (call in a thread)."""
        try:
            self._instances = [build() for _ in range(self.parallel)]
        except Exception as exc:  # noqa: BLE001 - reported by /health and on stderr
            self.failure = f"{type(exc).__name__}: {exc}"
            print(f"error: cannot load the model: {self.failure}", file=sys.stderr, flush=True)

    def _ready(self) -> Slots[Any] | None:
        if self.slots is None and self._instances is not None:
            self.slots = Slots(self._instances, self.max_queue)  # in the event loop
        return self.slots

    # ------------------------------------------------------------------ ASGI

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "lifespan":
            return await _lifespan(receive, send)
        if scope["type"] != "http":
            return
        started = False

        async def tracked_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self._route(scope, receive, tracked_send)
        except Cancelled:
            pass  # the client went away: nobody to answer
        except ApiError as error:
            await send_json(send, error.status, error.body(), _retry_after(error))
        except Exception as exc:
            if started:
                raise
            print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            await send_json(send, 500, ApiError(500, f"{type(exc).__name__}: {exc}",
                                                "server_error").body())

    async def _route(self, scope: dict, receive: Callable, send: Callable) -> None:
        path = scope["path"].rstrip("/") or "/"
        if path in ("/chat/completions", "/completions", "/models"):
            path = "/v1" + path
        elif path == "/v1/health":
            path = HEALTH
        method = scope.get("method", "GET")
        if path not in METHODS:
            raise ApiError(404, f"Invalid URL ({method} {scope['path']})", code="not_found")
        if method == "OPTIONS":
            return await _preflight(send)
        allowed = METHODS[path]
        if method != allowed and not (method == "HEAD" and allowed == "GET"):
            raise ApiError(405, f"Method {method} is not allowed on {path} (allowed: {allowed})",
                           code="method_not_allowed")
        if path == HEALTH:
            return await self._health(send)
        self._authorize(scope)
        slots = self._ready()
        if slots is None:
            raise ApiError(503, "Loading model" if self.failure is None else
                           f"The model failed to load: {self.failure}", "unavailable_error")
        if path == MODELS:
            return await send_json(send, 200, {"object": "list", "data": [
                {"id": self.alias, "object": "model", "created": self.created,
                 "owned_by": "chatbot-training"}]})
        data = protocol.parse_body(await read_body(receive))
        chat = path == CHAT
        request = protocol.chat_request(data) if chat else protocol.completion_request(data)
        await self._generate(slots, request, chat, receive, send)

    async def _health(self, send: Callable) -> None:
        slots = self._ready()
        if slots is not None:
            return await send_json(send, 200, {"status": "ok", "slots": slots.size,
                                               "running": slots.running, "waiting": slots.waiting})
        status = "loading model" if self.failure is None else f"failed: {self.failure}"
        await send_json(send, 503, {"status": status})

    def _authorize(self, scope: dict) -> None:
        if not self.api_key:
            return
        headers = dict(scope.get("headers") or [])
        # As llama-server: the key in Authorization (with or without "Bearer ") or X-Api-Key.
        given = (headers.get(b"authorization") or headers.get(b"x-api-key") or b"").decode(
            errors="replace").removeprefix("Bearer ")
        if given != self.api_key:
            raise ApiError(401, "Invalid API Key", "authentication_error", code="invalid_api_key")

    # ------------------------------------------------------------------ generation

    async def _generate(self, slots: Slots[Any], request: GenerationRequest, chat: bool,
                        receive: Callable, send: Callable) -> None:
        gone = asyncio.Event()
        watcher = asyncio.create_task(_watch_disconnect(receive, gone))
        try:
            model = await _acquire(slots, gone)
            try:
                if request.stream:
                    await self._stream(model, request, chat, gone, send)
                else:
                    answer = await self._complete(model, request, chat, gone)
                    await send_json(send, 200, answer)
            finally:
                slots.release(model)
        finally:
            watcher.cancel()

    async def _complete(self, model: Any, request: GenerationRequest, chat: bool,
                        gone: asyncio.Event) -> dict[str, Any]:
        """n answers one after another, as one response."""
        call = model.create_chat_completion if chat else model.create_completion
        answers = []
        for index in range(request.n):
            if gone.is_set():
                raise Cancelled()
            kwargs = {**request.kwargs, "model": self.alias, "stream": False}
            answer = await _in_thread(self.executor, _checked(call, kwargs))
            answer["choices"][0]["index"] = index
            answers.append(answer)
        result = answers[0]
        result["choices"] = [a["choices"][0] for a in answers]
        if chat and tool_calls.wanted(request.kwargs):
            result["choices"] = [tool_calls.in_message(choice) for choice in result["choices"]]
        usage = result.get("usage") or {}
        if usage:
            usage["completion_tokens"] = sum(a["usage"]["completion_tokens"] for a in answers)
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return result

    async def _stream(self, model: Any, request: GenerationRequest, chat: bool,
                      gone: asyncio.Event, send: Callable) -> None:
        call = model.create_chat_completion if chat else model.create_completion
        started = False
        completion_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4()}"
        prompt_tokens = completion_tokens = 0
        try:
            for index in range(request.n):
                counter = TokenCounter()
                kwargs = {**request.kwargs, "model": self.alias, "stream": True,
                          "logits_processor": [counter]}
                finish = None
                # The chunks to send for each produced: its tool calls parsed out where asked.
                outgoing = (tool_calls.StreamFilter().feed if chat and tool_calls.wanted(request.kwargs)
                            else lambda chunk: [chunk])
                chunks = self._chunks(_checked(call, kwargs), gone)
                async with contextlib.aclosing(chunks):
                    async for produced in chunks:
                        for chunk in outgoing(produced):
                            if not started:
                                await send({"type": "http.response.start", "status": 200,
                                            "headers": [(b"content-type", b"text/event-stream"),
                                                        (b"cache-control", b"no-cache"), *CORS]})
                                started = True
                            chunk["id"] = completion_id
                            for choice in chunk.get("choices") or []:
                                choice["index"] = index
                                finish = choice.get("finish_reason") or finish
                            await send_event(send, chunk)
                prompt_tokens = counter.prompt_tokens or prompt_tokens
                completion_tokens += counter.completion_tokens(finish)
            if request.include_usage:
                await send_event(send, {
                    "id": completion_id, "object": "chat.completion.chunk" if chat else
                    "text_completion", "created": int(time.time()), "model": self.alias,
                    "choices": [], "usage": {
                        "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                        "total_tokens": prompt_tokens + completion_tokens}})
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n",
                        "more_body": False})
        except ApiError as error:
            if not started:
                raise
            await send_event(send, error.body(), end=True)
        except Cancelled:
            if started:
                await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _chunks(self, start: Callable[[], Iterator[dict]], gone: asyncio.Event):
        """The chunks of a streamed generation, produced in a worker thread."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        stop = threading.Event()

        def produce() -> None:
            try:
                chunks = start()
                try:
                    for chunk in chunks:
                        loop.call_soon_threadsafe(queue.put_nowait, ("chunk", chunk))
                        if stop.is_set():
                            break
                finally:
                    getattr(chunks, "close", lambda: None)()
                loop.call_soon_threadsafe(queue.put_nowait, ("end", None))
            except BaseException as exc:  # noqa: BLE001 - handed to the event loop
                loop.call_soon_threadsafe(queue.put_nowait, ("error", exc))

        self.executor.submit(produce)
        ended = False
        try:
            while True:
                getter = asyncio.ensure_future(queue.get())
                waiter = asyncio.ensure_future(gone.wait())
                done, _ = await asyncio.wait({getter, waiter}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                if getter not in done:
                    getter.cancel()
                    raise Cancelled()
                kind, value = getter.result()
                ended = kind in ("end", "error")
                if kind == "end":
                    return
                if kind == "error":
                    raise _api_error(value)
                yield value
        finally:
            stop.set()  # the thread stops at its next token (and frees the slot's instance)
            if not ended:
                await _drain_thread(queue)


async def _drain_thread(queue: asyncio.Queue) -> None:
    """Wait until the producing thread has ended, so the instance is free again."""
    while True:
        kind, _ = await queue.get()
        if kind in ("end", "error"):
            return


def _checked(call: Callable, kwargs: dict[str, Any]) -> Callable[[], Any]:
    def run() -> Any:
        try:
            return call(**kwargs)
        except ValueError as exc:  # e.g. a prompt longer than the context
            raise ApiError(400, str(exc)) from exc
    return run


def _api_error(exc: BaseException) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ValueError):
        return ApiError(400, str(exc))
    return ApiError(500, f"{type(exc).__name__}: {exc}", "server_error")


async def _in_thread(executor: ThreadPoolExecutor, fn: Callable[[], Any]) -> Any:
    try:
        return await asyncio.get_running_loop().run_in_executor(executor, fn)
    except ApiError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise _api_error(exc) from exc


async def _acquire(slots: Slots[Any], gone: asyncio.Event) -> Any:
    getter = asyncio.ensure_future(slots.acquire())
    waiter = asyncio.ensure_future(gone.wait())
    try:
        done, _ = await asyncio.wait({getter, waiter}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        getter.cancel()
        raise
    finally:
        waiter.cancel()
    if getter in done:
        try:
            return getter.result()
        except Busy as exc:
            raise _busy(exc) from exc
    getter.cancel()
    try:
        instance = await getter
    except (asyncio.CancelledError, Busy):
        raise Cancelled() from None
    slots.release(instance)  # it came free at the same moment
    raise Cancelled()


def _busy(exc: Busy) -> ApiError:
    return ApiError(503, f"The server is busy: {exc}; retry later", "unavailable_error",
                    code="server_busy")


def _retry_after(error: ApiError) -> list[tuple[bytes, bytes]]:
    return [(b"retry-after", b"1")] if error.code == "server_busy" else []


async def _watch_disconnect(receive: Callable, gone: asyncio.Event) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            gone.set()
            return


# ----------------------------------------------------------------------------- HTTP helpers


async def send_json(send: Callable, status: int, payload: Any,
                    headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        *CORS, *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


async def send_event(send: Callable, payload: Any, end: bool = False) -> None:
    body = f"data: {json.dumps(payload)}\n\n".encode()
    await send({"type": "http.response.body", "body": body, "more_body": not end})


async def read_body(receive: Callable) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    return b"".join(chunks)


async def _preflight(send: Callable) -> None:
    await send({"type": "http.response.start", "status": 204, "headers": [
        *CORS, (b"access-control-allow-methods", b"GET, POST, OPTIONS"),
        (b"access-control-allow-headers", b"authorization, content-type")]})
    await send({"type": "http.response.body", "body": b""})


async def _lifespan(receive: Callable, send: Callable) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
