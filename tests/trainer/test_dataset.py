"""Reading, cleaning, splitting and reporting training data for the prepare step."""

from __future__ import annotations

import gzip
import http.server
import json
import re
import sys
import threading
from pathlib import Path

import pytest

from chatbot_trainer.data.dataset import (
    DataError,
    LineError,
    PreparedData,
    RawRecord,
    load_jsonl,
    prepare_conversations,
    read_records,
    read_source,
    resolve_source,
    write_jsonl,
)
from chatbot_trainer.data.formats import convert_record, to_messages

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "data" / "support.jsonl"


def conv(i: int, answer: str | None = None) -> dict:
    return {
        "messages": [
            {"role": "user", "content": f"Question number {i}?"},
            {"role": "assistant", "content": answer or f"Answer number {i}."},
        ]
    }


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def jsonl(path: Path, records: list) -> Path:
    return write_lines(path, [json.dumps(r) for r in records])


def questions(items: list[dict]) -> list[str]:
    return [item["messages"][0]["content"] for item in items]


# --------------------------------------------------------------------------- read_records


class TestReadRecords:
    def test_jsonl_with_blank_and_malformed_lines(self, tmp_path):
        path = write_lines(
            tmp_path / "d.jsonl",
            [
                json.dumps(conv(1)),
                "",
                "   ",
                '{"messages": [}',
                json.dumps(conv(2)),
                "[1, 2]",
                '"just a string"',
                json.dumps(conv(3)),
            ],
        )
        records, errors = read_records(path)
        assert [r.line for r in records] == [1, 5, 8]
        assert all(isinstance(r, RawRecord) and isinstance(r.data, dict) for r in records)
        assert [(e.line, e.reason) for e in errors] == [
            (4, "invalid_json"),
            (6, "not_an_object"),
            (7, "not_an_object"),
        ]
        assert all(isinstance(e, LineError) for e in errors)
        assert "column" in errors[0].message
        assert "array" in errors[1].message and "string" in errors[2].message

    def test_crlf_line_endings(self, tmp_path):
        path = tmp_path / "d.jsonl"
        path.write_bytes((json.dumps(conv(1)) + "\r\n" + json.dumps(conv(2)) + "\r\n").encode())
        records, errors = read_records(path)
        assert len(records) == 2 and not errors

    def test_bom(self, tmp_path):
        path = tmp_path / "d.jsonl"
        path.write_bytes(b"\xef\xbb\xbf" + json.dumps(conv(1)).encode() + b"\n")
        records, errors = read_records(path)
        assert len(records) == 1 and not errors

    def test_bom_with_array(self, tmp_path):
        path = tmp_path / "d.json"
        path.write_bytes(b"\xef\xbb\xbf" + json.dumps([conv(1)]).encode())
        records, errors = read_records(path)
        assert len(records) == 1 and not errors

    def test_invalid_utf8_is_a_line_error(self, tmp_path):
        path = tmp_path / "d.jsonl"
        good = json.dumps(conv(1), ensure_ascii=False).encode()
        bad = b'{"messages": [{"role": "user", "content": "caf\xe9"}]}'
        path.write_bytes(good + b"\n" + bad + b"\n" + "{\"prompt\": \"é\", \"completion\": \"ü\"}".encode() + b"\n")
        records, errors = read_records(path)
        assert [r.line for r in records] == [1, 3]
        assert records[1].data == {"prompt": "é", "completion": "ü"}
        assert len(errors) == 1
        assert errors[0].line == 2 and errors[0].reason == "invalid_utf8"
        assert "0xe9" in errors[0].message

    def test_json_array(self, tmp_path):
        path = tmp_path / "d.json"
        path.write_text(json.dumps([conv(1), "nope", conv(2), 7, None]), encoding="utf-8")
        records, errors = read_records(path)
        assert [(r.line, r.unit) for r in records] == [(1, "record"), (3, "record")]
        assert [(e.line, e.reason, e.unit) for e in errors] == [
            (2, "not_an_object", "record"),
            (4, "not_an_object", "record"),
            (5, "not_an_object", "record"),
        ]

    def test_pretty_printed_array_with_leading_whitespace(self, tmp_path):
        path = tmp_path / "d.json"
        path.write_text("\n  " + json.dumps([conv(1), conv(2)], indent=2), encoding="utf-8")
        records, errors = read_records(path)
        assert len(records) == 2 and not errors

    def test_broken_array_is_a_data_error_with_position(self, tmp_path):
        path = tmp_path / "d.json"
        path.write_text('[\n {"prompt": "a", "completion": "b"},\n {"prompt": }\n]', encoding="utf-8")
        with pytest.raises(DataError, match=r"not valid JSON: .* line 3"):
            read_records(path)

    def test_array_with_invalid_utf8(self, tmp_path):
        path = tmp_path / "d.json"
        path.write_bytes(b'[\n{"prompt": "\xff", "completion": "b"}]')
        with pytest.raises(DataError, match="UTF-8 .*line 2"):
            read_records(path)

    def test_jsonl_whose_first_line_is_an_array(self, tmp_path):
        path = write_lines(tmp_path / "d.jsonl", ["[1]", json.dumps(conv(1))])
        records, errors = read_records(path)
        assert [r.line for r in records] == [2]
        assert [(e.line, e.reason) for e in errors] == [(1, "not_an_object")]

    def test_gzip(self, tmp_path):
        path = tmp_path / "d.jsonl.gz"
        path.write_bytes(gzip.compress((json.dumps(conv(1)) + "\n").encode()))
        records, errors = read_records(path)
        assert len(records) == 1 and not errors

    def test_utf16_with_bom_read_and_noted(self, tmp_path):
        path = tmp_path / "d.jsonl"
        path.write_bytes((json.dumps(conv(1)) + "\n").encode("utf-16"))
        source = read_source(path)
        assert len(source.records) == 1 and not source.errors
        assert source.notes == [
            "the file is UTF-16 LE (with a byte-order mark); it was read as such and converted to UTF-8"
        ]

    def test_missing_file(self, tmp_path):
        with pytest.raises(DataError, match="not found"):
            read_records(tmp_path / "nope.jsonl")


