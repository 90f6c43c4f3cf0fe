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
    assert report["tools"] == {"conversations": 1, "lines": [len(EVERY_KIND)], "define_only": 0,
                               "define_only_lines": []}
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


# --------------------------------------------------------------------------- wording


def test_a_gguf_or_binary_file_given_as_data_is_named_plainly(tmp_path):
    gguf_file = tmp_path / "model.gguf"
    gguf_file.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 64)
    with pytest.raises(DataError, match="is a GGUF model file, not chat data: give a model as modelType"):
        read_source(gguf_file)
    blob = tmp_path / "chats.bin"
    blob.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(DataError) as info:
        read_source(blob)
    assert "holds NUL bytes (0x00), as binary files" in str(info.value)
    assert "zero bytes" not in str(info.value)


@pytest.mark.parametrize("source", ["jsonl", "parquet"])
def test_the_summary_key_for_first_lines_is_the_same_for_every_source(tmp_path, source):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [conv(1), conv(1), {"messages": []}]
    if source == "jsonl":
        path = tmp_path / "d.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        path = tmp_path / "d.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
    summary = report_summary(prepare_conversations(path, eval_fraction=0).report)
    assert summary["first_lines"] == {"duplicate": [2], "empty": [3]}
    assert summary.get("unit", "line") == ("line" if source == "jsonl" else "row")
    assert not any(key.startswith("first_") and key != "first_lines" for key in summary)


def test_mostly_duplicates_get_a_warning(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(conv(i % 2)) + "\n" for i in range(100)))
    data = prepare_conversations(path, eval_fraction=0)
    (warning,) = data.report["warnings"]
    assert warning.startswith("98 of 100 lines (98%) repeat an earlier conversation (more than 50%)")
    assert report_summary(data.report)["warnings"] == [warning]
    half = tmp_path / "half.jsonl"
    half.write_text("".join(json.dumps(conv(i % 50)) + "\n" for i in range(100)))
    assert prepare_conversations(half, eval_fraction=0).report["warnings"] == []


def test_a_rejection_names_each_error_once_with_its_lines(tmp_path):
    lines = [json.dumps(conv(i)) for i in range(10)]
    lines += ['{"messages": [{"role": "user" "content": "x"}]}'] * 6 + ["[1]"]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as info:
        prepare_conversations(path)
    text = str(info.value)
    assert ("first errors: lines 11, 12, 13, 14, 15, … (6 lines): Expecting ',' delimiter at column 31; "
            "line 17: expected a JSON object, got an array") in text
    assert text.count("delimiter") == 1


@pytest.mark.parametrize("written", [
    lambda rows: json.dumps(rows[0], indent=2),                       # one object, indented
    lambda rows: "\n".join(json.dumps(r, indent=2) for r in rows),    # objects one after another
    lambda rows: "\n".join(json.dumps(r, indent=1)[:-1] + " }" for r in rows),  # "{" not alone
])
def test_pretty_printed_json_gets_a_hint(tmp_path, written):
    path = tmp_path / "d.jsonl"
    path.write_text(written([conv(1), conv(2), conv(3)]) + "\n")
    with pytest.raises(DataError, match="looks like pretty-printed JSON: .*jq -c"):
        read_source(path)


def test_an_object_spread_over_lines_inside_jsonl_is_explained_on_its_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join([json.dumps(conv(i)) for i in range(20)] + ["{", '  "messages": []', "}"]) + "\n")
    source = read_source(path)
    assert "a line holding only '{'" in source.errors[0].message and "jq -c" in source.errors[0].message
