"""Tool calls in the local server's answers, as llama-server returns them (pure functions)."""

from __future__ import annotations

import json

from chatbot_trainer.serve import tool_calls

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lisbon"}}\n</tool_call>'


def test_a_call_becomes_an_openai_tool_call():
    content, calls = tool_calls.parse(CALL)
    assert content == ""
    (call,) = calls
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Lisbon"}


def test_text_before_several_calls_and_other_argument_forms():
    text = ("Let me check.\n" + CALL + "\n"
            + '<tool_call>{"name": "get_time", "parameters": {"tz": "Europe/Lisbon"}}</tool_call>\n'
            + '<tool_call>{"name": "ping", "arguments": "{\\"x\\": 1}"}</tool_call>')
    content, calls = tool_calls.parse(text)
    assert content == "Let me check."
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time", "ping"]
    assert json.loads(calls[1]["function"]["arguments"]) == {"tz": "Europe/Lisbon"}
    assert calls[2]["function"]["arguments"] == '{"x": 1}'  # already a JSON string: kept
    assert len({c["id"] for c in calls}) == 3


def test_what_is_not_a_well_formed_call_stays_text():
    for text in ["It is sunny in Lisbon.",
                 CALL + " and then some prose",                       # text after the call
                 '<tool_call>{"name": "get_weather", </tool_call>',     # not JSON
                 '<tool_call>{"arguments": {}}</tool_call>',            # no name
                 '<tool_call>["get_weather"]</tool_call>',              # not an object
                 '<tool_call>{"name": "get_weather"}']:                 # never closed
        assert tool_calls.parse(text) is None, text


def test_a_whole_answer_gets_tool_calls_and_finish_reason():
    choice = {"index": 0, "message": {"role": "assistant", "content": CALL}, "finish_reason": "stop"}
    converted = tool_calls.in_message(choice)
    assert converted["finish_reason"] == "tool_calls"
    assert converted["message"]["content"] == ""
    assert converted["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
    prose = {"index": 0, "message": {"role": "assistant", "content": "Hi"}, "finish_reason": "stop"}
    assert tool_calls.in_message(prose) is prose


def test_only_requests_that_offer_tools_are_parsed():
    tools = [{"type": "function", "function": {"name": "get_weather"}}]
    assert tool_calls.wanted({"tools": tools})
    assert not tool_calls.wanted({"tools": tools, "tool_choice": "none"})
    assert not tool_calls.wanted({"tools": []}) and not tool_calls.wanted({})


def chunk(content=None, role=None, finish=None):
    delta = {k: v for k, v in (("role", role), ("content", content)) if v is not None}
    return {"id": "x", "object": "chat.completion.chunk", "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def stream(pieces):
    chunks = [chunk(role="assistant")] + [chunk(p) for p in pieces] + [chunk(finish="stop")]
    filter_ = tool_calls.StreamFilter()
    return [out for c in chunks for out in filter_.feed(c)]


def test_a_streamed_call_is_held_back_and_sent_as_a_tool_calls_delta():
    pieces = ["<tool", "_call>\n", '{"name": "get_weather", ', '"arguments": {"city": "Lisbon"}}', "\n</tool_call>"]
    out = stream(pieces)
    deltas = [c["choices"][0]["delta"] for c in out]
    assert deltas[0] == {"role": "assistant"}
    assert not any("content" in d for d in deltas)
    (call,) = deltas[1]["tool_calls"]
    assert call["index"] == 0 and call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Lisbon"}
    assert [c["choices"][0]["finish_reason"] for c in out] == [None, None, "tool_calls"]


def test_a_streamed_answer_in_prose_passes_unchanged_and_at_once():
    filter_ = tool_calls.StreamFilter()
    first = [chunk(role="assistant"), chunk("It"), chunk(" is"), chunk(" sunny."), chunk(finish="stop")]
    outs = [filter_.feed(c) for c in first]
    assert outs[0] == [] and outs[1] == [first[0], first[1]]  # held only while "" could begin a call
    assert outs[2:] == [[first[2]], [first[3]], [first[4]]]


def test_a_malformed_streamed_call_is_sent_as_the_text_it_was():
    pieces = ["<tool_call>", '{"name": ', "oops</tool_call>"]
    out = stream(pieces)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in out)
    assert text == "<tool_call>{\"name\": oops</tool_call>"
    assert out[-1]["choices"][0]["finish_reason"] == "stop"