# --------------------------------------------------------------------------- prepare: cleaning


def noisy_dataset(tmp_path: Path) -> Path:
    lines = [json.dumps(conv(i)) for i in range(1, 31)]  # lines 1..30, all good
    lines += [
        '{"messages": [{"role": "user"',  # 31 malformed
        json.dumps(conv(1)),  # 32 exact duplicate of line 1
        json.dumps(
            {"messages": [{"role": "user", "content": "  QUESTION  number 2?"},
                          {"role": "assistant", "content": "answer number 2."}]}
        ),  # 33 duplicate of line 2 ignoring case and whitespace
        json.dumps({"messages": []}),  # 34 empty
        json.dumps({"instruction": "", "output": ""}),  # 35 empty
        json.dumps({"messages": [{"role": "user", "content": "hello?"}]}),  # 36 no assistant
        json.dumps({"messages": [{"role": "tool", "content": "{}"}]}),  # 37 tool result without a call
        json.dumps({"question": "q", "answer": "a"}),  # 38 unknown format
        json.dumps({"prompt": "q", "completion": 5}),  # 39 bad content
        json.dumps(conv(99, "x" * 500)),  # 40 too long (with max_chars)
        json.dumps({"conversations": [{"from": "human", "value": "sg"}, {"from": "gpt", "value": "sg answer"}]}),
        json.dumps({"instruction": "alp", "output": "alp answer"}),
        json.dumps({"prompt": "pc", "completion": "pc answer"}),
        json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                                 {"role": "user", "content": "unanswered"}]}),  # 44 trailing user
    ]
    return write_lines(tmp_path / "noisy.jsonl", lines)


