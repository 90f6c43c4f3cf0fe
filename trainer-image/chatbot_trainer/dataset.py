"""Training data for the prepare step: fetch, parse, clean, de-duplicate, split and report.

The flow is ``resolve_source`` (URI → local file) → ``read_records`` (JSONL or JSON array →
raw records plus per-line errors) → ``prepare_conversations`` (format conversion, cleaning,
de-duplication, deterministic train/eval split and a JSON-serialisable report).

Errors meant for the person who wrote the ChatbotTraining spec are raised as
:class:`DataError` with a one-line message saying what is wrong and what to check.
"""

from __future__ import annotations

import contextlib
import gc
import gzip
import hashlib
import json
import os
import re
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .formats import FORMATS, FormatError, convert_record, detect_format, normalise_text

__all__ = [
    "DataError",
    "LineError",
    "PreparedData",
    "RawRecord",
    "load_jsonl",
    "prepare_conversations",
    "read_records",
    "resolve_source",
    "write_jsonl",
]

DEFAULT_PVC_ROOT = "/mnt/pvc"
MAX_REPORTED_ERRORS = 20
_ERRORS_IN_MESSAGE = 3
_DOWNLOAD_CHUNK = 1 << 20


class DataError(Exception):
    """A problem with the training data, explained in one line for the spec's author."""


@dataclass(slots=True)
class RawRecord:
    """One parsed JSON value and where it came from (1-based line, or record index)."""

    line: int
    data: Any
    unit: str = "line"


@dataclass(slots=True)
class LineError:
    """A line (or array element) that could not be read as a JSON object."""

    line: int
    message: str
    reason: str = "invalid_json"
    unit: str = "line"


@dataclass
class PreparedData:
    """Cleaned conversations split into train and eval, plus the data report."""

    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    report: dict[str, Any] = field(default_factory=dict)


@contextlib.contextmanager
def _gc_paused():
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


# --------------------------------------------------------------------------- sources


def _default_pvc_root() -> str:
    return os.environ.get("CHATBOT_PVC_ROOT", DEFAULT_PVC_ROOT)


def _redact(uri: str) -> str:
    """URI without credentials or query string (pre-signed URLs carry tokens there)."""
    try:
        parts = urllib.parse.urlsplit(uri)
    except ValueError:
        return uri
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    query = "?…" if parts.query else ""
    return f"{parts.scheme}://{host}{parts.path}{query}"


def _cache_name(uri: str, path_part: str) -> str:
    digest = hashlib.sha256(uri.encode("utf-8")).hexdigest()[:12]
    base = os.path.basename(urllib.parse.unquote(path_part.rstrip("/"))) or "data"
    base = re.sub(r"[^A-Za-z0-9._-]", "_", base)[:80]
    return f"{digest}-{base}"


def _check_file(path: Path, shown: str, hint: str) -> Path:
    if not path.exists():
        raise DataError(f"training data not found: {shown}; {hint}")
    if path.is_dir():
        raise DataError(
            f"training data {shown} is a directory; point trainingData at a .jsonl or .json file"
        )
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise DataError(f"cannot read training data {shown}: {exc.strerror or exc}") from exc
    if size == 0:
        raise DataError(f"training data {shown} is empty")
    return path


def pvc_path(uri: str, pvc_root: str | os.PathLike[str] | None = None) -> Path:
    """``pvc://<claim>/<path>`` → ``<pvc_root>/<claim>/<path>``, where the Job mounts claims."""
    root = Path(pvc_root if pvc_root is not None else _default_pvc_root())
    claim, _, inner = uri[len("pvc://"):].partition("/")
    inner = inner.strip("/")
    if not claim or not inner:
        raise DataError(f"bad URI {uri!r}: expected pvc://<claim>/<path>")
    norm = os.path.normpath(inner)
    if norm == ".." or norm.startswith("../") or os.path.isabs(norm):
        raise DataError(f"bad URI {uri!r}: the path must stay inside the claim")
    return root / claim / norm


