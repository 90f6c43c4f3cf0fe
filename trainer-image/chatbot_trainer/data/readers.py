"""Training data files → raw records: JSONL, JSON arrays, parquet, Arrow, ``save_to_disk``
folders and hub datasets.

Text files are JSONL (one JSON object per line) or a JSON array of objects, in UTF-8 (a BOM is
skipped) or UTF-16/UTF-32 (with or without a BOM; converted, and said so in the result);
gzip-compressed text is decompressed first. Each line (or array element) that is not a JSON
object becomes a :class:`LineError` located by its line number; files that are not JSON at all
get one clear :class:`DataError` instead of an error per line: CSV, legacy 8-bit encodings,
ZIP archives (spreadsheets), other binary data.

Parquet and Arrow files are read with pyarrow; folders written by ``datasets``'
``save_to_disk`` and ``hf://datasets/<id>`` with the ``datasets`` library (imported only for
those). Their records are numbered as rows from 1.
"""

from __future__ import annotations

import contextlib
import gc
import gzip
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

__all__ = [
    "CSV_MESSAGE",
    "DataError",
    "LineError",
    "RawRecord",
    "SourceRecords",
    "gc_paused",
    "json_kind",
    "parse_hub_uri",
    "read_records",
    "read_source",
]

CSV_MESSAGE = (
    "CSV is not supported; convert to JSONL with one conversation per line "
    "(see examples/data/README.md)"
)
HUB_PREFIX = "hf://datasets/"
_ARROW_BATCH = 4096
_CSV_SUFFIXES = (".csv", ".tsv")
_SAVE_TO_DISK_MARKERS = ("state.json", "dataset_dict.json")


class DataError(Exception):
    """A problem with the training data, explained in one line for the spec's author."""


@dataclass(slots=True)
class RawRecord:
    """One parsed JSON value and where it came from (1-based line, record or row)."""

    line: int
    data: Any
    unit: str = "line"


@dataclass(slots=True)
class LineError:
    """A line (or array element, or row) that could not be read as a JSON object."""

    line: int
    message: str
    reason: str = "invalid_json"
    unit: str = "line"


@dataclass
class SourceRecords:
    """What a source held: records, per-line errors, how they are numbered, how it was read."""

    records: list[RawRecord]
    errors: list[LineError]
    unit: str = "line"
    reader: str = "jsonl"
    notes: list[str] = field(default_factory=list)


@contextlib.contextmanager
def gc_paused():
    """Pause the cyclic garbage collector while building many small containers.

    Parsing creates millions of dicts and lists that are all kept; the collector's repeated
    passes over them cost about a quarter of the run time and free nothing.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def read_records(path: str | os.PathLike[str]) -> tuple[list[RawRecord], list[LineError]]:
    """Records and per-line errors of a source (see :func:`read_source`)."""
    source = read_source(path)
    return source.records, source.errors


def read_source(source: str | os.PathLike[str]) -> SourceRecords:
    """Read a local file or folder, or an ``hf://datasets/<id>`` URI, into records."""
    if isinstance(source, str) and source.startswith(HUB_PREFIX):
        return _read_hub(source)
    path = Path(source)
    if path.is_dir():
        return _read_saved_dataset(path)
    data = _read_bytes(path)
    if data[:4] == b"GGUF":
        raise DataError(
            f"training data {path} is a GGUF model file, not chat data: give a model as modelType; "
            "trainingData takes a JSONL, JSON, parquet or Arrow file of conversations"
        )
    if data[:4] == b"PAR1":
        return _read_parquet(path)
    if path.suffix.lower() == ".arrow" or data[:6] == b"ARROW1":
        return _read_arrow_file(path)
    data, notes = _as_utf8(path, data)
    with gc_paused():
        result = None
        if data.lstrip()[:1] == b"[":
            result = _read_array(path, data)
        if result is None:
            result = _read_jsonl(path, data)
    result.notes += notes
    return result


# --------------------------------------------------------------------------- text files


def json_kind(value: Any) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return "a number"