class TestPrepareCleaning:
    def test_counts_and_errors(self, tmp_path):
        data = prepare_conversations(noisy_dataset(tmp_path), max_chars=300, max_bad_line_fraction=0.2)
        report = data.report
        assert isinstance(data, PreparedData)
        assert report["lines_read"] == 44
        assert report["malformed"] == 1
        assert report["dropped"] == {
            "bad_content": 1,
            "bad_tool_call": 1,
            "duplicate": 2,
            "empty": 2,
            "no_assistant_turn": 1,
            "too_long": 1,
            "unknown_format": 1,
        }
        assert report["adjusted"] == {"trailing_user_turn_dropped": 1}
        assert report["kept"] == 44 - 1 - 9 == 34
        assert report["train"] + report["eval"] == report["kept"]
        assert len(data.train) == report["train"] and len(data.eval) == report["eval"]
        assert [(e["line"], e["reason"]) for e in report["errors"]] == [
            (31, "invalid_json"),
            (36, "no_assistant_turn"),
            (37, "bad_tool_call"),
            (38, "unknown_format"),
            (39, "bad_content"),
        ]
        assert all(e["message"] for e in report["errors"])
        assert report["formats"] == {
            "alpaca": 2,
            "messages": 37,
            "prompt_completion": 2,
            "sharegpt": 1,
        }
        assert report["source"] == str(tmp_path / "noisy.jsonl")
        json.dumps(report)  # JSON-serialisable

    def test_items_are_message_dicts(self, tmp_path):
        data = prepare_conversations(noisy_dataset(tmp_path), max_bad_line_fraction=0.2)
        for item in data.train + data.eval:
            assert set(item) == {"line", "messages"}
            roles = [m["role"] for m in item["messages"]]
            assert set(roles) <= {"system", "user", "assistant"}
            assert roles[-1] == "assistant"

    def test_duplicates_keep_first_and_can_be_disabled(self, tmp_path):
        path = jsonl(tmp_path / "d.jsonl", [conv(1), conv(2), conv(1), conv(1)])
        data = prepare_conversations(path, eval_fraction=0)
        assert data.report["dropped"] == {"duplicate": 2}
        assert questions(data.train) == ["Question number 1?", "Question number 2?"]
        data = prepare_conversations(path, eval_fraction=0, dedupe=False)
        assert data.report["kept"] == 4 and "duplicate" not in data.report["dropped"]

    def test_different_system_prompt_is_not_a_duplicate(self, tmp_path):
        with_system = {"messages": [{"role": "system", "content": "S"}] + conv(1)["messages"]}
        data = prepare_conversations([conv(1), with_system], eval_fraction=0)
        assert data.report["kept"] == 2

    def test_max_chars_counts_all_content(self):
        records = [conv(1, "a" * 50), conv(2, "b" * 10)]
        data = prepare_conversations(records, eval_fraction=0, max_chars=40)
        assert data.report["dropped"] == {"too_long": 1}
        assert questions(data.train) == ["Question number 2?"]

    def test_system_prompt_added_only_where_missing(self):
        own = {"messages": [{"role": "system", "content": "Own"}] + conv(2)["messages"]}
        data = prepare_conversations([conv(1), own], eval_fraction=0, system_prompt="  Default  ")
        systems = [item["messages"][0] for item in data.train]
        assert systems == [{"role": "system", "content": "Default"}, {"role": "system", "content": "Own"}]
        assert data.report["adjusted"] == {"system_prompt_added": 1}

    def test_forced_format(self):
        records = [{"prompt": "q", "completion": "a"}, conv(1)]
        data = prepare_conversations(records, fmt="prompt_completion", eval_fraction=0, max_bad_line_fraction=1)
        assert data.report["kept"] == 1
        assert data.report["dropped"] == {"unknown_format": 1}
        assert data.report["formats"] == {"prompt_completion": 2}

    def test_in_memory_records_and_raw_records(self):
        data = prepare_conversations([conv(1), RawRecord(7, conv(2))], eval_fraction=0)
        assert data.report["source"] == "<records>"
        assert data.report["kept"] == 2

    def test_in_memory_non_objects_are_malformed(self):
        data = prepare_conversations([conv(i) for i in range(20)] + ["x"], eval_fraction=0)
        assert data.report["malformed"] == 1
        assert data.report["errors"][0] == {
            "line": 21,
            "reason": "not_an_object",
            "message": "expected a JSON object, got a string",
        }

    def test_errors_capped_at_twenty(self):
        records = [{"bad": i} for i in range(30)] + [conv(1)]
        data = prepare_conversations(records, max_bad_line_fraction=1.0, eval_fraction=0)
        assert data.report["dropped"]["unknown_format"] == 30
        assert len(data.report["errors"]) == 20
        assert data.report["errors"][0]["line"] == 1

    def test_json_array_input(self, tmp_path):
        path = tmp_path / "d.json"
        path.write_text(json.dumps([conv(1), conv(2), conv(3)]), encoding="utf-8")
        data = prepare_conversations(path, eval_fraction=0)
        assert data.report["kept"] == 3

    def test_stats(self):
        data = prepare_conversations([conv(1, "abc")], eval_fraction=0)
        stats = data.report["stats"]
        assert stats["turns"] == {"min": 2, "max": 2, "mean": 2}
        assert stats["chars"]["max"] == len("Question number 1?") + 3


