"""The local server's request forms (serve/protocol.py), slots and queue (serve/slots.py) and
its ASGI routes without a model: pure, no llama-cpp-python."""

from __future__ import annotations

import asyncio
import json

import pytest

from chatbot_trainer.serve import protocol, slots
from chatbot_trainer.serve.app import ModelServer
from chatbot_trainer.serve.protocol import ApiError

USER = [{"role": "user", "content": "Hi"}]


def error_of(fn, *args) -> ApiError:
    with pytest.raises(ApiError) as caught:
        fn(*args)
    assert caught.value.status == 400
    return caught.value


def test_content_parts_are_joined_text_like_llama_server():
    request = protocol.chat_request({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is"}, {"type": "text", "text": "the capital?"}]}]})
    assert request.kwargs["messages"] == [{"role": "user", "content": "What is\nthe capital?"}]


def test_image_parts_are_a_clear_400():
    error = error_of(protocol.chat_request, {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]})
    assert "image_url parts are not supported" in error.message
    assert error.param == "messages[0].content[1].type"
    assert error.body()["error"]["type"] == "invalid_request_error"


def test_json_schema_becomes_a_schema_constrained_json_object():
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    request = protocol.chat_request({"messages": USER, "response_format": {
        "type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}})
    assert request.kwargs["response_format"] == {"type": "json_object", "schema": schema}
    plain = protocol.chat_request({"messages": USER, "response_format": {"type": "json_object"}})
    assert plain.kwargs["response_format"] == {"type": "json_object"}
    text = protocol.chat_request({"messages": USER, "response_format": {"type": "text"}})
    assert "response_format" not in text.kwargs
    error = error_of(protocol.chat_request, {"messages": USER, "response_format": {"type": "xml"}})
    assert error.param == "response_format.type"


def test_n_stream_options_stop_and_max_tokens():
    request = protocol.chat_request({"messages": USER, "n": 3, "stream": True,
                                     "stream_options": {"include_usage": True}, "stop": "\n",
                                     "max_completion_tokens": 7})
    assert (request.n, request.stream, request.include_usage) == (3, True, True)
    assert request.kwargs["stop"] == ["\n"] and request.kwargs["max_tokens"] == 7
    # include_usage means nothing without a stream; -1 is "until the context is full"
    request = protocol.chat_request({"messages": USER, "stream_options": {"include_usage": True},
                                     "max_tokens": -1})
    assert not request.include_usage and request.kwargs["max_tokens"] is None
    assert error_of(protocol.chat_request, {"messages": USER, "n": 0}).param == "n"
    too_many = error_of(protocol.chat_request, {"messages": USER, "n": protocol.MAX_CHOICES + 1})
    assert too_many.param == "n" and str(protocol.MAX_CHOICES) in too_many.message
    for bad in (0, -2, 1.5, "7"):
        assert error_of(protocol.chat_request, {"messages": USER, "max_tokens": bad}).param \
            == "max_tokens"
    assert error_of(protocol.chat_request, {"messages": USER, "stop": [1]}).param == "stop"


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"),
    ({"messages": "hello"}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": USER, "temperature": "hot"}, "temperature"),
    ({"messages": USER, "stream": "yes"}, "stream"),
])
def test_bad_chat_bodies(body, param):
    assert error_of(protocol.chat_request, body).param == param


def test_developer_role_is_the_system_message_and_assistant_content_may_be_null():
    request = protocol.chat_request({"messages": [
        {"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": None, "tool_calls": []}]})
    assert [m["role"] for m in request.kwargs["messages"]] == ["system", "user", "assistant"]


def test_completion_prompt_forms():
    assert protocol.completion_request({"prompt": ["Once"]}).kwargs["prompt"] == "Once"
    assert error_of(protocol.completion_request, {"prompt": ["a", "b"]}).param == "prompt"


def test_parse_body():
    assert error_of(protocol.parse_body, b"{not json").message == \
        "The request body is not valid JSON"
    assert error_of(protocol.parse_body, b"[1]").param is None


# ----------------------------------------------------------------------------- slots


def test_slots_queue_then_refuse():
    async def scenario():
        pool = slots.Slots(["a"], max_queue=1)
        first = await pool.acquire()
        waiter = asyncio.ensure_future(pool.acquire())
        await asyncio.sleep(0)
        assert (pool.running, pool.waiting) == (1, 1)
        with pytest.raises(slots.Busy):
            await pool.acquire()
        pool.release(first)
        assert await waiter == "a"
        assert pool.waiting == 0

    asyncio.run(scenario())


def test_cgroup_cpu_limit_caps_the_threads(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert slots.cgroup_cpu_quota(tmp_path) == 1.5
    assert slots.available_cpus(tmp_path) <= 2
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert slots.cgroup_cpu_quota(tmp_path) is None
    assert slots.threads_per_slot(8, 3) == 2 and slots.threads_per_slot(1, 4) == 1
    assert slots.threads_per_slot(2, 1) == 1 and slots.threads_per_slot(16, 1) == 15


# ----------------------------------------------------------------------------- routes


async def exchange(app, method: str, path: str, body: bytes = b"", headers=()) -> tuple[dict, bytes]:
    """One request through the ASGI app: the response's start message and its whole body."""
    sent: list[dict] = []
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        if messages:
            return messages.pop(0)
        await asyncio.sleep(3600)

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "headers": list(headers)}
    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    payload = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start, payload


async def call(app, method: str, path: str, body: bytes = b"", headers=()) -> tuple[int, dict]:
    start, payload = await exchange(app, method, path, body, headers)
    return start["status"], json.loads(payload)


@pytest.mark.parametrize("method, path, status", [
    ("GET", "/v1/nowhere", 404), ("POST", "/v2/chat/completions", 404),
    ("GET", "/v1/chat/completions", 405), ("DELETE", "/v1/models", 405),
    ("POST", "/health", 405),
])
def test_unknown_paths_and_methods_are_openai_shaped(method, path, status):
    status_, body = asyncio.run(call(ModelServer("m"), method, path))
    assert status_ == status
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "invalid_request_error"


def test_loading_then_api_key():
    app = ModelServer("m", api_key="secret")
    assert asyncio.run(call(app, "GET", "/health"))[0] == 503
    app.load(lambda: object())
    assert asyncio.run(call(app, "GET", "/health"))[0] == 200
    status, body = asyncio.run(call(app, "GET", "/v1/models"))
    assert status == 401 and body["error"]["type"] == "authentication_error"
    status, body = asyncio.run(call(app, "GET", "/v1/models",
                                    headers=[(b"authorization", b"Bearer secret")]))
    assert status == 200 and [m["id"] for m in body["data"]] == ["m"]
    assert asyncio.run(call(app, "GET", "/v1/models", headers=[(b"x-api-key", b"secret")]))[0] \
        == 200
    assert asyncio.run(call(app, "GET", "/v1/health"))[0] == 200


# ----------------------------------------------------------------------------- a fake model


class FakeModel:
    """Streams 'a', 'b', 'c' once `gate` opens; records how many generate at once."""

    active = 0
    most = 0

    def __init__(self, gate) -> None:
        self.gate = gate

    def create_chat_completion(self, stream=False, logits_processor=(), **kwargs):
        assert stream
        FakeModel.active += 1
        FakeModel.most = max(FakeModel.most, FakeModel.active)
        try:
            assert self.gate.wait(10)
            for i, piece in enumerate("abc"):
                for processor in logits_processor:
                    processor([0] * (5 + i), None)
                yield {"object": "chat.completion.chunk", "choices": [{
                    "index": 0, "delta": {"content": piece}, "finish_reason": None}]}
            yield {"object": "chat.completion.chunk", "choices": [{
                "index": 0, "delta": {}, "finish_reason": "length"}]}
        finally:
            FakeModel.active -= 1


async def stream_call(app, body: dict) -> tuple[int, list, dict]:
    start, payload = await exchange(app, "POST", "/v1/chat/completions", json.dumps(body).encode())
    events = [line.removeprefix("data: ") for line in payload.decode().splitlines()
              if line.startswith("data: ")]
    return start["status"], events, dict(start["headers"]) | {b"body": payload}


def test_streams_queue_for_the_slot_and_a_full_queue_is_a_503():
    """One slot, a queue of one: the second stream waits, a third is refused at once; both
    streams complete, with usage counted by the logits processor."""
    import threading

    async def scenario():
        gate = threading.Event()
        app = ModelServer("m", parallel=1, max_queue=1)
        app.load(lambda: FakeModel(gate))
        body = {"messages": USER, "stream": True, "stream_options": {"include_usage": True},
                "max_tokens": 3}
        first = asyncio.ensure_future(stream_call(app, body))
        second = asyncio.ensure_future(stream_call(app, body))
        while app.slots is None or app.slots.waiting < 1:
            await asyncio.sleep(0.01)
        status, events, headers = await stream_call(app, body)  # the queue holds one: full
        assert status == 503 and headers[b"retry-after"] == b"1"
        error = json.loads(headers[b"body"])["error"]
        assert error["type"] == "unavailable_error" and "busy" in error["message"]
        gate.set()
        for status, events, _ in await asyncio.gather(first, second):
            assert status == 200 and events[-1] == "[DONE]"
            chunks = [json.loads(e) for e in events[:-1]]
            text = "".join(c["choices"][0]["delta"].get("content") or ""
                           for c in chunks if c["choices"])
            assert text == "abc"
            assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {
                "prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
        assert FakeModel.most == 1  # one slot: one generation at a time

    FakeModel.most = 0
    asyncio.run(scenario())