def resolve_source(
    uri: str,
    *,
    pvc_root: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    timeout: float = 60.0,
) -> Path:
    """Turn a ``trainingData`` value into a readable local file.

    * a local path or ``file://`` URI is used as is;
    * ``pvc://<claim>/<path>`` maps to ``<pvc_root>/<claim>/<path>``, where the Job mounts
      claims (``pvc_root`` defaults to ``$CHATBOT_PVC_ROOT`` or ``/mnt/pvc``);
    * ``http://`` / ``https://`` is downloaded into ``cache_dir``;
    * ``s3://bucket/key`` is downloaded into ``cache_dir`` with boto3.

    Raises :class:`DataError` when the file is missing, a directory, empty, or cannot be
    downloaded.
    """
    uri = uri.strip()
    if not uri:
        raise DataError("trainingData is empty; give a path, pvc://, https:// or s3:// URI")
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""

    if scheme == "pvc":
        path = pvc_path(uri, pvc_root)
        root = Path(pvc_root if pvc_root is not None else _default_pvc_root())
        claim, *inner = path.relative_to(root).parts
        norm = "/".join(inner)
        return _check_file(
            path,
            f"{path} (from {uri})",
            f"check that the PersistentVolumeClaim {claim!r} holds {norm!r} and is mounted "
            f"at {root / claim}",
        )

    if scheme in ("http", "https"):
        return _download_http(uri, _cache_dir(cache_dir), timeout)

    if scheme == "s3":
        return _download_s3(uri, _cache_dir(cache_dir))

    if scheme == "file":
        parts = urllib.parse.urlsplit(uri)
        local = urllib.parse.unquote(parts.path)
        if parts.netloc and parts.netloc != "localhost":
            local = f"//{parts.netloc}{local}"
        path = Path(local)
    elif scheme:
        raise DataError(
            f"unsupported data URI scheme {scheme!r} in {_redact(uri)}; use a path, "
            "pvc://<claim>/<path>, https://… or s3://bucket/key"
        )
    else:
        path = Path(uri).expanduser()
    hint = "check the trainingData path"
    if not path.is_absolute():
        hint += f" (relative paths are resolved from {os.getcwd()})"
    return _check_file(path, str(path), hint)