# --------------------------------------------------------------------------- prepare: failures


class TestPrepareFailures:
    def test_threshold_message(self, tmp_path):
        lines = []
        for i in range(1, 101):
            if i in (3, 7) or i > 50:
                lines.append('{"messages": [{"role": "user" "content": "x"}]}')
            else:
                lines.append(json.dumps(conv(i)))
        path = write_lines(tmp_path / "d.jsonl", lines)
        with pytest.raises(DataError) as info:
            prepare_conversations(path)
        text = str(info.value)
        assert text.startswith("52 of 100 lines (52%) are malformed")
        assert "above the 10% limit (data.maxBadLineFraction)" in text
        assert "first errors: lines 3, 7, 51, 52, 53, … (52 lines): Expecting ',' delimiter" in text
        assert text.count("Expecting ',' delimiter") == 1  # one error, with the lines that have it
        assert "\n" not in text

    def test_unconvertible_records_count_towards_threshold(self):
        records = [conv(i) for i in range(8)] + [{"messages": [{"role": "narrator", "content": "x"}]}] * 2
        with pytest.raises(DataError, match=r"2 of 10 records \(20%\).*records 9, 10: messages\[1\]: unknown role"):
            prepare_conversations(records)
        data = prepare_conversations(records, max_bad_line_fraction=0.2)
        assert data.report["dropped"]["bad_role"] == 2

    def test_empty_and_duplicates_do_not_count_towards_threshold(self):
        records = [conv(1)] * 5 + [{"messages": []}] * 5
        data = prepare_conversations(records, max_bad_line_fraction=0.0)
        assert data.report["kept"] == 1

    def test_fractional_percentages(self):
        records = [conv(i) for i in range(7)] + ["x"]
        with pytest.raises(DataError, match=r"\(12\.5%\).*above the 5% limit"):
            prepare_conversations(records, max_bad_line_fraction=0.05)

    def test_nothing_kept(self):
        with pytest.raises(DataError, match="no usable conversations.*duplicate|no usable conversations.*empty"):
            prepare_conversations([{"messages": []}, {"messages": []}])

    def test_only_blank_lines(self, tmp_path):
        path = tmp_path / "d.jsonl"
        path.write_text("\n\n  \n", encoding="utf-8")
        with pytest.raises(DataError, match="no records"):
            prepare_conversations(path)

    @pytest.mark.parametrize(
        "kwargs",
        [
            {"eval_fraction": 1.0},
            {"eval_fraction": -0.1},
            {"max_bad_line_fraction": 1.5},
            {"max_chars": 0},
            {"fmt": "csv"},
        ],
    )
    def test_bad_arguments(self, kwargs):
        with pytest.raises(DataError):
            prepare_conversations([conv(1), conv(2)], **kwargs)


# --------------------------------------------------------------------------- prepare: split


class TestSplit:
    records = [conv(i) for i in range(200)]

    def test_same_seed_same_split(self):
        a = prepare_conversations(self.records, seed=1)
        b = prepare_conversations(list(self.records), seed=1)
        assert questions(a.eval) == questions(b.eval)
        assert questions(a.train) == questions(b.train)

    def test_fraction_roughly_respected_and_disjoint(self):
        data = prepare_conversations(self.records, eval_fraction=0.2)
        assert 20 <= len(data.eval) <= 60
        assert not set(questions(data.eval)) & set(questions(data.train))
        assert len(data.train) + len(data.eval) == 200

    def test_different_seed_different_split(self):
        a = prepare_conversations(self.records, seed=1)
        b = prepare_conversations(self.records, seed=2)
        assert questions(a.eval) != questions(b.eval)

    def test_appending_rows_keeps_existing_assignments(self):
        before = prepare_conversations(self.records, seed=5)
        after = prepare_conversations(self.records + [conv(i) for i in range(200, 400)], seed=5)
        old = {f"Question number {i}?" for i in range(200)}
        assert [q for q in questions(after.eval) if q in old] == questions(before.eval)
        assert [q for q in questions(after.train) if q in old] == questions(before.train)

    def test_order_within_splits_follows_input(self):
        data = prepare_conversations(self.records)
        numbers = [int(re.search(r"\d+", q).group()) for q in questions(data.train)]
        assert numbers == sorted(numbers)

    def test_split_ignores_case_and_system_prompt(self):
        a = prepare_conversations(self.records, seed=3)
        b = prepare_conversations(self.records, seed=3, system_prompt="Be helpful.")
        assert [item["messages"][1]["content"] for item in b.eval] == questions(a.eval)

    def test_zero_fraction_means_no_eval(self):
        data = prepare_conversations(self.records, eval_fraction=0)
        assert data.eval == [] and len(data.train) == 200

    @pytest.mark.parametrize("seed", range(5))
    def test_two_rows_give_one_eval_one_train(self, seed):
        data = prepare_conversations([conv(1), conv(2)], eval_fraction=0.01, seed=seed)
        assert (len(data.train), len(data.eval)) == (1, 1)

    def test_high_fraction_keeps_one_train(self):
        data = prepare_conversations([conv(1), conv(2), conv(3)], eval_fraction=0.999999)
        assert len(data.train) >= 1 and len(data.eval) >= 1

    def test_single_row_goes_to_train(self):
        data = prepare_conversations([conv(1)], eval_fraction=0.5)
        assert (len(data.train), len(data.eval)) == (1, 0)


