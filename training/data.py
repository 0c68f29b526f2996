"""Training data: pairs/triplets and graded judgements, from our JSONL or ms-swift's formats.

Formats read (one JSON object per line; a bad line is reported with file:line and skipped):

* pairs / triplets: `{"query", "positive", "negatives"?: [..], "instruction"?}`
* pairs by id: `{"query", "doc_id" | "id", "negative_ids"?: [..], "label"?, "instruction"?}`: the
  positive (a document, or a chunk by `id`) and negative chunks named by id, resolved against
  the collection (`training.stored_chunks`); `twostage pairs from-feedback` writes these
* graded: `{"query", "document", "label"}` with label in [0, 1], or 1-5 (mapped to (l-1)/4)
* ms-swift embedding: `{"messages": [{"role": "user", "content": q}],
  "positive_messages": [[{"role": "user", "content": p}]], "negative_messages": [[...], ...]}`
* ms-swift reranker: `{"system"?, "input": "<Instruct>: i\\n<Query>: q\\n<Document>: d",
  "output": "yes"|"no"}`

Splits are by query (a hash of it), so a query never lands in both train and dev, and the
split does not change when the file is reordered or grows.
"""

import hashlib
import json
import random
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

from twostage.retrieval.core.errors import InputError
from twostage.retrieval.ingest.documents import BadRecord


@dataclass(frozen=True)
class Pair:
    """A query with a relevant passage and optional known-irrelevant ones."""

    query: str
    positive: str
    negatives: tuple[str, ...] = ()
    instruction: str | None = None


@dataclass(frozen=True)
class Graded:
    """A judged (query, document) with a target probability of relevance."""

    query: str
    document: str
    label: float
    instruction: str | None = None


T = TypeVar("T")


@dataclass
class LoadReport:
    examples: "list[Record]" = field(default_factory=list)
    bad: list[BadRecord] = field(default_factory=list)


_SWIFT_INPUT = re.compile(r"^<Instruct>: (?P<i>.*?)\n<Query>: (?P<q>.*?)\n<Document>: (?P<d>.*)$", re.S)


def load_examples(path: Path, *, strict: bool = False) -> LoadReport:
    """Every example in a JSONL file, whatever the (line by line detected) format."""
    if not path.exists():
        raise InputError(f"training data {str(path)!r} does not exist")
    with path.open(encoding="utf-8") as handle:
        examples, bad = parse_lines(handle, str(path), parse_example, strict, "examples")
    return LoadReport(cast("list[Record]", examples), bad)


def parse_lines(
    lines: Iterable[str],
    name: str,
    parse: Callable[[Any], T | BadRecord],
    strict: bool = False,
    what: str = "records",
) -> tuple[list[T], list[BadRecord]]:
    """Each JSON line through `parse`; a bad one is reported with `name:line` and skipped (raised
    when `strict`). No usable line at all is an error."""
    parsed: list[T] = []
    bad: list[BadRecord] = []
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        location = f"{name}:{line_no}"
        try:
            item = parse(json.loads(line))
        except json.JSONDecodeError as exc:
            item = BadRecord(location, f"invalid JSON ({exc.msg} at column {exc.colno})")
        except ValueError as exc:
            item = BadRecord(location, str(exc))
        if isinstance(item, BadRecord):
            if strict:
                raise InputError(str(item))
            bad.append(item if item.location == location else BadRecord(location, item.reason))
        else:
            parsed.append(item)
    if not parsed:
        raise InputError(f"no usable {what} in {name} ({len(bad)} bad lines)")
    return parsed, bad


@dataclass(frozen=True)
class Judgement:
    """A query and what answers it, named by id (`doc_id`, or a chunk's `id`) or by its text;
    as a training pair, with negative chunks by id and a graded `label` (1: certainly relevant)."""

    query: str
    doc_id: str | None = None
    chunk_id: str | None = None
    positive: str | None = None
    instruction: str | None = None
    negative_ids: tuple[str, ...] = ()
    label: float | None = None


Example = Pair | Graded  # what training reads
Record = Example | Judgement  # what a line may hold: pairs by id are resolved against a collection first


def _by_id(record: dict[str, Any]) -> Judgement:
    """`{query, doc_id | id, negative_ids?, label?, instruction?}`."""
    key = "doc_id" if "doc_id" in record else "id"
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, str | int) or not str(value).strip():
        raise ValueError(f"'{key}' must be a non-empty string or an integer")
    negatives = record.get("negative_ids") or []
    if not isinstance(negatives, list) or not all(isinstance(n, str) and n.strip() for n in negatives):
        raise ValueError("'negative_ids' must be a list of chunk ids")
    label = None if record.get("label") is None else _label(record["label"])
    return Judgement(
        _text(record, "query"), str(value) if key == "doc_id" else None, str(value) if key == "id" else None,
        instruction=_optional_text(record, "instruction"), negative_ids=tuple(negatives), label=label,
    )  # fmt: skip


def pair_row(record: "Pair | Judgement") -> dict[str, Any]:
    """A pair as a JSONL line holds it (`parse_example` reads it back as the same record)."""
    row: dict[str, Any] = {"query": record.query}
    if isinstance(record, Pair):
        row.update(positive=record.positive, negatives=list(record.negatives))
    elif record.positive is not None:
        row["positive"] = record.positive
    else:
        row.update({"doc_id": record.doc_id} if record.doc_id is not None else {"id": record.chunk_id})
        if record.negative_ids:
            row["negative_ids"] = list(record.negative_ids)
        if record.label is not None:
            row["label"] = record.label
    if record.instruction is not None:
        row["instruction"] = record.instruction
    return row


