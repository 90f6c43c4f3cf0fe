"""Columnar sources: parquet and Arrow files, datasets' save_to_disk folders, hf://datasets/ ids."""

from __future__ import annotations

import json
import re

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from chatbot_api.spec import DATA_URI
from chatbot_trainer.data.dataset import (
    DataError,
    prepare_conversations,
    read_source,
    resolve_source,
)
from chatbot_trainer.data.readers import parse_hub_uri

ROWS = [
    {"messages": [{"role": "user", "content": "Question 1?"}, {"role": "assistant", "content": "Answer 1."}]},
    {"messages": [{"role": "user", "content": "Question 2?"}, {"role": "assistant", "content": "Answer 2."}]},
    {"messages": [{"role": "user", "content": "Question 1?"}, {"role": "assistant", "content": "Answer 1."}]},
]
GLAIVE_ROWS = [  # LLaMA-Factory's tool-calling layout; "tools" empty where a row has none
    {"conversations": [{"from": "human", "value": "Weather in Paris?"},
                       {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Paris"}}'},
                       {"from": "observation", "value": '{"temp_c": 18}'},
                       {"from": "gpt", "value": "It is 18 °C."}],
     "tools": json.dumps([{"name": "get_weather", "parameters": {"type": "object"}}])},
    {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}], "tools": ""},
]


def test_parquet(tmp_path):
    path = tmp_path / "chats.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    data = prepare_conversations(path, eval_fraction=0)
    report = data.report
    assert (report["reader"], report["unit"], report["kept"]) == ("parquet", "row", 2)
    assert report["rows"]["not_used"]["duplicate"]["lines"] == [3]
    assert [item["line"] for item in data.train] == [1, 2]


def test_parquet_with_tool_calls_and_null_columns(tmp_path):
    path = tmp_path / "glaive.parquet"
    alpaca = {"instruction": "Say hi", "output": "Hi"}
    columns = [*GLAIVE_ROWS[0], *alpaca]  # one table, so each row has nulls in the others' columns
    rows = [{name: row.get(name) for name in columns} for row in [*GLAIVE_ROWS, alpaca]]
    pq.write_table(pa.Table.from_pylist(rows), path)
    data = prepare_conversations(path, eval_fraction=0)
    assert data.report["formats"] == {"alpaca": 1, "sharegpt": 2}
    assert data.report["tools"] == {"conversations": 1, "lines": [1], "define_only": 0, "define_only_lines": []}
    assert data.train[0]["tools"][0]["function"]["name"] == "get_weather"
    assert data.train[0]["messages"][1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}


def test_parquet_named_otherwise_is_recognised_by_its_magic(tmp_path):
    path = tmp_path / "chats.data"
    pq.write_table(pa.Table.from_pylist(ROWS[:2]), path)
    assert read_source(path).reader == "parquet"


def test_damaged_parquet(tmp_path):
    path = tmp_path / "chats.parquet"
    path.write_bytes(b"PAR1" + b"\x01" * 100)
    with pytest.raises(DataError, match="cannot read the parquet file"):
        read_source(path)


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "one"))
    assert resolve_source(str(tmp_path / "one")) == tmp_path / "one"
    data = prepare_conversations(tmp_path / "one", eval_fraction=0)
    assert (data.report["reader"], data.report["kept"]) == ("save_to_disk", 2)

    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:2]),
                                   "test": datasets.Dataset.from_list(ROWS[2:])})
    splits.save_to_disk(str(tmp_path / "dict"))
    data = prepare_conversations(str(tmp_path / "dict"), eval_fraction=0)
    assert data.report["kept"] == 2
    assert data.report["notes"] == ["split 'train' of train, test was read"]


def test_dataset_dict_without_train_split(tmp_path):
    splits = datasets.DatasetDict({"a": datasets.Dataset.from_list(ROWS), "b": datasets.Dataset.from_list(ROWS)})
    splits.save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(DataError, match="splits a, b and none is called train"):
        read_source(tmp_path / "dict")


def test_arrow_file_written_by_datasets(tmp_path):
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    (arrow,) = (tmp_path / "saved").glob("*.arrow")
    source = read_source(arrow)
    assert (source.reader, len(source.records)) == ("arrow", 3)


def test_other_directories_are_refused_clearly(tmp_path):
    (tmp_path / "chats").mkdir()
    (tmp_path / "chats" / "a.jsonl").write_text("{}\n")
    with pytest.raises(DataError, match="save_to_disk"):
        resolve_source(str(tmp_path / "chats"))