# --------------------------------------------------------------------------- sources


class TestResolveSource:
    def test_local_path_and_file_uri(self, tmp_path):
        path = jsonl(tmp_path / "d.jsonl", [conv(1)])
        assert resolve_source(str(path), cache_dir=tmp_path) == path
        assert resolve_source(path.as_uri(), cache_dir=tmp_path) == path

    def test_pvc(self, tmp_path):
        target = tmp_path / "my-claim" / "data" / "chat.jsonl"
        target.parent.mkdir(parents=True)
        jsonl(target, [conv(1)])
        assert resolve_source("pvc://my-claim/data/chat.jsonl", pvc_root=tmp_path, cache_dir=tmp_path) == target

    def test_pvc_root_from_environment(self, tmp_path, monkeypatch):
        target = tmp_path / "c" / "x.jsonl"
        target.parent.mkdir()
        jsonl(target, [conv(1)])
        monkeypatch.setenv("CHATBOT_PVC_ROOT", str(tmp_path))
        assert resolve_source("pvc://c/x.jsonl", cache_dir=tmp_path) == target

    def test_pvc_missing_names_path_and_claim(self, tmp_path):
        with pytest.raises(DataError) as info:
            resolve_source("pvc://claim-a/missing.jsonl", pvc_root=tmp_path, cache_dir=tmp_path)
        text = str(info.value)
        assert str(tmp_path / "claim-a" / "missing.jsonl") in text
        assert "claim-a" in text and "mounted" in text

    @pytest.mark.parametrize("uri", ["pvc://claim", "pvc://claim/", "pvc:///x.jsonl", "pvc://c/../../etc/passwd"])
    def test_pvc_bad_uri(self, tmp_path, uri):
        with pytest.raises(DataError, match="pvc://"):
            resolve_source(uri, pvc_root=tmp_path, cache_dir=tmp_path)

    def test_missing_local_file(self, tmp_path):
        missing = tmp_path / "nope.jsonl"
        with pytest.raises(DataError, match=re.escape(str(missing)) + ".*check"):
            resolve_source(str(missing), cache_dir=tmp_path)

    def test_directory(self, tmp_path):
        with pytest.raises(DataError, match="is a directory"):
            resolve_source(str(tmp_path), cache_dir=tmp_path)

    def test_empty_file(self, tmp_path):
        path = tmp_path / "empty.jsonl"
        path.touch()
        with pytest.raises(DataError, match="is empty"):
            resolve_source(str(path), cache_dir=tmp_path)

    def test_unsupported_scheme(self, tmp_path):
        with pytest.raises(DataError, match="unsupported .*'gs'"):
            resolve_source("gs://bucket/x.jsonl", cache_dir=tmp_path)

    def test_blank(self, tmp_path):
        with pytest.raises(DataError):
            resolve_source("  ", cache_dir=tmp_path)

    def test_s3_without_boto3(self, tmp_path, monkeypatch):
        monkeypatch.setitem(sys.modules, "boto3", None)  # makes `import boto3` fail
        with pytest.raises(DataError, match="pip install boto3"):
            resolve_source("s3://bucket/key.jsonl", cache_dir=tmp_path)

    def test_s3_with_stub_client(self, tmp_path, monkeypatch):
        calls = []

        class Client:
            def download_file(self, bucket, key, filename):
                calls.append((bucket, key))
                Path(filename).write_text(json.dumps(conv(1)) + "\n", encoding="utf-8")

        class Boto3:
            @staticmethod
            def client(name):
                assert name == "s3"
                return Client()

        monkeypatch.setitem(sys.modules, "boto3", Boto3)
        path = resolve_source("s3://bucket/dir/key.jsonl", cache_dir=tmp_path / "cache")
        assert calls == [("bucket", "dir/key.jsonl")]
        assert path.parent == tmp_path / "cache" and path.name.endswith("key.jsonl")
        assert read_records(path)[0][0].data == conv(1)

    def test_s3_error_wrapped(self, tmp_path, monkeypatch):
        class Boto3:
            @staticmethod
            def client(name):
                class Client:
                    def download_file(self, *args):
                        raise RuntimeError("An error occurred (404) when calling HeadObject: Not Found")

                return Client()

        monkeypatch.setitem(sys.modules, "boto3", Boto3)
        with pytest.raises(DataError, match="not found: s3://bucket/k"):
            resolve_source("s3://bucket/k", cache_dir=tmp_path)
        assert [p.name for p in tmp_path.iterdir()] == []  # no temporary files left


