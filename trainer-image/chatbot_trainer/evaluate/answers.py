"""Are the answers right? The models' answers to held-out questions, scored against the data's.

Loss and token accuracy say how well a model predicts the data's wording; a support team wants
to know whether the chatbot states the data's facts. Each held-out conversation gives one
question: its last user turn, with the turns before it as context, and the data's answer to it
as the reference. Both models answer greedily (samples.generate_answers) and every answer gets:

- ``rouge_l``: ROUGE-L F1 against the reference (Google's ``rouge-score``, Porter stemming),
  the standard overlap score: 1 for the same words in the same order, 0 for none in common.
- ``fact_recall``: the share of the reference's checkable facts that the answer states.

Checkable facts (``extract_facts``), each compared in a normal form so that different
spellings of the same fact match:

- prices: an amount with a currency, ``$29``, ``$29.00``, ``29 USD``, ``USD 29``, ``29 dollars``,
  ``€5``, ``5 euros`` (→ ``price:USD 29``); the amount compares as a number (29 = 29.00).
- quantities: a number with a unit, ``100 GB``, ``100GB``, ``100 gigabytes``, ``30 minutes``,
  ``one second``, ``99.9%``, ``100 requests per second`` (→ ``quantity:100 GB``); number words
  up to twenty and the tens are read as numbers, units are singular and canonical.
- other numbers: any other number, ``HTTP 429``, ``version 2`` (→ ``number:429``).
- URLs and domains: ``https://acme.cloud/pricing``, ``acme.cloud/pricing`` (→
  ``url:acme.cloud/pricing``: no scheme, no ``www.``, no trailing slash or punctuation, lower case).
- e-mail addresses (→ ``email:billing@acme.cloud``, lower case).
- names: capitalised words inside a sentence, joined when adjacent: product, plan, brand and
  menu names such as ``Pro``, ``American Express``, ``Settings`` (→ ``name:american express``),
  and short quoted labels such as ``"Forgot password"``. A sentence's first word counts only
  as part of a longer name (``Acme Cloud runs…``; not ``Requests are…``; ``The Pro plan`` gives
  ``Pro``); acronyms of common words (API, HTTP, ID, …) are not names. An answer states a name
  when it contains it as whole words, in any case.

An answer states a price, quantity or number when the same normal form is among the answer's
own facts (``1TB`` does not state ``100 GB``; ``$10.00`` does not state ``$29``), a URL or
e-mail when the answer contains it, a name when the answer contains it. ``fact_recall`` of a
set of answers is the number of reference facts stated over the number of reference facts
(questions whose reference has no checkable fact count for ROUGE-L only); the questions that
missed facts are listed with what they missed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, Sequence

# ------------------------------------------------------------------------------------ questions


def held_out_questions(conversations: Sequence[dict[str, Any]], limit: int | None = None) -> list[dict[str, Any]]:
    """One question per conversation that ends a user turn with an assistant answer:
    {"messages": [...context, last user turn], "reference": the data's answer, "index": i}.

    The last user turn followed by an assistant text reply is taken (earlier turns are context);
    conversations without one (or whose answer is a tool call without text) are skipped.
    """
    questions = []
    for index, conversation in enumerate(conversations):
        messages = conversation.get("messages") or []
        for i in range(len(messages) - 1, 0, -1):
            answer, asked = messages[i], messages[i - 1]
            if answer.get("role") == "assistant" and asked.get("role") == "user":
                reference = answer.get("content")
                if isinstance(reference, str) and reference.strip():
                    questions.append({"messages": [dict(m) for m in messages[:i]], "reference": reference,
                                      "index": index})
                break
        if limit is not None and len(questions) >= limit:
            break
    return questions


# ---------------------------------------------------------------------------------------- facts

_NUMBER_WORDS = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
    "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14,
    "fifteen": 15, "sixteen": 16, "seventeen": 17, "eighteen": 18, "nineteen": 19, "twenty": 20,
    "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90,
    "hundred": 100,
}

# spelling (lower case, without a plural s) → canonical unit
_UNITS = {
    **{u.lower(): u for u in ("B", "KB", "MB", "GB", "TB", "PB", "KiB", "MiB", "GiB", "TiB")},
    "byte": "B", "kilobyte": "KB", "megabyte": "MB", "gigabyte": "GB", "terabyte": "TB",
    "petabyte": "PB", "gig": "GB",
    "ms": "millisecond", "millisecond": "millisecond", "s": "second", "sec": "second",
    "second": "second", "min": "minute", "minute": "minute", "h": "hour", "hr": "hour",
    "hour": "hour", "day": "day", "business day": "business day", "working day": "business day",
    "week": "week", "month": "month", "year": "year",
    "%": "%", "percent": "%", "per cent": "%",
    "user": "user", "seat": "seat", "member": "member", "project": "project", "request": "request",
    "call": "call", "api key": "api key", "key": "key", "file": "file", "device": "device",
    "character": "character", "token": "token", "attempt": "attempt", "email": "email",
    "license": "license", "team": "team", "workspace": "workspace", "server": "server",
    "instance": "instance", "cpu": "CPU", "core": "core", "vcpu": "vCPU", "region": "region",
}
_CURRENCIES = {"$": "USD", "usd": "USD", "dollar": "USD", "us dollar": "USD", "€": "EUR", "eur": "EUR",
               "euro": "EUR", "£": "GBP", "gbp": "GBP", "pound": "GBP"}

_NUM = r"\d+(?:[.,]\d{3})*(?:\.\d+)?"
_WORD_NUM = "|".join(sorted(_NUMBER_WORDS, key=len, reverse=True))
_ANY_NUM = rf"(?:{_NUM}|\b(?:{_WORD_NUM})\b)"


def _unit_pattern() -> str:
    spellings = sorted(set(_UNITS), key=len, reverse=True)
    parts = []
    for s in spellings:
        escaped = re.escape(s).replace(r"\ ", r"\s+")
        parts.append(escaped if s == "%" else escaped + r"(?:e?s)?\b")
    return "|".join(parts)


_EMAIL = re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b")
_URL = re.compile(
    r"(?:\bhttps?://[^\s<>()\"']+|\b(?:www\.)?[a-z0-9-]+(?:\.[a-z0-9-]+)*\.[a-z]{2,}(?:/[^\s<>()\"']*)?)",
    re.IGNORECASE,
)
_PRICE = re.compile(
    rf"(?P<sym>[$€£])\s?(?P<a>{_NUM})"
    rf"|(?P<code>\b(?:USD|EUR|GBP))\s?(?P<b>{_NUM})"
    rf"|(?P<c>{_NUM})\s?(?P<after>USD|EUR|GBP|(?:US\s+)?dollars?|euros?|pounds?)\b",
    re.IGNORECASE,
)
_QUANTITY = re.compile(rf"(?P<n>{_ANY_NUM})(?:\s?|-)(?P<unit>{_unit_pattern()})"
                       rf"(?P<per>\s*(?:/|per\s+|an?\s+)(?:second|minute|hour|day|week|month|year|s|min|h)\b)?",
                       re.IGNORECASE)
_BARE_NUMBER = re.compile(rf"(?<![\w.]){_NUM}(?![\w])")
_NAME = re.compile(r"\b[A-Z][\w'-]*(?:\s+[A-Z][\w'-]*)*")
_SENTENCE_START = re.compile(r"(?:^|[.!?:;]\s+|\n\s*|[-*•]\s+|\d+\.\s+)$")
_NOT_NAMES = {"i", "i'm", "i'll", "i've", "i'd", "ok", "okay"}
# acronyms of general words, not names of a product
_ACRONYMS = {"API", "HTTP", "HTTPS", "ID", "ZIP", "URL", "PDF", "CSV", "JSON", "FAQ", "UI", "IP", "SSO", "TLS"}
# words that start sentences: left out of a name that begins a sentence ("The Pro plan")
_STARTERS = {"the", "a", "an", "our", "your", "yes", "no", "on", "in", "to", "for", "go", "open", "use",
             "please", "with", "at", "all", "each", "if", "when", "then", "and", "or", "but", "you",
             "we", "it", "this", "that", "sure", "hi", "hello", "thanks", "sorry", "click", "choose"}
_QUOTED = re.compile(r"[\"“”]([^\"“”\n]{1,60})[\"“”]")
_TLDS_THAT_ARE_WORDS = {"e.g", "i.e", "etc"}


@dataclass(frozen=True)
class Fact:
    kind: str  # price, quantity, number, url, email, name
    value: str  # normal form
    text: str  # as written

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.value}"


def _number(text: str) -> str:
    text = text.lower()
    if text in _NUMBER_WORDS:
        return str(_NUMBER_WORDS[text])
    cleaned = text.replace(",", "") if re.fullmatch(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?", text) else text.replace(",", ".")
    try:
        value = Decimal(cleaned).normalize()
    except InvalidOperation:
        return text
    return format(value, "f")


def _unit(text: str) -> str:
    spelled = re.sub(r"\s+", " ", text.lower())
    if spelled in _UNITS:
        return _UNITS[spelled]
    for suffix in ("es", "s"):
        if spelled.endswith(suffix) and spelled[: -len(suffix)] in _UNITS:
            return _UNITS[spelled[: -len(suffix)]]
    return spelled


def _per(text: str | None) -> str:
    if not text:
        return ""
    word = re.sub(r"^\s*(?:/|per\s+|an?\s+)", "", text.lower()).strip()
    return "/" + {"s": "second", "min": "minute", "h": "hour"}.get(word, word)


def _normal_url(text: str) -> str:
    url = re.sub(r"^https?://", "", text.lower())
    url = url.removeprefix("www.")
    return url.rstrip(".,;:!?)'\"").rstrip("/")


def extract_facts(text: str) -> list[Fact]:
    """The checkable facts of a text, in order of appearance, each once (see the module doc)."""
    facts: list[Fact] = []
    taken = [False] * len(text)

    def free(m: re.Match) -> bool:
        return not any(taken[m.start():m.end()])

    def take(m: re.Match, kind: str, value: str) -> None:
        for i in range(m.start(), m.end()):
            taken[i] = True
        facts.append(Fact(kind, value, m.group(0).strip().rstrip(".,;:!?")))

    for m in _EMAIL.finditer(text):
        take(m, "email", m.group(0).lower())
    for m in _QUOTED.finditer(text):  # a button or menu label: "Forgot password"
        label = " ".join(m.group(1).split()).strip(" .,")
        if label and len(label.split()) <= 6 and not _EMAIL.search(label):
            take(m, "name", label.lower())
            facts[-1] = Fact("name", label.lower(), label)
    for m in _URL.finditer(text):
        if not free(m) or m.group(0).lower().rstrip(".") in _TLDS_THAT_ARE_WORDS:
            continue
        host = _normal_url(m.group(0)).split("/")[0]
        if re.fullmatch(r"[\d.]+", host):  # 2.5 is a number, not a domain
            continue
        take(m, "url", _normal_url(m.group(0)))
    for m in _PRICE.finditer(text):
        if not free(m):
            continue
        amount = m.group("a") or m.group("b") or m.group("c")
        currency = m.group("sym") or m.group("code") or m.group("after")
        currency = re.sub(r"\s+", " ", currency.lower()).removesuffix("s")
        take(m, "price", f"{_CURRENCIES.get(currency, currency.upper())} {_number(amount)}")
    for m in _QUANTITY.finditer(text):
        if free(m):
            take(m, "quantity", f"{_number(m.group('n'))} {_unit(m.group('unit'))}{_per(m.group('per'))}")
    for m in _BARE_NUMBER.finditer(text):
        if free(m):
            take(m, "number", _number(m.group(0)))
    for m in _NAME.finditer(text):
        if not free(m):
            continue
        words = m.group(0).split()
        if _SENTENCE_START.search(text[: m.start()]) and (len(words) == 1 or words[0].lower() in _STARTERS):
            words = words[1:]  # the sentence's first word is capitalised anyway
        words = [w for w in words if w.lower() not in _NOT_NAMES]
        if len(words) == 1 and words[0] in _ACRONYMS:
            continue
        if words:
            name = " ".join(words).strip("'-")
            if name:
                facts.append(Fact("name", name.lower(), name))
    seen: set[str] = set()
    unique = []
    for fact in sorted(facts, key=lambda f: text.find(f.text)):
        if fact.key not in seen:
            seen.add(fact.key)
            unique.append(fact)
    return unique


def states(answer: str, fact: Fact, answer_facts: set[str] | None = None) -> bool:
    """Whether `answer` states `fact` (a fact of the reference)."""
    if fact.kind == "name":
        return re.search(rf"(?<!\w){re.escape(fact.value)}(?!\w)", answer.lower()) is not None
    if fact.kind in ("url", "email"):
        return fact.value in answer.lower()
    if answer_facts is None:
        answer_facts = {f.key for f in extract_facts(answer)}
    return fact.key in answer_facts


def fact_check(reference: str, answer: str) -> dict[str, Any]:
    """{"facts": [...], "stated": [...], "missed": [...]} (facts as written in the reference)."""
    facts = extract_facts(reference)
    answer_facts = {f.key for f in extract_facts(answer)}
    stated = [f for f in facts if states(answer, f, answer_facts)]
    missed = [f for f in facts if f not in stated]
    return {"facts": [f.text for f in facts], "stated": [f.text for f in stated], "missed": [f.text for f in missed]}


def fact_recall(reference: str, answer: str) -> float | None:
    """Share of the reference's facts the answer states; None when the reference has none."""
    check = fact_check(reference, answer)
    return len(check["stated"]) / len(check["facts"]) if check["facts"] else None


# ---------------------------------------------------------------------------------------- rouge

_SCORER = None


def rouge_l(reference: str, answer: str) -> float:
    """ROUGE-L F1 (rouge-score, Porter stemming) of an answer against its reference."""
    global _SCORER
    if _SCORER is None:
        from rouge_score import rouge_scorer

        _SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return float(_SCORER.score(reference, answer)["rougeL"].fmeasure)


# ---------------------------------------------------------------------------------------- score


def score_answers(questions: Sequence[dict[str, Any]], answers: Sequence[str]) -> dict[str, Any]:
    """Answer metrics of one model: {"rouge_l", "fact_recall", "facts", "facts_stated",
    "questions", "questions_with_facts", "rows": one per question}."""
    if len(questions) != len(answers):
        raise ValueError(f"{len(answers)} answers for {len(questions)} questions")
    rows, total, stated, rouge_sum, with_facts = [], 0, 0, 0.0, 0
    for question, answer in zip(questions, answers):
        check = fact_check(question["reference"], answer)
        score = rouge_l(question["reference"], answer)
        rouge_sum += score
        total += len(check["facts"])
        stated += len(check["stated"])
        with_facts += bool(check["facts"])
        rows.append({"rouge_l": round(score, 4), **check})
    count = len(questions)
    return {
        "rouge_l": round(rouge_sum / count, 6) if count else None,
        "fact_recall": round(stated / total, 6) if total else None,
        "facts": total,
        "facts_stated": stated,
        "questions": count,
        "questions_with_facts": with_facts,
        "rows": rows,
    }


def answer_report(questions: Sequence[dict[str, Any]], *, base: Sequence[str],
                  fine_tuned: Sequence[str]) -> dict[str, Any]:
    """Both models' answer metrics and, per question, the answers with the facts each missed."""
    tuned, before = score_answers(questions, fine_tuned), score_answers(questions, base)
    per_question = []
    for question, answer, base_answer, row, base_row in zip(questions, fine_tuned, base, tuned["rows"],
                                                            before["rows"]):
        per_question.append({
            "question": question["messages"][-1]["content"],
            "reference": question["reference"],
            "facts": row["facts"],
            "fine_tuned": answer,
            "fine_tuned_missed": row["missed"],
            "fine_tuned_rouge_l": row["rouge_l"],
            "base": base_answer,
            "base_missed": base_row["missed"],
            "base_rouge_l": base_row["rouge_l"],
        })
    keys = ("rouge_l", "fact_recall", "facts", "facts_stated", "questions", "questions_with_facts")
    return {
        "fine_tuned": {k: tuned[k] for k in keys},
        "base": {k: before[k] for k in keys},
        "per_question": per_question,
    }


def answers_warning(report: dict[str, Any]) -> str | None:
    """A sentence when the fine-tuned model's answers are worse than the base model's."""
    tuned, base = report["fine_tuned"], report["base"]
    worse = []
    if tuned["fact_recall"] is not None and base["fact_recall"] is not None \
            and tuned["fact_recall"] < base["fact_recall"]:
        worse.append(f"fact recall {tuned['fact_recall']:.3f} vs {base['fact_recall']:.3f}")
    if tuned["rouge_l"] is not None and base["rouge_l"] is not None and tuned["rouge_l"] < base["rouge_l"]:
        worse.append(f"ROUGE-L {tuned['rouge_l']:.3f} vs {base['rouge_l']:.3f}")
    if not worse:
        return None
    return (f"the fine-tuned model's answers are worse than the base model's on {tuned['questions']} "
            f"held-out questions: {', '.join(worse)} before fine-tuning; train longer (epochs), "
            "raise learningRate or check the data")