def parse_judgement(record: Any) -> Judgement | BadRecord:
    """`{query, doc_id}`, `{query, id}` (a chunk) or a `{query, positive}` pair, `instruction`?"""
    example = parse_example(record)
    if isinstance(example, Judgement):
        return example
    if isinstance(example, Pair):
        return Judgement(example.query, positive=example.positive, instruction=example.instruction)
    if isinstance(example, Graded):
        return BadRecord("", "a graded {query, document, label} record; judgements name what answers a "
                         "query: {query, doc_id}, {query, id} or {query, positive}")  # fmt: skip
    return BadRecord("", "expected {query, doc_id}, {query, id} (a chunk) or {query, positive}")


def parse_example(record: Any) -> "Record | BadRecord":
    """One record in any supported format; a `BadRecord` (location filled in by the caller) if unusable."""
    if not isinstance(record, dict):
        return BadRecord("", "a line must be a JSON object")
    if "positive" not in record and {"doc_id", "id"} & set(record):
        return _by_id(record)
    if "messages" in record:
        return _swift_embedding(record)
    if "input" in record and "output" in record:
        return _swift_reranker(record)
    instruction = _optional_text(record, "instruction")
    if "positive" in record:
        negatives = record.get("negatives") or []
        if not isinstance(negatives, list) or not all(isinstance(n, str) and n.strip() for n in negatives):
            return BadRecord("", "'negatives' must be a list of non-empty strings")
        return Pair(_text(record, "query"), _text(record, "positive"), tuple(negatives), instruction)
    if "document" in record:
        return Graded(
            _text(record, "query"), _text(record, "document"), _label(record.get("label")), instruction
        )
    return BadRecord(
        "", "expected {query, positive, negatives?}, {query, doc_id | id}, {query, document, label} or an "
        "ms-swift record",
    )  # fmt: skip


def _text(record: dict[str, Any], key: str) -> str:
    value = record.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"missing '{key}' (a non-empty string)")
    return value


def _optional_text(record: dict[str, Any], key: str) -> str | None:
    value = record.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"'{key}' must be a non-empty string")
    return value


def _label(value: Any) -> float:
    """[0, 1] as it is; 1-5 grades as (l - 1) / 4; anything else is an error."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("'label' must be a number in [0, 1] or a grade 1-5")
    if 0 <= value <= 1:
        return float(value)
    if 1 <= value <= 5:
        return (float(value) - 1) / 4
    raise ValueError(f"'label' {value} is outside [0, 1] and 1-5")


def _user_content(messages: Any, what: str) -> str:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"'{what}' must be a non-empty list of messages")
    users = [m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    if not users or not isinstance(users[-1], str) or not users[-1].strip():
        raise ValueError(f"'{what}' has no user message with content")
    return users[-1]


def _swift_embedding(record: dict[str, Any]) -> Example:
    query = _user_content(record["messages"], "messages")
    positives = record.get("positive_messages") or []
    if not positives:
        raise ValueError("ms-swift embedding record without 'positive_messages'")
    negatives = tuple(_user_content(m, "negative_messages") for m in record.get("negative_messages") or [])
    return Pair(query, _user_content(positives[0], "positive_messages"), negatives)


def _swift_reranker(record: dict[str, Any]) -> Example:
    match = _SWIFT_INPUT.match(_text(record, "input"))
    if match is None:
        raise ValueError(
            "ms-swift reranker 'input' must be '<Instruct>: ...\\n<Query>: ...\\n<Document>: ...'"
        )
    output = str(record.get("output", "")).strip().lower()
    if output not in {"yes", "no"}:
        raise ValueError("ms-swift reranker 'output' must be 'yes' or 'no'")
    return Graded(match["q"], match["d"], 1.0 if output == "yes" else 0.0, match["i"] or None)


R = TypeVar("R", Pair, Graded, Judgement, Example, Record)


def split_by_query(examples: Sequence[R], dev_fraction: float, seed: int = 0) -> tuple[list[R], list[R]]:
    """Deterministic train/dev split: a query's examples all go to one side."""
    if not 0 <= dev_fraction < 1:
        raise InputError(f"dev fraction must be in [0, 1), got {dev_fraction}")
    train: list[R] = []
    dev: list[R] = []
    for example in examples:
        digest = hashlib.sha256(f"{seed}\x1f{example.query}".encode()).digest()
        (dev if int.from_bytes(digest[:8], "big") / 2**64 < dev_fraction else train).append(example)
    return train, dev


def mix_general(
    domain: Sequence[Example], general: Sequence[Example], ratio: tuple[int, int] = (7, 3), seed: int = 0
) -> list[Example]:
    """Domain examples plus general-domain ones at `ratio` (domain:general), shuffled; limits forgetting.

    All domain examples are kept; general ones are sampled (without replacement, as many as
    the ratio asks and the set has).
    """
    if not general:
        return list(domain)
    want = round(len(domain) * ratio[1] / ratio[0])
    rng = random.Random(seed)
    mixed = list(domain) + rng.sample(list(general), min(want, len(general)))
    rng.shuffle(mixed)
    return mixed