@pytest.mark.parametrize(
    ("uri", "parsed"),
    [
        ("hf://datasets/acme/support-chats", ("acme/support-chats", None, None)),
        ("hf://datasets/acme/support-chats@v2", ("acme/support-chats", "v2", None)),
        ("hf://datasets/acme/support-chats/data/train.jsonl", ("acme/support-chats", None, "data/train.jsonl")),
    ],
)
def test_hub_uri(uri, parsed):
    assert parse_hub_uri(uri) == parsed
    assert resolve_source(uri) == uri
    assert re.search(DATA_URI, uri), "the spec accepts it as trainingData"


def test_bad_hub_uri():
    with pytest.raises(DataError, match="expected hf://datasets/<owner>/<name>"):
        resolve_source("hf://datasets/only-a-name")
    for uri in ("hf://datasets/only-a-name", "hf://models/acme/x", "hf://datasets/a/b@"):
        assert not re.search(DATA_URI, uri), uri


def test_hub_dataset_is_loaded_through_datasets(monkeypatch):
    calls = []

    def load_dataset(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return datasets.DatasetDict({"train": datasets.Dataset.from_list(GLAIVE_ROWS)})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    data = prepare_conversations("hf://datasets/acme/tool-chats@main", eval_fraction=0)
    assert calls == [("acme/tool-chats", {"revision": "main", "data_files": None, "split": None})]
    assert (data.report["reader"], data.report["kept"]) == ("hub", 2)


def test_unreachable_hub_says_what_to_check(monkeypatch):
    def load_dataset(repo_id, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="cannot load hf://datasets/acme/x: ConnectionError: offline; HF_HUB_OFFLINE"):
        read_source("hf://datasets/acme/x")


# --------------------------------------------------------------------------- nested columns

def _prepared(source):
    data = prepare_conversations(source, eval_fraction=0.2)
    report = {k: v for k, v in data.report.items() if k not in ("source", "reader", "unit")}
    return data.train, data.eval, report


@pytest.mark.parametrize("arguments", ["text", "object"])
def test_tool_rows_read_from_parquet_and_save_to_disk_equal_jsonl(tmp_path, arguments):
    from tool_data import openai_rows, tool_conversations, write_jsonl

    rows = openai_rows(tool_conversations(50), arguments=arguments)
    write_jsonl(tmp_path / "tools.jsonl", rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "tools.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "datasets.parquet"))
    table = pq.read_table(tmp_path / "tools.parquet")
    assert "movie_id" in str(table.schema.field("tools").type), "Arrow unified the tool schemas"

    expected = _prepared(tmp_path / "tools.jsonl")
    assert expected[2]["tools"]["conversations"] > 20
    for source in ("tools.parquet", "saved", "datasets.parquet"):
        assert _prepared(tmp_path / source) == expected, source
    recipes = next(t for row in expected[0] for t in row.get("tools", [])
                   if t["function"]["name"] == "search_recipes")
    assert set(recipes["function"]["parameters"]["properties"]) == {"ingredients", "diet"}


def test_hub_tool_rows_equal_jsonl(tmp_path, monkeypatch):
    from tool_data import openai_rows, tool_conversations, write_jsonl

    rows = openai_rows(tool_conversations(30))
    write_jsonl(tmp_path / "tools.jsonl", rows)
    monkeypatch.setattr(datasets, "load_dataset", lambda repo_id, **kwargs: datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows)}))
    assert _prepared("hf://datasets/acme/tools") == _prepared(tmp_path / "tools.jsonl")


def test_nulls_arrow_keeps_apart_from_missing_keys_survive(tmp_path):
    rows = [{"a": {"x": 1, "list": [1, None]}, "j": {"n": None, "deep": [{"k": None}]}},
            {"a": {"y": 2}, "j": {"other": 1}}]
    features = datasets.Features({"a": {"x": datasets.Value("int64"), "y": datasets.Value("int64"),
                                        "list": datasets.List(datasets.Value("int64"))},
                                  "j": datasets.Json()})
    datasets.Dataset.from_list(rows, features=features).save_to_disk(str(tmp_path / "saved"))
    read = [record.data for record in read_source(tmp_path / "saved").records]
    assert read == [{"a": {"x": 1, "list": [1, None]}, "j": {"n": None, "deep": [{"k": None}]}},
                    {"a": {"y": 2}, "j": {"other": 1}}]

    table = pa.table({"m": pa.array([[("k", None), ("l", "v")]], pa.map_(pa.string(), pa.string()))})
    pq.write_table(table, tmp_path / "map.parquet")
    assert read_source(tmp_path / "map.parquet").records[0].data == {"m": {"k": None, "l": "v"}}
