"""Training data for the prepare step: fetch, parse, clean, de-duplicate, split and report.

The flow is ``resolve_source`` (URI → local file or folder) → ``read_source`` (data/readers.py:
JSONL, JSON array, parquet, Arrow, a ``save_to_disk`` folder or a hub data set → raw records
plus per-line errors) → ``prepare_conversations`` (format conversion, cleaning,
de-duplication, deterministic train/eval split and a JSON-serialisable report that locates
every row that was not used, adjusted or flagged by its line number).

Errors meant for the person who wrote the ChatbotTraining spec are raised as
:class:`DataError` with a one-line message saying what is wrong and what to check.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .formats import (
    ADJUSTMENTS,
    FLAGS,
    FORMATS,
    REASONS,
    FormatError,
    convert_record,
    detect_format,
    normalise_text,
)
from .readers import (
    HUB_PREFIX,
    DataError,
    LineError,
    RawRecord,
    SourceRecords,
    gc_paused,
    json_error,
    parse_hub_uri,
    read_records,
    read_source,
    records_of_values,
)

__all__ = [
    "DataError",
    "LineError",
    "PreparedData",
    "RawRecord",
    "load_jsonl",
    "prepare_conversations",
    "read_records",
    "read_source",
    "resolve_source",
    "write_jsonl",
]

DEFAULT_PVC_ROOT = "/mnt/pvc"
MAX_REPORTED_ERRORS = 20
MAX_REPORTED_LINES = 20  # line numbers listed per reason in the report
_ERRORS_IN_MESSAGE = 3
DUPLICATE_WARNING_SHARE = 0.5  # of the rows read: more duplicates than this gets a warning
_DOWNLOAD_CHUNK = 1 << 20

NOT_USED: dict[str, str] = {
    "malformed": "the line is not a JSON object (see errors for each line's problem)",
    **REASONS,
    "duplicate": "the same conversation as an earlier row (ignoring case, spacing and tool-call ids)",
    "too_long": "longer than maxSeqLength could ever hold (characters per token ceiling)",
}
"""Why a row was not used, with a one-line explanation each."""


@dataclass
class PreparedData:
    """Cleaned conversations split into train and eval, plus the data report."""

    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    report: dict[str, Any] = field(default_factory=dict)


class RowLog:
    """Counts per reason and the first line numbers of each, in reading order."""

    def __init__(self, limit: int = MAX_REPORTED_LINES) -> None:
        self.limit = limit
        self.counts: dict[str, int] = {}
        self.lines: dict[str, list[int]] = {}

    def add(self, reason: str, line: int) -> None:
        count = self.counts.get(reason, 0)
        self.counts[reason] = count + 1
        if count < self.limit:
            self.lines.setdefault(reason, []).append(line)

    def total(self, reasons: Iterable[str] | None = None) -> int:
        if reasons is None:
            return sum(self.counts.values())
        return sum(self.counts.get(reason, 0) for reason in reasons)

    def sorted_counts(self, exclude: Iterable[str] = ()) -> dict[str, int]:
        return {k: v for k, v in sorted(self.counts.items()) if k not in exclude}

    def located(self, meanings: dict[str, str]) -> dict[str, dict[str, Any]]:
        """{reason: {"count", "lines" (the first ones), "meaning"}}."""
        return {
            reason: {
                "count": count,
                "lines": sorted(self.lines.get(reason, [])),
                "meaning": meanings.get(reason, ""),
            }
            for reason, count in sorted(self.counts.items())
        }

    def describe(self, reasons: Iterable[str], unit: str, shown: int = 5) -> str:
        """'3 duplicate (lines 4, 9, 12), 1 empty (line 7)' for the given reasons."""
        parts = []
        for reason in reasons:
            count = self.counts.get(reason, 0)
            if count:
                lines = sorted(self.lines.get(reason, []))[:shown]
                more = ", …" if count > len(lines) else ""
                plural = "s" if len(lines) > 1 else ""
                parts.append(f"{count} {reason} ({unit}{plural} {', '.join(map(str, lines))}{more})")
        return ", ".join(parts)


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
        if any((path / marker).is_file() for marker in ("state.json", "dataset_dict.json")):
            return path  # a folder written by datasets' save_to_disk
        raise DataError(
            f"training data {shown} is a directory; point trainingData at a .jsonl, .json or "
            ".parquet file, or at a folder written by datasets' save_to_disk"
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
) -> Path | str:
    """Turn a ``trainingData`` value into something :func:`read_source` reads.

    * a local path or ``file://`` URI is used as is (a file, or a folder written by
      ``datasets``' ``save_to_disk``);
    * ``pvc://<claim>/<path>`` maps to ``<pvc_root>/<claim>/<path>``, where the Job mounts
      claims (``pvc_root`` defaults to ``$CHATBOT_PVC_ROOT`` or ``/mnt/pvc``);
    * ``http://`` / ``https://`` is downloaded into ``cache_dir``;
    * ``s3://bucket/key`` is downloaded into ``cache_dir`` with boto3;
    * ``hf://datasets/<owner>/<name>[@<revision>][/<file>]`` is returned as is (checked): the
      ``datasets`` library downloads it into its cache when it is read.

    Raises :class:`DataError` when the file is missing, a directory of another kind, empty,
    or cannot be downloaded.
    """
    uri = uri.strip()
    if not uri:
        raise DataError(
            "trainingData is empty; give a path, pvc://, https://, s3:// or hf://datasets/ URI"
        )
    if uri.startswith(HUB_PREFIX):
        parse_hub_uri(uri)
        return uri
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
            "pvc://<claim>/<path>, https://…, s3://bucket/key or hf://datasets/<owner>/<name>"
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


# --------------------------------------------------------------------------- preparing


def _pct(fraction: float) -> str:
    text = f"{fraction * 100:.1f}".rstrip("0").rstrip(".")
    return f"{text}%"


def _fold(text: str) -> str:
    return text.lower() if text.isascii() else text.casefold()


# NUL never survives normalise_text, so these separate turns unambiguously.
_ROLE_MARKS = {"user": "\x00u ", "assistant": "\x00a ", "tool": "\x00t "}


class _CallNumbers:
    """Tool calls numbered by order of appearance, for comparing conversations on content.

    Call ids differ between exports of the same conversation (random in OpenAI's, absent in
    ShareGPT's), so the keys hold each call without its id and each tool result with the
    number of the call it answers: the one its ``tool_call_id`` names, else the next call not
    yet answered (how results without ids pair up).
    """

    def __init__(self) -> None:
        self.numbers: dict[str, int] = {}
        self.count = 0
        self.unanswered: list[int] = []

    def calls(self, tool_calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for call in tool_calls:
            self.count += 1
            if "id" in call:
                self.numbers.setdefault(call["id"], self.count)
            self.unanswered.append(self.count)
            out.append({k: v for k, v in call.items() if k != "id"})
        return out

    def result(self, call_id: str | None) -> int:
        number = self.numbers.get(call_id) if call_id is not None else None
        if number is None:
            number = self.unanswered[0] if self.unanswered else 0
        if number in self.unanswered:
            self.unanswered.remove(number)
        return number


def _conversation_keys(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
) -> tuple[bytes, bytes]:
    """(dedupe key, split key). Comparison ignores case and whitespace differences, and
    tool-call ids (see :class:`_CallNumbers`).

    The split key leaves out the system message and the tool definitions, so that changing
    them does not move conversations between train and eval.
    """
    system = ""
    body: list[str] = []
    calls = _CallNumbers()
    for message in messages:
        role = message["role"]
        if role == "system":
            system = message["content"]
            continue
        body.append(_ROLE_MARKS[role])
        body.append(message["content"])
        if "tool_calls" in message:
            body.append(json.dumps(calls.calls(message["tool_calls"]), sort_keys=True, ensure_ascii=False))
        elif role == "tool":
            body.append(f"\x00r{calls.result(message.get('tool_call_id'))}")
    text = " ".join(_fold("".join(body)).split())
    split_key = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
    if tools:
        system += "\x00" + json.dumps(tools, sort_keys=True, ensure_ascii=False)
    if not system:
        return split_key, split_key
    folded_system = " ".join(_fold(system).split())
    dedupe_key = hashlib.blake2b(
        folded_system.encode("utf-8", "surrogatepass") + b"\x00" + split_key, digest_size=16
    ).digest()
    return dedupe_key, split_key


def _conversation_chars(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> int:
    """Characters a chat template renders at least: contents, tool calls and tool definitions."""
    chars = 0
    for message in messages:
        chars += len(message["content"])
        if "tool_calls" in message:
            chars += len(json.dumps(message["tool_calls"], ensure_ascii=False))
    if tools:
        chars += len(json.dumps(tools, ensure_ascii=False))
    return chars


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

    ``path_or_records`` is a local file or folder, or an ``hf://datasets/`` URI (see
    :func:`read_source`), or an iterable of records (dicts or :class:`RawRecord`). ``fmt``
    forces one of :data:`~.formats.FORMATS` instead of per-record detection.
    ``system_prompt`` is added to conversations without a system message. Conversations that
    render to more than ``max_chars`` characters (contents, tool calls and tool definitions)
    are dropped. The split is decided per conversation by a hash of its content and ``seed``,
    so appending rows never moves existing ones; eval gets at least one conversation whenever
    two or more are kept and ``eval_fraction > 0``.

    Each kept conversation is ``{"line": n, "messages": [...]}`` plus ``"tools"`` when it
    defines tools; ``line`` is where it came from (a line, record or row number, see the
    report's ``unit``).

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

    with gc_paused():
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


def _records_in_memory(items: Iterable[Any]) -> SourceRecords:
    records, errors = records_of_values(items)
    unit = records[0].unit if records else "record"
    return SourceRecords(records, errors, unit, "records")


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
        read = read_source(path_or_records)
    else:
        source = "<records>"
        read = _records_in_memory(path_or_records)
    records, line_errors, unit = read.records, read.errors, read.unit

    system_text = normalise_text(system_prompt).strip() if system_prompt else ""
    formats: dict[str, int] = {}
    not_used, adjusted, flagged = RowLog(), RowLog(), RowLog()
    tool_rows = RowLog()
    errors: list[tuple[int, str, str]] = [(e.line, e.reason, e.message) for e in line_errors]
    for e in line_errors:
        not_used.add("malformed", e.line)
    own_system = 0
    seen: set[bytes] = set()
    kept: list[tuple[dict[str, Any], bytes]] = []  # (conversation, split key)
    kept_chars: list[int] = []

    for record in records:
        line = record.line
        detected = None
        try:
            detected = fmt if fmt != "auto" else detect_format(record.data)
            conversion = convert_record(record.data, detected)
        except FormatError as exc:
            not_used.add(exc.reason, line)
            if exc.reason != "empty":
                errors.append((line, exc.reason, exc.message))
            if detected is not None:
                formats[detected] = formats.get(detected, 0) + 1
            continue
        formats[detected] = formats.get(detected, 0) + 1
        messages, tools = conversion.messages, conversion.tools
        has_system = messages[0]["role"] == "system"
        if system_text and not has_system:
            messages.insert(0, {"role": "system", "content": system_text})
        chars = _conversation_chars(messages, tools)
        if max_chars is not None and chars > max_chars:
            not_used.add("too_long", line)
            continue
        dedupe_key, split_key = _conversation_keys(messages, tools)
        if dedupe:
            if dedupe_key in seen:
                not_used.add("duplicate", line)
                continue
            seen.add(dedupe_key)
        for note in conversion.adjustments:
            adjusted.add(note, line)
        for flag in conversion.flags:
            flagged.add(flag, line)
        if has_system:
            own_system += 1
        elif system_text:
            adjusted.add("system_prompt_added", line)
        conversation: dict[str, Any] = {"line": line, "messages": messages}
        if tools:
            conversation["tools"] = tools
        if conversion.has_tool_turns:
            tool_rows.add("calls", line)
        elif conversion.tools:
            tool_rows.add("define_only", line)
        kept.append((conversation, split_key))
        kept_chars.append(chars)

    lines_read = len(records) + len(line_errors)
    errors.sort(key=lambda e: e[0])
    unconvertible = not_used.total(r for r in REASONS if r != "empty")
    bad = len(line_errors) + unconvertible
    if lines_read == 0:
        raise DataError(f"training data {source} holds no records")
    if bad / lines_read > max_bad_line_fraction:
        first = _grouped_errors(errors, unit)
        raise DataError(
            f"{bad} of {lines_read} {unit}s ({_pct(bad / lines_read)}) are malformed or "
            f"unusable, above the {_pct(max_bad_line_fraction)} limit (data.maxBadLineFraction); "
            f"first errors: {first}"
        )
    if not kept:
        reasons = not_used.describe(sorted(not_used.counts), unit) or "none"
        raise DataError(
            f"no usable conversations in {source}: {lines_read} {unit}s read, all dropped "
            f"({reasons})"
        )

    warnings: list[str] = []
    duplicates = not_used.counts.get("duplicate", 0)
    if duplicates / lines_read > DUPLICATE_WARNING_SHARE:
        warnings.append(
            f"{duplicates} of {lines_read} {unit}s ({_pct(duplicates / lines_read)}) repeat an earlier "
            f"conversation (more than {_pct(DUPLICATE_WARNING_SHARE)}), so only {len(kept)} distinct "
            "conversations are trained on: check that the file was not written twice or generated "
            "from a few templates"
        )

    train_idx, eval_idx = _split([key for _, key in kept], eval_fraction, seed)
    train = [kept[i][0] for i in train_idx]
    evals = [kept[i][0] for i in eval_idx]

    turns = [len(c["messages"]) for c, _ in kept]
    report: dict[str, Any] = {
        "source": source,
        "reader": read.reader,
        "unit": unit,
        "notes": list(read.notes),
        "lines_read": lines_read,
        "malformed": len(line_errors),
        "errors": [
            {"line": line, "reason": reason, "message": message}
            for line, reason, message in errors[:MAX_REPORTED_ERRORS]
        ],
        "formats": dict(sorted(formats.items())),
        "dropped": not_used.sorted_counts(exclude=("malformed",)),
        "adjusted": adjusted.sorted_counts(),
        "flagged": flagged.sorted_counts(),
        "rows": {
            "not_used": not_used.located(NOT_USED),
            "flagged": flagged.located(FLAGS),
            "adjusted": adjusted.located(
                {**ADJUSTMENTS, "system_prompt_added": "data.systemPrompt was added (no system message)"}
            ),
        },
        "tools": {  # conversations that call tools (or hold tool results); those that only define them
            "conversations": tool_rows.counts.get("calls", 0),
            "lines": tool_rows.lines.get("calls", []),
            "define_only": tool_rows.counts.get("define_only", 0),
            "define_only_lines": tool_rows.lines.get("define_only", []),
        },
        "system_prompts": {
            "own": own_system,
            "added": adjusted.counts.get("system_prompt_added", 0),
            "none": len(kept) - own_system - adjusted.counts.get("system_prompt_added", 0),
        },
        "warnings": warnings,
        "kept": len(kept),
        "train": len(train),
        "eval": len(evals),
        "stats": {"turns": _summary(turns, 2), "chars": _summary(kept_chars, 1)},
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


def _grouped_errors(errors: list[tuple[int, str, str]], unit: str, groups: int = _ERRORS_IN_MESSAGE,
                    shown: int = 5) -> str:
    """The first few distinct error messages, each with the lines that have it:
    "lines 3, 7, 9, …: Expecting ',' delimiter at column 30; line 12: ..."."""
    by_message: dict[str, list[int]] = {}
    for line, _, message in errors:
        by_message.setdefault(message, []).append(line)
    parts = []
    for message, lines in list(by_message.items())[:groups]:
        more = f", … ({len(lines)} {unit}s)" if len(lines) > shown else ""
        plural = "s" if len(lines) > 1 else ""
        parts.append(f"{unit}{plural} {', '.join(map(str, lines[:shown]))}{more}: {message}")
    if len(by_message) > groups:
        parts.append(f"{len(by_message) - groups} other kinds of error (see the report's errors)")
    return "; ".join(parts)


def report_summary(report: dict[str, Any], lines_per_reason: int = 5) -> dict[str, Any]:
    """The compact part of a data report for status: counts and the first lines per reason
    (``first_lines``, whatever the source numbers: ``unit`` says so when it is not lines)."""
    rows = report.get("rows", {})
    first_lines = {
        reason: entry["lines"][:lines_per_reason]
        for group in ("not_used", "flagged")
        for reason, entry in rows.get(group, {}).items()
    }
    summary: dict[str, Any] = {
        "train": report["train"],
        "eval": report["eval"],
        "malformed": report["malformed"],
        "dropped": report["dropped"],
    }
    if report.get("flagged"):
        summary["flagged"] = report["flagged"]
    if report.get("warnings"):
        summary["warnings"] = report["warnings"]
    if first_lines:
        summary["first_lines"] = first_lines  # line, record or row numbers: see unit
        if report.get("unit", "line") != "line":
            summary["unit"] = report["unit"]
    tools = report.get("tools", {})
    if tools.get("conversations"):
        summary["tool_conversations"] = tools["conversations"]
    if tools.get("define_only"):
        summary["tool_definitions_only"] = tools["define_only"]
    return summary


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
            raise DataError(f"{path}: line {number}: {json_error(exc)}") from exc
    return items
