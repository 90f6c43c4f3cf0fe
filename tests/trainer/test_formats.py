"""Conversation format detection and conversion."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import pytest

from chatbot_trainer.data.formats import (
    FORMATS,
    REASONS,
    FormatError,
    convert_record,
    detect_format,
    normalise_text,
    to_messages,
    uses_tools,
)


def msg(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def reason_of(record, fmt: str = "auto") -> str:
    with pytest.raises(FormatError) as info:
        convert_record(record, fmt)
    assert info.value.reason in REASONS
    return info.value.reason


# --------------------------------------------------------------------------- normalise_text


class TestNormaliseText:
    def test_newlines_and_trailing_whitespace(self):
        assert normalise_text("a  \r\nb\t\rc \n") == "a\nb\nc"

    def test_leading_and_trailing_blank_lines_keep_indentation(self):
        assert normalise_text("\n \n    indented\n  more\n\n\t\n") == "    indented\n  more"

    def test_nfc(self):
        decomposed = "Cafe\u0301"
        assert normalise_text(decomposed) == "Caf\u00e9"

    def test_control_characters_removed_but_tab_and_newline_kept(self):
        assert normalise_text("a\x00b\x07c\x1bd\x7fe\tf\ng") == "abcde\tf\ng"

    def test_vertical_tab_and_form_feed_removed(self):
        assert normalise_text("a\x0bb\x0cc") == "abc"

    def test_lone_surrogate_replaced(self):
        assert normalise_text("x\ud800y") == "x\ufffdy"

    def test_empty_and_whitespace(self):
        assert normalise_text("") == ""
        assert normalise_text(" \n\t \r\n") == ""

    def test_plain_text_unchanged(self):
        text = "Hello, world! Ünïcödé is fine. 你好"
        assert normalise_text(text) == text


# --------------------------------------------------------------------------- detection


class TestDetect:
    @pytest.mark.parametrize(
        ("record", "expected"),
        [
            ({"messages": []}, "messages"),
            ({"conversations": []}, "sharegpt"),
            ({"instruction": "i", "output": "o"}, "alpaca"),
            ({"instruction": "i", "input": "", "output": "o", "system": "s"}, "alpaca"),
            ({"prompt": "p", "completion": "c"}, "prompt_completion"),
        ],
    )
    def test_detects(self, record, expected):
        assert detect_format(record) == expected
        assert expected in FORMATS

    def test_unknown_keys_named(self):
        with pytest.raises(FormatError) as info:
            detect_format({"question": "q", "answer": "a"})
        assert info.value.reason == "unknown_format"
        assert "answer" in info.value.message and "question" in info.value.message

    def test_non_object(self):
        assert reason_of(["a", "b"]) == "unknown_format"
        assert reason_of("text") == "unknown_format"

    def test_empty_object(self):
        assert reason_of({}) == "empty"
        assert reason_of({}, "messages") == "empty"

    def test_formats_tuple(self):
        assert FORMATS == ("messages", "sharegpt", "alpaca", "prompt_completion")


# --------------------------------------------------------------------------- messages


class TestMessages:
    def test_basic(self):
        record = {"messages": [msg("system", "Be nice."), msg("user", "Hi"), msg("assistant", "Hello!")]}
        conv = convert_record(record)
        assert conv.format == "messages"
        assert conv.messages == [msg("system", "Be nice."), msg("user", "Hi"), msg("assistant", "Hello!")]
        assert conv.trailing_user_dropped == 0

    def test_content_parts_joined_non_text_ignored(self):
        record = {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "Look at this"},
                        {"type": "image_url", "image_url": {"url": "http://x/y.png"}},
                        {"type": "text", "text": "what is it?"},
                    ],
                },
                {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
            ]
        }
        assert to_messages(record) == [msg("user", "Look at this\nwhat is it?"), msg("assistant", "A cat.")]

    def test_content_parts_with_bad_text(self):
        record = {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}
        assert reason_of(record) == "bad_content"

    @pytest.mark.parametrize("content", [5, {"text": "x"}, True])
    def test_bad_content_type(self, content):
        record = {"messages": [msg("user", "q"), {"role": "assistant", "content": content}]}
        assert reason_of(record) == "bad_content"

    def test_messages_not_a_list(self):
        assert reason_of({"messages": "hello"}) == "unknown_format"

    def test_message_not_an_object(self):
        assert reason_of({"messages": ["hello", msg("assistant", "x")]}) == "bad_content"

    @pytest.mark.parametrize("role", ["tool", "function", "observation"])
    def test_tool_result_without_a_call_rejected(self, role):
        record = {"messages": [msg("user", "q"), msg(role, "{}"), msg("assistant", "a")]}
        with pytest.raises(FormatError) as info:
            convert_record(record)
        assert info.value.reason == "bad_tool_call"
        assert "does not follow an assistant tool call" in info.value.message

    def test_tool_call_without_a_name_rejected(self):
        record = {
            "messages": [
                msg("user", "q"),
                {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]},
            ]
        }
        assert reason_of(record) == "bad_tool_call"

    def test_text_parts_given_as_value_are_read_and_noted(self):
        record = {"messages": [{"role": "user", "content": [{"type": "text", "value": "q"}]},
                               {"role": "assistant", "content": [{"type": "text", "value": "a"}]}]}
        conv = convert_record(record)
        assert conv.messages == [msg("user", "q"), msg("assistant", "a")]
        assert conv.adjustments == ("text_part_value_key",)

    def test_text_part_without_text_explained(self):
        record = {"messages": [{"role": "user", "content": [{"type": "text", "body": "q"}]}, msg("assistant", "a")]}
        with pytest.raises(FormatError) as info:
            convert_record(record)
        assert info.value.reason == "bad_content"
        assert "keys: body, type" in info.value.message
        assert '{"type": "text", "text": "..."}' in info.value.message

    def test_no_user_turn_is_flagged_not_dropped(self):
        conv = convert_record({"messages": [msg("system", "S"), msg("assistant", "a")]})
        assert conv.flags == ("no_user_turn",)
        assert convert_record({"messages": [msg("user", "q"), msg("assistant", "a")]}).flags == ()

    def test_unknown_role(self):
        with pytest.raises(FormatError) as info:
            convert_record({"messages": [msg("narrator", "x"), msg("assistant", "a")]})
        assert info.value.reason == "bad_role"
        assert "narrator" in info.value.message

    def test_missing_role(self):
        assert reason_of({"messages": [{"content": "x"}, msg("assistant", "a")]}) == "bad_role"

    def test_role_case_and_aliases(self):
        record = {"messages": [msg("Developer", "S"), msg("USER", "q"), msg("model", "a")]}
        assert to_messages(record) == [msg("system", "S"), msg("user", "q"), msg("assistant", "a")]

    def test_trailing_user_turns_dropped(self):
        record = {"messages": [msg("user", "q"), msg("assistant", "a"), msg("user", "more?")]}
        conv = convert_record(record)
        assert conv.messages == [msg("user", "q"), msg("assistant", "a")]
        assert conv.trailing_user_dropped == 1

    def test_only_user_is_no_assistant_turn(self):
        assert reason_of({"messages": [msg("user", "hello?")]}) == "no_assistant_turn"

    def test_empty_assistant_is_no_assistant_turn(self):
        assert reason_of({"messages": [msg("user", "q"), msg("assistant", "  \n")]}) == "no_assistant_turn"

    def test_all_empty(self):
        assert reason_of({"messages": []}) == "empty"
        assert reason_of({"messages": [msg("user", " "), msg("assistant", "")]}) == "empty"

    def test_null_content_is_empty_turn(self):
        record = {"messages": [msg("user", "q"), {"role": "assistant", "content": None}, msg("assistant", "a")]}
        assert to_messages(record) == [msg("user", "q"), msg("assistant", "a")]

    def test_consecutive_same_role_merged(self):
        record = {"messages": [msg("user", "one"), msg("user", "two"), msg("assistant", "a")]}
        assert to_messages(record) == [msg("user", "one\n\ntwo"), msg("assistant", "a")]

    def test_empty_turns_removed(self):
        record = {"messages": [msg("user", "q"), msg("assistant", ""), msg("user", "q2"), msg("assistant", "a")]}
        assert to_messages(record) == [msg("user", "q\n\nq2"), msg("assistant", "a")]

    def test_leading_system_messages_merged(self):
        record = {"messages": [msg("system", "A"), msg("system", "B"), msg("user", "q"), msg("assistant", "a")]}
        assert to_messages(record)[0] == msg("system", "A\n\nB")

    def test_system_in_the_middle_rejected(self):
        record = {"messages": [msg("user", "q"), msg("system", "S"), msg("assistant", "a")]}
        with pytest.raises(FormatError) as info:
            convert_record(record)
        assert info.value.reason == "bad_role"
        assert "system" in info.value.message

    def test_empty_system_dropped(self):
        record = {"messages": [msg("system", "  "), msg("user", "q"), msg("assistant", "a")]}
        assert to_messages(record) == [msg("user", "q"), msg("assistant", "a")]

    def test_top_level_system_key(self):
        record = {"system": "S", "messages": [msg("user", "q"), msg("assistant", "a")]}
        assert to_messages(record)[0] == msg("system", "S")

    def test_text_is_normalised(self):
        record = {"messages": [msg("user", "q  \r\n"), msg("assistant", "\n\na\x00b  ")]}
        assert to_messages(record) == [msg("user", "q"), msg("assistant", "ab")]

    def test_assistant_first_allowed(self):
        record = {"messages": [msg("assistant", "Welcome!"), msg("user", "hi"), msg("assistant", "Hello")]}
        assert [m["role"] for m in to_messages(record)] == ["assistant", "user", "assistant"]


# --------------------------------------------------------------------------- sharegpt


class TestShareGPT:
    @pytest.mark.parametrize(
        ("speaker", "role"),
        [
            ("human", "user"),
            ("user", "user"),
            ("gpt", "assistant"),
            ("assistant", "assistant"),
            ("chatgpt", "assistant"),
            ("bing", "assistant"),
            ("bard", "assistant"),
        ],
    )
    def test_role_mapping(self, speaker, role):
        other = "gpt" if role == "user" else "human"
        turns = [{"from": speaker, "value": "x"}, {"from": other, "value": "y"}]
        if role == "assistant":
            turns.reverse()
        messages = to_messages({"conversations": turns})
        assert {"role": role, "content": "x"} in messages

    def test_system_and_multi_turn(self):
        record = {
            "conversations": [
                {"from": "system", "value": "S"},
                {"from": "human", "value": "q1"},
                {"from": "gpt", "value": "a1"},
                {"from": "human", "value": "q2"},
                {"from": "gpt", "value": "a2"},
            ]
        }
        conv = convert_record(record)
        assert conv.format == "sharegpt"
        assert conv.messages == [
            msg("system", "S"),
            msg("user", "q1"),
            msg("assistant", "a1"),
            msg("user", "q2"),
            msg("assistant", "a2"),
        ]

    def test_trailing_human_dropped(self):
        record = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}, {"from": "human", "value": "?"}]}
        conv = convert_record(record)
        assert conv.messages[-1] == msg("assistant", "a")
        assert conv.trailing_user_dropped == 1

    def test_role_content_keys_accepted(self):
        record = {"conversations": [msg("user", "q"), msg("assistant", "a")]}
        assert to_messages(record) == [msg("user", "q"), msg("assistant", "a")]

    def test_function_call_without_a_name_rejected(self):
        record = {"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "{}"}, {"from": "gpt", "value": "a"}]}
        assert reason_of(record) == "bad_tool_call"

    def test_function_call_that_is_not_json_rejected(self):
        record = {"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "get_weather(Paris)"}]}
        with pytest.raises(FormatError) as info:
            convert_record(record)
        assert info.value.reason == "bad_tool_call" and "not valid JSON" in info.value.message

    def test_unknown_speaker(self):
        assert reason_of({"conversations": [{"from": "alien", "value": "q"}, {"from": "gpt", "value": "a"}]}) == "bad_role"

    def test_non_string_value(self):
        assert reason_of({"conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "a"}]}) == "bad_content"

    def test_conversations_not_a_list(self):
        assert reason_of({"conversations": {"from": "human"}}) == "unknown_format"


# --------------------------------------------------------------------------- alpaca


class TestAlpaca:
    def test_instruction_only(self):
        conv = convert_record({"instruction": "Say hi", "input": "", "output": "Hi"})
        assert conv.format == "alpaca"
        assert conv.messages == [msg("user", "Say hi"), msg("assistant", "Hi")]

    def test_instruction_and_input(self):
        record = {"instruction": "Translate", "input": "Bonjour", "output": "Hello"}
        assert to_messages(record)[0] == msg("user", "Translate\n\nBonjour")

    def test_missing_input_and_null_input(self):
        assert to_messages({"instruction": "I", "output": "O"})[0] == msg("user", "I")
        assert to_messages({"instruction": "I", "input": None, "output": "O"})[0] == msg("user", "I")

    def test_whitespace_input_ignored(self):
        assert to_messages({"instruction": "I", "input": "  \n", "output": "O"})[0] == msg("user", "I")

    def test_system(self):
        record = {"system": "S", "instruction": "I", "output": "O"}
        assert to_messages(record) == [msg("system", "S"), msg("user", "I"), msg("assistant", "O")]

    def test_empty_output(self):
        assert reason_of({"instruction": "I", "input": "", "output": ""}) == "no_assistant_turn"

    def test_all_empty(self):
        assert reason_of({"instruction": "", "input": "", "output": ""}) == "empty"

    def test_non_string_output(self):
        assert reason_of({"instruction": "I", "output": 42}) == "bad_content"


# --------------------------------------------------------------------------- prompt/completion


class TestPromptCompletion:
    def test_plain(self):
        conv = convert_record({"prompt": "Q", "completion": "A"})
        assert conv.format == "prompt_completion"
        assert conv.messages == [msg("user", "Q"), msg("assistant", "A")]

    def test_system(self):
        record = {"system": "S", "prompt": "Q", "completion": "A"}
        assert to_messages(record) == [msg("system", "S"), msg("user", "Q"), msg("assistant", "A")]

    def test_conversational(self):
        record = {
            "prompt": [msg("system", "S"), msg("user", "Q")],
            "completion": [msg("assistant", "A")],
        }
        assert to_messages(record) == [msg("system", "S"), msg("user", "Q"), msg("assistant", "A")]

    def test_conversational_multi_turn_prompt(self):
        record = {
            "prompt": [msg("user", "Q1"), msg("assistant", "A1"), msg("user", "Q2")],
            "completion": [msg("assistant", "A2")],
        }
        assert [m["content"] for m in to_messages(record)] == ["Q1", "A1", "Q2", "A2"]

    def test_empty_completion(self):
        assert reason_of({"prompt": "Q", "completion": ""}) == "no_assistant_turn"

    def test_bad_types(self):
        assert reason_of({"prompt": 1, "completion": "A"}) == "bad_content"


# --------------------------------------------------------------------------- forcing a format


class TestForcedFormat:
    def test_forced_matching(self):
        assert convert_record({"prompt": "Q", "completion": "A"}, "prompt_completion").format == "prompt_completion"

    @pytest.mark.parametrize("fmt", ["messages", "sharegpt", "alpaca", "prompt_completion"])
    def test_forced_mismatch_is_unknown_format(self, fmt):
        records = {
            "messages": {"conversations": [{"from": "human", "value": "q"}]},
            "sharegpt": {"messages": [msg("user", "q"), msg("assistant", "a")]},
            "alpaca": {"prompt": "q", "completion": "a"},
            "prompt_completion": {"instruction": "q", "output": "a"},
        }
        with pytest.raises(FormatError) as info:
            convert_record(records[fmt], fmt)
        assert info.value.reason == "unknown_format"
        assert fmt in info.value.message

    def test_invalid_fmt_name(self):
        with pytest.raises(ValueError):
            convert_record({"prompt": "q", "completion": "a"}, "csv")


def test_format_error_fields_and_pickle():
    err = FormatError("bad_role", "role 'x' unknown")
    assert err.reason == "bad_role" and err.message == "role 'x' unknown"
    assert "bad_role" in str(err)
    again = pickle.loads(pickle.dumps(err))
    assert (again.reason, again.message) == (err.reason, err.message)


def test_modules_do_not_import_torch():
    code = (
        "import sys, chatbot_trainer.data.formats, chatbot_trainer.data.dataset; "
        "print('torch' in sys.modules)"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    assert out.stdout.strip() == "False"


# --------------------------------------------------------------------------- tool calling

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
WEATHER_CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}


class TestToolCalling:
    def test_openai_messages_with_tools_calls_and_results(self):
        record = {
            "messages": [
                msg("user", "Weather in Paris?"),
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{"id": "call_1", "type": "function",
                                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}],
                },
                {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 18}'},
                msg("assistant", "It is 18 °C in Paris."),
            ],
            "tools": [WEATHER_TOOL],
        }
        conv = convert_record(record)
        assert conv.tools == [WEATHER_TOOL]
        assert conv.messages == [
            msg("user", "Weather in Paris?"),
            {"role": "assistant", "content": "", "tool_calls": [{**WEATHER_CALL, "id": "call_1"}]},
            {"role": "tool", "content": '{"temp_c": 18}', "tool_call_id": "call_1"},
            msg("assistant", "It is 18 °C in Paris."),
        ]
        assert uses_tools(conv.messages, conv.tools)

    def test_legacy_function_call_and_function_role(self):
        record = {
            "functions": [WEATHER_TOOL["function"]],
            "messages": [
                msg("user", "Weather in Paris?"),
                {"role": "assistant", "content": "", "function_call": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
                {"role": "function", "name": "get_weather", "content": "18 C"},
                msg("assistant", "18 °C."),
            ],
        }
        conv = convert_record(record)
        assert conv.tools == [WEATHER_TOOL]
        assert conv.messages[1]["tool_calls"] == [WEATHER_CALL]
        assert conv.messages[2] == {"role": "tool", "content": "18 C", "name": "get_weather"}

    def test_sharegpt_function_call_and_observation(self):
        """LLaMA-Factory's glaive tool-calling layout: tools as a JSON string of bare functions."""
        record = {
            "conversations": [
                {"from": "human", "value": "Weather in Paris?"},
                {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Paris"}}'},
                {"from": "observation", "value": '{"temp_c": 18}'},
                {"from": "gpt", "value": "It is 18 °C."},
            ],
            "tools": json.dumps([WEATHER_TOOL["function"]]),
        }
        conv = convert_record(record)
        assert conv.format == "sharegpt"
        assert conv.tools == [WEATHER_TOOL]
        assert [m["role"] for m in conv.messages] == ["user", "assistant", "tool", "assistant"]
        assert conv.messages[1] == {"role": "assistant", "content": "", "tool_calls": [WEATHER_CALL]}

    def test_parallel_calls_in_one_function_call_turn(self):
        calls = [{"name": "get_weather", "arguments": {"city": "Paris"}},
                 {"name": "get_weather", "arguments": {"city": "Rome"}}]
        record = {"conversations": [{"from": "human", "value": "Paris and Rome?"},
                                    {"from": "function_call", "value": json.dumps(calls)},
                                    {"from": "observation", "value": "18"},
                                    {"from": "observation", "value": "24"},
                                    {"from": "gpt", "value": "18 and 24."}]}
        messages = to_messages(record)
        assert len(messages[1]["tool_calls"]) == 2
        assert [m["role"] for m in messages] == ["user", "assistant", "tool", "tool", "assistant"]

    def test_llamafactory_tool_call_parts(self):
        record = {"messages": [
            {"role": "user", "content": [{"type": "text", "value": "Weather in Paris?"}]},
            {"role": "assistant", "content": [{"type": "tool_call", "value": json.dumps(WEATHER_CALL["function"])}]},
            {"role": "tool", "content": [{"type": "text", "value": "18"}]},
            {"role": "assistant", "content": [{"type": "text", "value": "18 °C."}]},
        ]}
        conv = convert_record(record)
        assert conv.messages[1]["tool_calls"] == [WEATHER_CALL]
        assert conv.adjustments == ("text_part_value_key",)

    def test_text_and_call_in_one_assistant_turn(self):
        record = {"messages": [msg("user", "q"),
                               {"role": "assistant", "content": "Let me check.", "tool_calls": [WEATHER_CALL]},
                               {"role": "tool", "content": "18"}, msg("assistant", "18.")]}
        assert to_messages(record)[1] == {"role": "assistant", "content": "Let me check.", "tool_calls": [WEATHER_CALL]}

    def test_structured_tool_result_kept_as_json_text(self):
        record = {"messages": [msg("user", "q"), {"role": "assistant", "tool_calls": [WEATHER_CALL]},
                               {"role": "tool", "content": {"temp_c": 18}}, msg("assistant", "18.")]}
        assert to_messages(record)[2]["content"] == '{"temp_c": 18}'

    def test_conversation_may_end_with_a_call_and_trailing_results_are_dropped(self):
        record = {"messages": [msg("user", "q"), {"role": "assistant", "tool_calls": [WEATHER_CALL]},
                               {"role": "tool", "content": "18"}]}
        conv = convert_record(record)
        assert conv.messages[-1]["tool_calls"] == [WEATHER_CALL]
        assert conv.adjustments == ("trailing_tool_result_dropped",)

    @pytest.mark.parametrize("tools", ["not json", 5, [{"description": "no name"}]])
    def test_bad_tool_definitions(self, tools):
        record = {"messages": [msg("user", "q"), msg("assistant", "a")], "tools": tools}
        assert reason_of(record) == "bad_tools"

    def test_arguments_that_are_not_json(self):
        call = {"type": "function", "function": {"name": "get_weather", "arguments": "{city: Paris"}}
        record = {"messages": [msg("user", "q"), {"role": "assistant", "tool_calls": [call]}]}
        assert reason_of(record) == "bad_tool_call"

    def test_only_assistants_call_tools(self):
        record = {"messages": [{"role": "user", "content": "q", "tool_calls": [WEATHER_CALL]}, msg("assistant", "a")]}
        assert reason_of(record) == "bad_tool_call"

    def test_empty_tools_mean_none(self):
        record = {"messages": [msg("user", "q"), msg("assistant", "a")], "tools": ""}
        conv = convert_record(record)
        assert conv.tools is None and not uses_tools(conv.messages, conv.tools)