def _read_bytes(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise DataError(f"training data not found: {path}") from exc
    except IsADirectoryError as exc:
        raise DataError(f"training data {path} is a directory") from exc
    except OSError as exc:
        raise DataError(f"cannot read training data {path}: {exc.strerror or exc}") from exc
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise DataError(f"training data {path} looks gzip-compressed but is damaged") from exc
    return data


_BOMS = (  # longest first: the UTF-32 LE BOM starts with the UTF-16 LE one
    (b"\xff\xfe\x00\x00", "utf-32-le", "UTF-32 LE"),
    (b"\x00\x00\xfe\xff", "utf-32-be", "UTF-32 BE"),
    (b"\xff\xfe", "utf-16-le", "UTF-16 LE"),
    (b"\xfe\xff", "utf-16-be", "UTF-16 BE"),
)


def _wide_encoding(sample: bytes) -> tuple[str, str] | None:
    """UTF-16/UTF-32 without a BOM, told apart by where the zero bytes of ASCII text fall."""
    n = len(sample) - len(sample) % 4
    if n < 8:
        return None
    zeros = [sample[i:n:4].count(0) / (n // 4) for i in range(4)]
    if zeros[2] > 0.9 and zeros[3] > 0.9 and zeros[0] < 0.5:
        return "utf-32-le", "UTF-32 LE"
    if zeros[0] > 0.9 and zeros[1] > 0.9 and zeros[3] < 0.5:
        return "utf-32-be", "UTF-32 BE"
    # UTF-16: the high byte of every ASCII character is zero, and little else is.
    odd, even = (zeros[1] + zeros[3]) / 2, (zeros[0] + zeros[2]) / 2
    if odd > 0.1 and odd > 4 * even:
        return "utf-16-le", "UTF-16 LE"
    if even > 0.1 and even > 4 * odd:
        return "utf-16-be", "UTF-16 BE"
    return None


def _as_utf8(path: Path, data: bytes) -> tuple[bytes, list[str]]:
    """The file's bytes as UTF-8 without a BOM, and a note when they were converted."""
    if data[:3] == b"\xef\xbb\xbf":
        return data[3:], []
    found = next(((codec, name, len(bom)) for bom, codec, name in _BOMS if data.startswith(bom)), None)
    if found is None:
        sample = data[:4096]
        if sample[:4] == b"PK\x03\x04":
            raise DataError(
                f"training data {path} is a ZIP archive (an Excel workbook?); export it as "
                "JSONL with one conversation per line (see examples/data/README.md)"
            )
        if b"\x00" not in sample:
            return data, []
        wide = _wide_encoding(sample)
        if wide is None:
            raise DataError(
                f"training data {path} is not a text file: it holds NUL bytes (0x00), as binary "
                "files (models, archives, images) do; give a JSONL, JSON, parquet or Arrow file"
            )
        found = (*wide, 0)
        how = "without a byte-order mark"
    else:
        how = "with a byte-order mark"
    codec, name, skip = found
    try:
        text = data[skip:].decode(codec)
    except UnicodeDecodeError as exc:
        raise DataError(
            f"training data {path} looks {name}-encoded ({how}) but byte {exc.start + skip} "
            "cannot be decoded; save it as UTF-8"
        ) from exc
    return text.encode("utf-8"), [f"the file is {name} ({how}); it was read as such and converted to UTF-8"]


def _looks_like_csv(first_line: str) -> bool:
    line = first_line.strip()
    return bool(line) and line[0] not in "{[" and any(sep in line for sep in (",", "\t", ";"))


def _first_line(data: bytes) -> str:
    for raw in data.split(b"\n", 20)[:20]:
        if raw.strip():
            return raw.decode("utf-8", "replace")
    return ""


def json_error(exc: json.JSONDecodeError, *, with_line: bool = False) -> str:
    """"Expecting value at column 5"; json's own messages may already end in "at"
    ("Unterminated string starting at")."""
    where = f"line {exc.lineno} column {exc.colno}" if with_line else f"column {exc.colno}"
    message = exc.msg.removesuffix(" at")
    return f"{message} at {where}"


def _not_utf8_message(line: bytes, start: int) -> str:
    try:
        line.decode("cp1252")
        guess = "; it may be Windows-1252/Latin-1 text"
    except UnicodeDecodeError:
        guess = ""
    return f"not valid UTF-8 (byte 0x{line[start]:02x} at column {start + 1}{guess}): save the file as UTF-8"


def _read_array(path: Path, data: bytes) -> SourceRecords | None:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(
            f"training data {path} is not valid UTF-8 (line {line}, byte 0x{data[exc.start]:02x}); "
            "save it as UTF-8"
        ) from exc
    try:
        values = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # a JSONL file whose first line is an array
            return None
        raise DataError(
            f"training data {path} is not valid JSON: {json_error(exc, with_line=True)}"
        ) from exc
    records, errors = records_of_values(values)
    return SourceRecords(records, errors, "record", "json_array")


def records_of_values(values: Iterable[Any]) -> tuple[list[RawRecord], list[LineError]]:
    """Parsed values → records numbered from 1 (RawRecords pass through; non-objects are errors)."""
    records: list[RawRecord] = []
    errors: list[LineError] = []
    for index, value in enumerate(values, 1):
        if isinstance(value, RawRecord):
            records.append(value)
        elif isinstance(value, dict):
            records.append(RawRecord(index, value, "record"))
        else:
            errors.append(
                LineError(
                    index, f"expected a JSON object, got {json_kind(value)}", "not_an_object",
                    "record",
                )
            )
    return records, errors


def _read_jsonl(path: Path, data: bytes) -> SourceRecords:
    if path.suffix.lower() in _CSV_SUFFIXES and data.lstrip()[:1] not in (b"{", b"["):
        raise DataError(f"training data {path}: {CSV_MESSAGE}")
    records: list[RawRecord] = []
    errors: list[LineError] = []
    try:
        lines: list[str] | list[bytes] = data.decode("utf-8").split("\n")
        decoded = True
    except UnicodeDecodeError:
        lines = data.split(b"\n")
        decoded = False
    loads = json.loads
    not_utf8 = 0
    for number, line in enumerate(lines, 1):
        if not decoded:
            try:
                line = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                if not line.strip():
                    continue
                not_utf8 += 1
                errors.append(LineError(number, _not_utf8_message(line, exc.start), "invalid_utf8"))
                continue
        if not line or line.isspace():
            continue
        try:
            value = loads(line)
        except json.JSONDecodeError as exc:
            message = json_error(exc)
            if line.strip() in _OPENERS:
                message += f" (a line holding only {line.strip()!r}: {PRETTY_HINT})"
            errors.append(LineError(number, message, "invalid_json"))
            continue
        except RecursionError:
            errors.append(LineError(number, "JSON nested too deeply", "invalid_json"))
            continue
        if type(value) is dict:
            records.append(RawRecord(number, value))
        else:
            errors.append(
                LineError(
                    number, f"expected a JSON object, got {json_kind(value)}", "not_an_object"
                )
            )
    if errors and len(errors) >= len(records):
        _explain_unreadable(path, data, errors, not_utf8)
    return SourceRecords(records, errors)


_OPENERS = ("{", "[")
PRETTY_HINT = (
    "JSON objects spread over several lines (pretty-printed JSON?); JSONL needs each "
    "conversation on one line: convert with jq -c '.' in.json > out.jsonl (or jq -c '.[]' for "
    "an array), or give the file as one JSON array"
)


def _looks_pretty_printed(data: bytes) -> bool:
    """Whether the text is JSON values written over several lines each (indented objects one
    after another, as json.dump(indent=2) or jq without -c writes them)."""
    first = _first_line(data).strip()
    if first in _OPENERS:
        return True
    if not first.startswith("{"):
        return False
    try:
        text = data[:1 << 20].decode("utf-8")
        value, end = json.JSONDecoder().raw_decode(text, len(text) - len(text.lstrip()))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return False
    return isinstance(value, dict) and "\n" in text[:end].strip()


def _explain_unreadable(path: Path, data: bytes, errors: list[LineError], not_utf8: int) -> None:
    """One clear error for files that are not JSONL at all (CSV, pretty-printed JSON, another
    text encoding)."""
    if errors[0].reason == "invalid_json" and _looks_like_csv(_first_line(data)):
        raise DataError(f"training data {path}: {CSV_MESSAGE}")
    if errors[0].reason == "invalid_json" and _looks_pretty_printed(data):
        raise DataError(f"training data {path} looks like pretty-printed JSON: {PRETTY_HINT}")
    if not_utf8 * 2 >= len(errors):
        first = next(e for e in errors if e.reason == "invalid_utf8")
        raise DataError(
            f"training data {path} is not UTF-8: {not_utf8} lines hold bytes that are not valid "
            f"UTF-8 (first: line {first.line}, {first.message.split(':')[0]}); save it as UTF-8, "
            "e.g. iconv -f cp1252 -t utf-8 in.jsonl > out.jsonl"
        )


# --------------------------------------------------------------------------- columnar data


def _rows(batches: Iterable[Any], start: int = 1) -> tuple[list[RawRecord], list[LineError]]:
    """Arrow record batches → records numbered as rows; null columns are left out.

    Nested columns are read as the JSON they came from, not as Arrow's unified schema: a
    struct column holds every key that any row has (a table of tool definitions gives each
    tool the properties of all the others, as nulls), so null struct fields are left out, at
    every depth; Arrow stores a missing key and a null the same way there. Nulls that Arrow
    keeps apart from missing keys stay: list elements and map values. JSON columns (the
    ``arrow.json`` type that ``datasets``' ``Json`` feature writes) are parsed per row,
    without any unification, so their nulls all stay.
    """
    records: list[RawRecord] = []
    errors: list[LineError] = []
    number = start - 1
    with gc_paused():
        for batch in batches:
            readers = {field.name: _value_reader(field.type) for field in batch.schema}
            for row in batch.to_pylist():
                number += 1
                if isinstance(row, dict):
                    data = {}
                    for key, value in row.items():
                        if value is None:
                            continue
                        read = readers.get(key)
                        data[key] = value if read is None else read(value)
                    records.append(RawRecord(number, data, "row"))
                else:
                    errors.append(LineError(number, "expected a row of columns", "not_an_object", "row"))
    return records, errors


def _value_reader(arrow_type: Any) -> Any:
    """A function turning a value of this Arrow type into plain JSON, or None where
    ``to_pylist``'s value already is (no struct or JSON type inside)."""
    import pyarrow as pa

    extension = getattr(arrow_type, "extension_name", None)
    if extension == "arrow.json":
        return _parse_json_value
    if extension is not None and hasattr(arrow_type, "storage_type"):
        return _value_reader(arrow_type.storage_type)
    if pa.types.is_struct(arrow_type):
        fields = [(arrow_type.field(i).name, _value_reader(arrow_type.field(i).type))
                  for i in range(arrow_type.num_fields)]

        def read_struct(value: dict[str, Any]) -> dict[str, Any]:
            out = {}
            for name, read in fields:
                item = value.get(name)
                if item is not None:
                    out[name] = item if read is None else read(item)
            return out

        return read_struct
    if pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type) or pa.types.is_fixed_size_list(arrow_type) \
            or pa.types.is_list_view(arrow_type) or pa.types.is_large_list_view(arrow_type):
        read_item = _value_reader(arrow_type.value_type)
        if read_item is None:
            return None
        return lambda value: [None if item is None else read_item(item) for item in value]
    if pa.types.is_map(arrow_type):
        read_item = _value_reader(arrow_type.item_type)
        return lambda value: {
            key: item if item is None or read_item is None else read_item(item) for key, item in value
        }
    return None


def _parse_json_value(value: Any) -> Any:
    if not isinstance(value, (str, bytes)):
        return value
    try:
        return json.loads(value)
    except (json.JSONDecodeError, RecursionError):
        return value  # left as text: the format checks say what is wrong with it


def _pyarrow(path: Path, what: str):
    try:
        import pyarrow as pa  # installed with datasets: the `data` extra (in the trainer image)
    except ImportError as exc:
        raise DataError(f"reading {what} {path} needs pyarrow: pip install 'chatbot-training[data]'") from exc
    return pa


def _read_parquet(path: Path) -> SourceRecords:
    _pyarrow(path, "the parquet file")
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
        records, errors = _rows(parquet.iter_batches(batch_size=_ARROW_BATCH))
    except (OSError, ValueError) as exc:  # pyarrow.ArrowException derives from these
        raise DataError(f"cannot read the parquet file {path}: {exc}") from exc
    return SourceRecords(records, errors, "row", "parquet")


def _read_arrow_file(path: Path) -> SourceRecords:
    pa = _pyarrow(path, "the Arrow file")
    import pyarrow.ipc  # noqa: F401  (makes pa.ipc available)

    try:
        with pa.memory_map(str(path)) as source:
            try:
                table = pa.ipc.open_file(source).read_all()
            except pa.ArrowInvalid:
                source.seek(0)
                table = pa.ipc.open_stream(source).read_all()  # what save_to_disk writes
        records, errors = _rows(table.to_batches(_ARROW_BATCH))
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read the Arrow file {path}: {exc}") from exc
    return SourceRecords(records, errors, "row", "arrow")


def _datasets(what: str):
    try:
        import datasets
    except ImportError as exc:
        raise DataError(f"reading {what} needs the datasets library: pip install 'chatbot-training[data]'") from exc
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    return datasets


def _one_split(dataset: Any, shown: str) -> tuple[Any, list[str]]:
    """A Dataset, or the train split (or only split) of a DatasetDict, and a note saying which."""
    if not hasattr(dataset, "keys"):
        return dataset, []
    splits = list(dataset.keys())
    if "train" in splits:
        name = "train"
    elif len(splits) == 1:
        name = splits[0]
    else:
        raise DataError(
            f"{shown} holds the splits {', '.join(splits)} and none is called train; save the "
            "split to train on by itself"
        )
    notes = [f"split {name!r} of {', '.join(splits)} was read"] if len(splits) > 1 else []
    return dataset[name], notes


def _dataset_rows(dataset: Any) -> Iterator[Any]:
    return dataset.with_format("arrow").iter(batch_size=_ARROW_BATCH)


def _read_saved_dataset(path: Path) -> SourceRecords:
    if not any((path / marker).is_file() for marker in _SAVE_TO_DISK_MARKERS):
        raise DataError(
            f"training data {path} is a directory but not one written by datasets' "
            "save_to_disk (no state.json or dataset_dict.json); point trainingData at a "
            ".jsonl, .json or .parquet file"
        )
    datasets = _datasets(f"the saved dataset {path}")
    try:
        dataset, notes = _one_split(datasets.load_from_disk(str(path)), str(path))
        records, errors = _rows(_dataset_rows(dataset))
    except DataError:
        raise
    except Exception as exc:  # datasets raises many types for damaged folders
        raise DataError(f"cannot read the saved dataset {path}: {type(exc).__name__}: {exc}") from exc
    return SourceRecords(records, errors, "row", "save_to_disk", notes)


def parse_hub_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``hf://datasets/<owner>/<name>[@<revision>][/<file in the repo>]`` → (id, revision, file)."""
    rest = uri[len(HUB_PREFIX):].strip("/")
    parts = rest.split("/")
    if len(parts) < 2 or not all(parts[:2]):
        raise DataError(f"bad URI {uri!r}: expected hf://datasets/<owner>/<name>[@<revision>][/<file>]")
    name, _, revision = parts[1].partition("@")
    data_file = "/".join(parts[2:]) or None
    return f"{parts[0]}/{name}", revision or None, data_file


def _read_hub(uri: str) -> SourceRecords:
    repo_id, revision, data_file = parse_hub_uri(uri)
    datasets = _datasets(uri)
    try:
        loaded = datasets.load_dataset(
            repo_id, revision=revision, data_files=data_file, split=None
        )
        dataset, notes = _one_split(loaded, uri)
        records, errors = _rows(_dataset_rows(dataset))
    except DataError:
        raise
    except Exception as exc:  # hub, network and format errors come in many types
        offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
        hint = (
            "HF_HUB_OFFLINE is set and the data set is not in the local cache"
            if offline
            else "check the id, network access to the hub, and HF_TOKEN for private or gated "
            "data sets (spec.envFromSecret)"
        )
        raise DataError(f"cannot load {uri}: {type(exc).__name__}: {exc}; {hint}") from exc
    return SourceRecords(records, errors, "row", "hub", notes)