@pytest.fixture(scope="module")
def http_server():
    files = {"/data/chat.jsonl": (json.dumps(conv(1)) + "\n" + json.dumps(conv(2)) + "\n").encode()}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server API)
            body = files.get(self.path.split("?", 1)[0])
            if body is None:
                self.send_error(404, "Not Found")
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class TestHttp:
    def test_download(self, http_server, tmp_path):
        cache = tmp_path / "cache"
        path = resolve_source(f"{http_server}/data/chat.jsonl?token=secret", cache_dir=cache)
        assert path.parent == cache and path.name.endswith("chat.jsonl")
        assert [p.name for p in cache.iterdir()] == [path.name]  # no temporary file left
        data = prepare_conversations(path, eval_fraction=0)
        assert data.report["kept"] == 2

    def test_download_again_replaces(self, http_server, tmp_path):
        first = resolve_source(f"{http_server}/data/chat.jsonl", cache_dir=tmp_path)
        second = resolve_source(f"{http_server}/data/chat.jsonl", cache_dir=tmp_path)
        assert first == second and len(list(tmp_path.iterdir())) == 1

    def test_http_error(self, http_server, tmp_path):
        with pytest.raises(DataError) as info:
            resolve_source(f"{http_server}/missing.jsonl?sig=abc123", cache_dir=tmp_path)
        text = str(info.value)
        assert "HTTP 404" in text and "/missing.jsonl" in text
        assert "abc123" not in text  # query strings may carry credentials
        assert list(tmp_path.iterdir()) == []

    def test_unreachable(self, tmp_path):
        import socket

        with socket.socket() as sock:  # a port with nothing listening
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        with pytest.raises(DataError, match="could not download"):
            resolve_source(f"http://127.0.0.1:{port}/x.jsonl", cache_dir=tmp_path, timeout=5)


# --------------------------------------------------------------------------- files


class TestJsonlFiles:
    def test_round_trip(self, tmp_path):
        items = [conv(1), {"messages": [{"role": "user", "content": "héllo \u2028 ✓"}]}]
        path = tmp_path / "sub" / "out.jsonl"
        assert write_jsonl(path, items) == 2
        assert load_jsonl(path) == items
        assert "héllo" in path.read_text(encoding="utf-8")  # not ASCII-escaped
        assert [p.name for p in path.parent.iterdir()] == ["out.jsonl"]

    def test_overwrite_and_empty(self, tmp_path):
        path = tmp_path / "out.jsonl"
        write_jsonl(path, [conv(1), conv(2)])
        write_jsonl(path, iter([]))
        assert load_jsonl(path) == []

    def test_failure_leaves_old_file(self, tmp_path):
        path = tmp_path / "out.jsonl"
        write_jsonl(path, [conv(1)])

        def items():
            yield conv(2)
            raise RuntimeError("boom")

        with pytest.raises(RuntimeError):
            write_jsonl(path, items())
        assert load_jsonl(path) == [conv(1)]
        assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]

    def test_load_reports_bad_line(self, tmp_path):
        path = write_lines(tmp_path / "x.jsonl", [json.dumps(conv(1)), "{oops"])
        with pytest.raises(DataError, match="line 2"):
            load_jsonl(path)

    def test_load_missing(self, tmp_path):
        with pytest.raises(DataError, match="not found"):
            load_jsonl(tmp_path / "missing.jsonl")