def _cache_dir(cache_dir: str | os.PathLike[str] | None) -> Path:
    if cache_dir is None:
        cache_dir = Path(tempfile.gettempdir()) / "chatbot-data"
    path = Path(cache_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _download_http(uri: str, cache_dir: Path, timeout: float) -> Path:
    shown = _redact(uri)
    target = cache_dir / _cache_name(uri, urllib.parse.urlsplit(uri).path)
    request = urllib.request.Request(uri, headers={"User-Agent": "chatbot-trainer/prepare"})
    tmp_name = None
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            with tempfile.NamedTemporaryFile(
                dir=cache_dir, prefix=".download-", delete=False
            ) as tmp:
                tmp_name = tmp.name
                while chunk := response.read(_DOWNLOAD_CHUNK):
                    tmp.write(chunk)
        os.replace(tmp_name, target)
        tmp_name = None
    except urllib.error.HTTPError as exc:
        raise DataError(
            f"download of {shown} failed: HTTP {exc.code} {exc.reason}; check the URL and "
            "that it is readable without extra credentials"
        ) from exc
    except urllib.error.URLError as exc:
        reason = exc.reason
        raise DataError(f"could not download {shown}: {reason}") from exc
    except TimeoutError as exc:
        raise DataError(f"download of {shown} timed out after {timeout:g}s") from exc
    except OSError as exc:
        raise DataError(f"could not download {shown}: {exc}") from exc
    finally:
        if tmp_name is not None:
            try:
                os.unlink(tmp_name)
            except OSError:
                pass
    return _check_file(target, f"{shown} (downloaded to {target})", "check the URL")


def _download_s3(uri: str, cache_dir: Path) -> Path:
    parts = urllib.parse.urlsplit(uri)
    bucket, key = parts.netloc, parts.path.lstrip("/")
    if not bucket or not key:
        raise DataError(f"bad data URI {uri!r}: expected s3://bucket/key")
    try:
        import boto3  # optional: present in the trainer image
    except ImportError as exc:
        raise DataError(
            f"reading {uri} needs boto3, which is not installed; run `pip install boto3` "
            "or use the trainer image"
        ) from exc
    target = cache_dir / _cache_name(uri, key)
    fd, tmp_name = tempfile.mkstemp(dir=cache_dir, prefix=".download-")
    os.close(fd)
    try:
        boto3.client("s3").download_file(bucket, key, tmp_name)
        os.replace(tmp_name, target)
    except Exception as exc:  # botocore raises many types; all mean "could not fetch"
        text = str(exc)
        if "404" in text or "NoSuchKey" in text or "Not Found" in text:
            raise DataError(f"training data not found: {uri}; check the bucket and key") from exc
        raise DataError(
            f"could not download {uri}: {text}; check the credentials (AWS_* environment "
            "variables or the secret mounted in the Job) and the endpoint"
        ) from exc
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
    return _check_file(target, f"{uri} (downloaded to {target})", "check the bucket and key")


# --------------------------------------------------------------------------- reading


def _json_kind(value: Any) -> str:
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
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise DataError(f"training data {path} is UTF-16 encoded; save it as UTF-8")
    if data[:3] == b"\xef\xbb\xbf":
        data = data[3:]
    return data


def read_records(path: str | os.PathLike[str]) -> tuple[list[RawRecord], list[LineError]]:
    """Parse a JSONL file or a JSON array file into records and per-line errors.

    JSONL: one JSON object per line, blank lines ignored, line numbers 1-based. A file whose
    first non-blank character is ``[`` is read as a JSON array whose elements are numbered
    as records from 1. A UTF-8 BOM and gzip compression are handled; invalid UTF-8 or JSON on
    a line becomes a :class:`LineError` for that line.
    """
    path = Path(path)
    data = _read_bytes(path)
    with _gc_paused():
        if data.lstrip()[:1] == b"[":
            parsed = _read_array(path, data)
            if parsed is not None:
                return parsed
        return _read_jsonl(data)


def _read_array(path: Path, data: bytes) -> tuple[list[RawRecord], list[LineError]] | None:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(
            f"training data {path} is not valid UTF-8 (line {line}); save it as UTF-8"
        ) from exc
    try:
        values = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # a JSONL file whose first line is an array
            return None
        raise DataError(
            f"training data {path} is not valid JSON: {exc.msg} at line {exc.lineno} "
            f"column {exc.colno}"
        ) from exc
    records: list[RawRecord] = []
    errors: list[LineError] = []
    for index, value in enumerate(values, 1):
        if isinstance(value, dict):
            records.append(RawRecord(index, value, "record"))
        else:
            errors.append(
                LineError(
                    index, f"expected a JSON object, got {_json_kind(value)}", "not_an_object",
                    "record",
                )
            )
    return records, errors


def _read_jsonl(data: bytes) -> tuple[list[RawRecord], list[LineError]]:
    records: list[RawRecord] = []
    errors: list[LineError] = []
    try:
        lines: list[str] | list[bytes] = data.decode("utf-8").split("\n")
        decoded = True
    except UnicodeDecodeError:
        lines = data.split(b"\n")
        decoded = False
    loads = json.loads
    for number, line in enumerate(lines, 1):
        if not decoded:
            try:
                line = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                if not line.strip():
                    continue
                errors.append(
                    LineError(
                        number,
                        f"invalid UTF-8 (byte 0x{line[exc.start]:02x} at column {exc.start + 1})",
                        "invalid_utf8",
                    )
                )
                continue
        if not line or line.isspace():
            continue
        try:
            value = loads(line)
        except json.JSONDecodeError as exc:
            errors.append(LineError(number, f"{exc.msg} at column {exc.colno}", "invalid_json"))
            continue
        except RecursionError:
            errors.append(LineError(number, "JSON nested too deeply", "invalid_json"))
            continue
        if type(value) is dict:
            records.append(RawRecord(number, value))
        else:
            errors.append(
                LineError(
                    number, f"expected a JSON object, got {_json_kind(value)}", "not_an_object"
                )
            )
    return records, errors


# --------------------------------------------------------------------------- preparing


def _pct(fraction: float) -> str:
    text = f"{fraction * 100:.1f}".rstrip("0").rstrip(".")
    return f"{text}%"


def _fold(text: str) -> str:
    return text.lower() if text.isascii() else text.casefold()


def _conversation_keys(messages: list[dict[str, str]]) -> tuple[bytes, bytes]:
    """(dedupe key, split key). Comparison ignores case and whitespace differences.

    The split key leaves out the system message so that changing the system prompt does not
    move conversations between train and eval.
    """
    system = ""
    body: list[str] = []
    for message in messages:
        if message["role"] == "system":
            system = message["content"]
        else:
            # NUL never survives normalise_text, so it separates turns unambiguously.
            body.append("\x00u " if message["role"] == "user" else "\x00a ")
            body.append(message["content"])
    text = " ".join(_fold("".join(body)).split())
    split_key = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
    if not system:
        return split_key, split_key
    folded_system = " ".join(_fold(system).split())
    dedupe_key = hashlib.blake2b(
        folded_system.encode("utf-8", "surrogatepass") + b"\x00" + split_key, digest_size=16
    ).digest()
    return dedupe_key, split_key


def _split_values(keys: list[bytes], seed: int) -> list[float]:
    """A uniform value in [0, 1) per split key, fixed by the key and the seed."""
    base = hashlib.blake2b(digest_size=8, key=str(int(seed)).encode("ascii")[:64])
    values = []
    for key in keys:
        hasher = base.copy()
        hasher.update(key)
        values.append(int.from_bytes(hasher.digest(), "big") / 18446744073709551616.0)  # 2**64
    return values


def prepare_conversations(
    path_or_records: str | os.PathLike[str] | Iterable[Any],
    *,
    fmt: str = "auto",
    eval_fraction: float = 0.1,
    seed: int = 42,
    max_bad_line_fraction: float = 0.1,
    max_chars: int | None = None,
    dedupe: bool = True,
    system_prompt: str | None = None,
) -> PreparedData:
    """Read, convert, clean, de-duplicate and split the training conversations.

    ``path_or_records`` is a local file (see :func:`read_records`) or an iterable of records
    (dicts or :class:`RawRecord`). ``fmt`` forces one of :data:`~.formats.FORMATS` instead
    of per-record detection. ``system_prompt`` is added to conversations without a system
    message. Conversations whose content is longer than ``max_chars`` characters in total are
    dropped. The split is decided per conversation by a hash of its content and ``seed``, so
    appending rows never moves existing ones; eval gets at least one conversation whenever
    two or more are kept and ``eval_fraction > 0``.

    Raises :class:`DataError` when more than ``max_bad_line_fraction`` of the records are
    malformed or cannot be converted, or when no conversation is left.
    """
    if fmt != "auto" and fmt not in FORMATS:
        raise DataError(
            f"unknown data format {fmt!r}; expected auto or one of {', '.join(FORMATS)}"
        )
    if not 0.0 <= eval_fraction < 1.0:
        raise DataError(f"data.evalFraction must be in [0, 1), got {eval_fraction}")
    if not 0.0 <= max_bad_line_fraction <= 1.0:
        raise DataError(f"data.maxBadLineFraction must be in [0, 1], got {max_bad_line_fraction}")
    if max_chars is not None and max_chars < 1:
        raise DataError(f"max_chars must be positive, got {max_chars}")

    with _gc_paused():
        return _prepare(
            path_or_records,
            fmt=fmt,
            eval_fraction=eval_fraction,
            seed=seed,
            max_bad_line_fraction=max_bad_line_fraction,
            max_chars=max_chars,
            dedupe=dedupe,
            system_prompt=system_prompt,
        )


def _prepare(
    path_or_records: str | os.PathLike[str] | Iterable[Any],
    *,
    fmt: str,
    eval_fraction: float,
    seed: int,
    max_bad_line_fraction: float,
    max_chars: int | None,
    dedupe: bool,
    system_prompt: str | None,
) -> PreparedData:
    if isinstance(path_or_records, (str, os.PathLike)):
        source = str(path_or_records)
        records, line_errors = read_records(path_or_records)
    else:
        source = "<records>"
        records, line_errors = [], []
        for index, item in enumerate(path_or_records, 1):
            if isinstance(item, RawRecord):
                records.append(item)
            elif isinstance(item, dict):
                records.append(RawRecord(index, item, "record"))
            else:
                line_errors.append(
                    LineError(
                        index, f"expected a JSON object, got {_json_kind(item)}",
                        "not_an_object", "record",
                    )
                )
    unit = records[0].unit if records else (line_errors[0].unit if line_errors else "line")

    system_text = normalise_text(system_prompt).strip() if system_prompt else ""
    formats: Counter[str] = Counter()
    dropped: Counter[str] = Counter()
    adjusted: Counter[str] = Counter()
    errors: list[tuple[int, str, str]] = [(e.line, e.reason, e.message) for e in line_errors]
    unconvertible = 0
    seen: set[bytes] = set()
    kept: list[tuple[int, list[dict[str, str]], bytes]] = []  # (line, messages, split key)

    for record in records:
        detected = None
        try:
            detected = fmt if fmt != "auto" else detect_format(record.data)
            conversion = convert_record(record.data, detected)
        except FormatError as exc:
            dropped[exc.reason] += 1
            if exc.reason != "empty":
                unconvertible += 1
                errors.append((record.line, exc.reason, exc.message))
            if detected is not None:
                formats[detected] += 1
            continue
        formats[detected] += 1
        messages = conversion.messages
        if conversion.trailing_user_dropped:
            adjusted["trailing_user_turn_dropped"] += 1
        if system_text and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": system_text})
            adjusted["system_prompt_added"] += 1
        if max_chars is not None and sum(len(m["content"]) for m in messages) > max_chars:
            dropped["too_long"] += 1
            continue
        dedupe_key, split_key = _conversation_keys(messages)
        if dedupe:
            if dedupe_key in seen:
                dropped["duplicate"] += 1
                continue
            seen.add(dedupe_key)
        kept.append((record.line, messages, split_key))

    lines_read = len(records) + len(line_errors)
    errors.sort(key=lambda e: e[0])
    bad = len(line_errors) + unconvertible
    if lines_read == 0:
        raise DataError(f"training data {source} holds no records")
    if bad / lines_read > max_bad_line_fraction:
        first = "; ".join(
            f"{unit} {line}: {message}" for line, _, message in errors[:_ERRORS_IN_MESSAGE]
        )
        raise DataError(
            f"{bad} of {lines_read} {unit}s ({_pct(bad / lines_read)}) are malformed or "
            f"unusable, above the {_pct(max_bad_line_fraction)} limit (data.maxBadLineFraction); "
            f"first errors: {first}"
        )
    if not kept:
        reasons = ", ".join(f"{n} {reason}" for reason, n in dropped.most_common()) or "none"
        raise DataError(
            f"no usable conversations in {source}: {lines_read} {unit}s read, all dropped "
            f"({reasons})"
        )

    train_idx, eval_idx = _split([key for _, _, key in kept], eval_fraction, seed)
    train = [{"messages": kept[i][1]} for i in train_idx]
    evals = [{"messages": kept[i][1]} for i in eval_idx]

    turns = [len(m) for _, m, _ in kept]
    chars = [sum(len(x["content"]) for x in m) for _, m, _ in kept]
    report: dict[str, Any] = {
        "source": source,
        "lines_read": lines_read,
        "malformed": len(line_errors),
        "errors": [
            {"line": line, "reason": reason, "message": message}
            for line, reason, message in errors[:MAX_REPORTED_ERRORS]
        ],
        "formats": dict(sorted(formats.items())),
        "dropped": dict(sorted(dropped.items())),
        "adjusted": dict(sorted(adjusted.items())),
        "kept": len(kept),
        "train": len(train),
        "eval": len(evals),
        "stats": {"turns": _summary(turns, 2), "chars": _summary(chars, 1)},
        "settings": {
            "format": fmt,
            "eval_fraction": eval_fraction,
            "seed": seed,
            "max_bad_line_fraction": max_bad_line_fraction,
            "max_chars": max_chars,
            "dedupe": dedupe,
            "system_prompt": bool(system_text),
        },
    }
    return PreparedData(train=train, eval=evals, report=report)


def _summary(values: list[int], digits: int) -> dict[str, float]:
    mean = round(sum(values) / len(values), digits)
    return {"min": min(values), "max": max(values), "mean": mean}


def _split(keys: list[bytes], eval_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices for train and eval, in input order."""
    n = len(keys)
    if eval_fraction <= 0 or n < 2:
        return list(range(n)), []
    values = _split_values(keys, seed)
    in_eval = [v < eval_fraction for v in values]
    count = sum(in_eval)
    if count == 0:  # guarantee one eval conversation: the one closest to the threshold
        in_eval[min(range(n), key=values.__getitem__)] = True
    elif count == n:  # and one training conversation
        in_eval[max(range(n), key=values.__getitem__)] = False
    train = [i for i in range(n) if not in_eval[i]]
    evals = [i for i in range(n) if in_eval[i]]
    return train, evals


# --------------------------------------------------------------------------- files


def write_jsonl(path: str | os.PathLike[str], items: Iterable[Any]) -> int:
    """Write one JSON value per line atomically (temporary file, then rename). Returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dumps = json.dumps
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    count = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as handle:
            buffer: list[str] = []
            for item in items:
                buffer.append(dumps(item, ensure_ascii=False))
                count += 1
                if len(buffer) >= 4096:
                    handle.write("\n".join(buffer) + "\n")
                    buffer.clear()
            if buffer:
                handle.write("\n".join(buffer) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except OSError:
            pass
        raise
    return count


def load_jsonl(path: str | os.PathLike[str]) -> list[Any]:
    """Read a JSONL file written by :func:`write_jsonl`; any bad line raises :class:`DataError`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError as exc:
        raise DataError(f"{path} not found") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    items = []
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            items.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: line {number}: {exc.msg} at column {exc.colno}") from exc
    return items
