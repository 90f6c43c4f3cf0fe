"""The data report locates every row that was not used, adjusted or flagged, per reason; files
that are not JSONL at all get one clear message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chatbot_trainer.data.dataset import (
    MAX_REPORTED_LINES,
    NOT_USED,
    DataError,
    prepare_conversations,
    read_source,
    report_summary,
)
from chatbot_trainer.data.readers import CSV_MESSAGE


def conv(i: int, answer: str | None = None) -> dict:
    return {"messages": [{"role": "user", "content": f"Question {i}?"},
                         {"role": "assistant", "content": answer or f"Answer {i}."}]}


TOOL_ROW = {
    "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "tool_calls": [{"type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "content": "18"},
        {"role": "assistant", "content": "18 °C."},
    ],
    "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}],
}

# (line content, what the report must say about that line)
EVERY_KIND = [
    (json.dumps(conv(1)), None),
    ('{"messages": [{"role": "user"', ("not_used", "malformed")),
    ("[1, 2]", ("not_used", "malformed")),
    (b'{"prompt": "caf\xe9", "completion": "x"}', ("not_used", "malformed")),
    (json.dumps({"messages": []}), ("not_used", "empty")),
    (json.dumps(conv(1)), ("not_used", "duplicate")),
    (json.dumps(conv(2, "x" * 400)), ("not_used", "too_long")),
    (json.dumps({"messages": [{"role": "user", "content": "anyone?"}]}), ("not_used", "no_assistant_turn")),
    (json.dumps({"question": "q", "answer": "a"}), ("not_used", "unknown_format")),
    (json.dumps({"messages": [{"role": "narrator", "content": "x"}, {"role": "assistant", "content": "a"}]}),
     ("not_used", "bad_role")),
    (json.dumps({"prompt": "q", "completion": 5}), ("not_used", "bad_content")),
    (json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "18"},
                              {"role": "assistant", "content": "a"}]}), ("not_used", "bad_tool_call")),
    (json.dumps({**conv(3), "tools": "not json"}), ("not_used", "bad_tools")),
    (json.dumps({"messages": [{"role": "system", "content": "S"}, {"role": "assistant", "content": "Hi!"}]}),
     ("flagged", "no_user_turn")),
    (json.dumps({"messages": [*conv(4)["messages"], {"role": "user", "content": "thanks"}]}),
     ("adjusted", "trailing_user_turn_dropped")),
    (json.dumps({"messages": [{"role": "user", "content": [{"type": "text", "value": "q5"}]},
                              {"role": "assistant", "content": [{"type": "text", "value": "a5"}]}]}),
     ("adjusted", "text_part_value_key")),
    (json.dumps(TOOL_ROW), None),
]


def write_every_kind(path: Path, good_rows: int = 0) -> Path:
    lines = [line if isinstance(line, bytes) else line.encode() for line, _ in EVERY_KIND]
    lines += [json.dumps(conv(100 + i)).encode() for i in range(good_rows)]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_every_reason_is_located_by_line(tmp_path):
    path = write_every_kind(tmp_path / "every-kind.jsonl")
    report = prepare_conversations(path, max_chars=300, max_bad_line_fraction=1.0, eval_fraction=0).report
    expected: dict[tuple[str, str], list[int]] = {}
    for number, (_, where) in enumerate(EVERY_KIND, 1):
        if where:
            expected.setdefault(where, []).append(number)
    found = {
        (group, reason): entry["lines"]
        for group in ("not_used", "flagged", "adjusted")
        for reason, entry in report["rows"][group].items()
    }
    assert found == expected
    for group in ("not_used", "flagged", "adjusted"):
        for entry in report["rows"][group].values():
            assert entry["count"] == len(entry["lines"]) and entry["meaning"]
    assert report["malformed"] == 3
    assert report["flagged"] == {"no_user_turn": 1}
    assert report["tools"] == {"conversations": 1, "lines": [len(EVERY_KIND)]}
    assert report["unit"] == "line" and report["reader"] == "jsonl"
    json.dumps(report)


def test_every_not_used_reason_has_a_meaning():
    for reason in ("malformed", "duplicate", "too_long", "empty", "no_assistant_turn", "bad_tool_call", "bad_tools"):
        assert NOT_USED[reason]


def test_first_lines_and_the_count_of_many(tmp_path):
    rows = [conv(1)] * (MAX_REPORTED_LINES + 15)
    data = prepare_conversations(rows, eval_fraction=0)
    entry = data.report["rows"]["not_used"]["duplicate"]
    assert entry["count"] == MAX_REPORTED_LINES + 14
    assert entry["lines"] == list(range(2, MAX_REPORTED_LINES + 2))


def test_status_summary_is_compact_and_locates(tmp_path):
    path = write_every_kind(tmp_path / "every-kind.jsonl", good_rows=200)
    report = prepare_conversations(path, max_chars=300).report
    summary = report_summary(report)
    assert summary["first_lines"]["duplicate"] == [6]
    assert summary["first_lines"]["malformed"] == [2, 3, 4]
    assert summary["first_lines"]["no_user_turn"] == [14]
    assert summary["dropped"]["too_long"] == 1 and summary["flagged"] == {"no_user_turn": 1}
    assert summary["tool_conversations"] == 1
    assert len(json.dumps(summary)) < 1500


def test_kept_rows_carry_their_line(tmp_path):
    path = write_every_kind(tmp_path / "every-kind.jsonl")
    data = prepare_conversations(path, max_chars=300, max_bad_line_fraction=1.0, eval_fraction=0)
    lines = [item["line"] for item in data.train]
    assert lines == [1, 14, 15, 16, 17]
    assert data.train[-1]["tools"] == TOOL_ROW["tools"]


def test_system_prompts_counted_own_added_none():
    rows = [{"messages": [{"role": "system", "content": "S"}, *conv(1)["messages"]]}, conv(2), conv(3)]
    report = prepare_conversations(rows, eval_fraction=0).report
    assert report["system_prompts"] == {"own": 1, "added": 0, "none": 2}
    data = prepare_conversations(rows, eval_fraction=0, system_prompt="Be brief.")
    assert data.report["system_prompts"] == {"own": 1, "added": 2, "none": 0}
    assert data.report["rows"]["adjusted"]["system_prompt_added"]["lines"] == [2, 3]
    assert [item["messages"][0]["content"] for item in data.train] == ["S", "Be brief.", "Be brief."]


def test_no_usable_conversations_names_lines():
    with pytest.raises(DataError, match=r"all dropped \(1 empty \(record 4\), 3 too_long \(records 1, 2, 3\)\)"):
        prepare_conversations([conv(1), conv(1), conv(1), {"messages": []}], max_chars=5)


# --------------------------------------------------------------------------- not JSONL


def test_csv_by_extension(tmp_path):
    path = tmp_path / "chats.csv"
    path.write_text("instruction,output\nHi,Hello\n")
    with pytest.raises(DataError) as info:
        prepare_conversations(path)
    assert CSV_MESSAGE in str(info.value)
    assert CSV_MESSAGE == (
        "CSV is not supported; convert to JSONL with one conversation per line (see examples/data/README.md)"
    )


def test_csv_by_content_with_any_name(tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_text('prompt,completion\n"How do I reset it?","Open Settings"\n"Refund?","Yes, 14 days"\n')
    with pytest.raises(DataError, match="CSV is not supported"):
        prepare_conversations(path)


def test_jsonl_named_csv_is_read(tmp_path):
    path = tmp_path / "chats.csv"
    path.write_text(json.dumps(conv(1)) + "\n")
    assert prepare_conversations(path, eval_fraction=0).report["kept"] == 1


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-32-be"])
def test_wide_encodings_with_and_without_bom(tmp_path, encoding):
    path = tmp_path / "chats.jsonl"
    text = "\n".join(json.dumps(conv(i, "Ça coûte 5 €."), ensure_ascii=False) for i in range(3)) + "\n"
    path.write_bytes(text.encode(encoding))
    data = prepare_conversations(path, eval_fraction=0)
    assert data.report["kept"] == 3 and data.report["malformed"] == 0
    assert data.train[0]["messages"][1]["content"] == "Ça coûte 5 €."
    note = data.report["notes"][0]
    assert "UTF-16" in note or "UTF-32" in note
    assert ("without a byte-order mark" in note) == encoding.endswith(("-le", "-be"))


def test_legacy_8bit_encoding_named(tmp_path):
    path = tmp_path / "chats.jsonl"
    text = "\n".join(json.dumps(conv(i, "Voilà, c'est réglé."), ensure_ascii=False) for i in range(4)) + "\n"
    path.write_bytes(text.encode("cp1252"))
    with pytest.raises(DataError) as info:
        prepare_conversations(path)
    message = str(info.value)
    assert "is not UTF-8: 4 lines" in message and "Windows-1252" in message and "iconv" in message


def test_a_few_bad_bytes_stay_line_errors(tmp_path):
    path = tmp_path / "chats.jsonl"
    good = [json.dumps(conv(i)).encode() for i in range(30)]
    path.write_bytes(b"\n".join([*good, b'{"prompt": "caf\xe9", "completion": "x"}']) + b"\n")
    data = prepare_conversations(path, eval_fraction=0)
    assert data.report["errors"][0]["line"] == 31
    assert "save the file as UTF-8" in data.report["errors"][0]["message"]


def test_zip_and_binary_files_named(tmp_path):
    xlsx = tmp_path / "chats.xlsx"
    xlsx.write_bytes(b"PK\x03\x04" + b"\x00" * 64)
    with pytest.raises(DataError, match="ZIP archive"):
        read_source(xlsx)
    blob = tmp_path / "chats.bin"
    blob.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(DataError, match="not a text file"):
        read_source(blob)