# --------------------------------------------------------------------------- bundled example


class TestBundledExample:
    def test_prepares_with_expected_noise(self):
        assert EXAMPLE.stat().st_size < 250_000
        data = prepare_conversations(EXAMPLE)
        report = data.report
        assert report["malformed"] == 3
        assert report["dropped"] == {"duplicate": 4, "empty": 3, "no_assistant_turn": 1}
        assert report["adjusted"] == {"trailing_user_turn_dropped": 1}
        assert 400 <= report["kept"] <= 600
        assert set(report["formats"]) == {"messages", "sharegpt", "alpaca", "prompt_completion"}
        assert report["formats"]["messages"] > report["kept"] / 2
        assert (report["malformed"] + 1) / report["lines_read"] < 0.02
        assert report["eval"] >= 1
        assert report["stats"]["chars"]["max"] <= 450
        assert any(item["messages"][0]["role"] == "system" for item in data.train)
        assert any(len(item["messages"]) >= 4 for item in data.train)

    def test_readme_examples_convert(self):
        text = (EXAMPLE.parent / "README.md").read_text(encoding="utf-8")
        blocks = re.findall(r"```json\n(.*?)\n```", text, re.S)
        assert len(blocks) == 6  # the four formats, then tool calling in messages and sharegpt
        for block in blocks:
            messages = to_messages(json.loads(block))
            assert messages[-1]["role"] == "assistant"
        openai_tools, sharegpt_tools = (convert_record(json.loads(b)) for b in blocks[4:])
        assert openai_tools.tools[0]["function"]["name"] == sharegpt_tools.tools[0]["function"]["name"] == "region_status"
        assert [m["role"] for m in openai_tools.messages] == [m["role"] for m in sharegpt_tools.messages] == [
            "user", "assistant", "tool", "assistant"]
        assert openai_tools.messages[1]["tool_calls"][0]["function"] == sharegpt_tools.messages[1]["tool_calls"][0]["function"]


def test_large_input_is_fast(tmp_path):
    import time

    path = jsonl(tmp_path / "big.jsonl", [conv(i) for i in range(20_000)])
    start = time.perf_counter()
    data = prepare_conversations(path)
    elapsed = time.perf_counter() - start
    assert data.report["kept"] == 20_000
    assert elapsed < 5.0


def test_tool_call_duplicates_are_found_on_content_whatever_the_format():
    from tool_data import openai_rows, sharegpt_rows, tool_conversations

    conversations = tool_conversations(50)
    repeats = len(conversations) - len({json.dumps(c, sort_keys=True) for c in conversations})
    assert repeats >= 4
    results = {}
    for name, rows in (("openai", openai_rows(conversations, seed=1)),
                       ("openai, other ids", openai_rows(conversations, seed=2)),
                       ("sharegpt", sharegpt_rows(conversations))):
        data = prepare_conversations(rows, eval_fraction=0.2)
        results[name] = (data.report["rows"]["not_used"]["duplicate"]["lines"],
                         [c["line"] for c in data.eval])
    assert len(results["sharegpt"][0]) == repeats
    assert results["openai"] == results["openai, other ids"] == results["sharegpt"]


def test_tool_results_paired_with_other_calls_are_not_duplicates():
    def row(first_result, second_result):
        return {"messages": [
            {"role": "user", "content": "Weather in Paris and Oslo?"},
            {"role": "assistant", "tool_calls": [
                {"id": "a", "type": "function", "function": {"name": "w", "arguments": '{"city": "Paris"}'}},
                {"id": "b", "type": "function", "function": {"name": "w", "arguments": '{"city": "Oslo"}'}}]},
            {"role": "tool", "tool_call_id": first_result, "content": "18"},
            {"role": "tool", "tool_call_id": second_result, "content": "-3"},
            {"role": "assistant", "content": "18 and -3."}]}

    in_order = row("a", "b")
    renamed = json.loads(json.dumps(in_order).replace('"a"', '"x1"').replace('"b"', '"x2"'))
    data = prepare_conversations([in_order, renamed, row("b", "a")], eval_fraction=0)
    assert data.report["rows"]["not_used"]["duplicate"]["lines"] == [2]
    assert data.report["kept"] == 2
