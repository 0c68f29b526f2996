"""Fitting texts to a model's input length the way TEI's `truncate` and `truncation_direction` ask.

The models truncate on the right by themselves (the official recipes keep the beginning of a
text), so `right` needs nothing here. `left` keeps the end of a text instead: the longest
suffix of the caller's text whose whole model input (prompt, instruction and query included)
still fits, found by a binary search over start offsets, measured with the model's own
tokenizer. The prompt is never cut: only the caller's text is. `truncate=False` refuses an
input that does not fit (413, naming it and the limit) rather than scoring a part of it.

`windows` is the other answer for a reranker: a document longer than the model reads is cut
into overlapping windows that each fit, to be scored separately and given the best window's
score (what Cohere documents for long documents), so nothing past the window is ignored.
"""

import unicodedata
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from twostage.retrieval.models.tokens import Qwen3Tokens

from twostage.retrieval.core.errors import TooLarge
from twostage.retrieval.models.prompts import MAX_CHARS_PER_TOKEN

Side = Literal["left", "right"]

Lengths = Callable[[Sequence[str]], list[int]]


def keep_tail(text: str, fits: Callable[[str], bool], max_tokens: int) -> str:
    """The longest suffix of `text` for which `fits` holds (the empty suffix if none does).

    Only the last `(max_tokens + 64) * MAX_CHARS_PER_TOKEN` characters can matter, so a
    megabyte document costs a few tokenizations of a bounded tail, not of the whole text.
    """
    lo = max(0, len(text) - (max_tokens + 64) * MAX_CHARS_PER_TOKEN)
    hi = len(text)  # text[hi:] == "" is the fallback
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(text[mid:]):
            hi = mid
        else:
            lo = mid + 1
    return text[lo:]


def fit_texts(
    texts: Sequence[str],
    lengths: Lengths,
    limit: int,
    *,
    truncate: bool,
    side: Side,
    what: str,
) -> list[str]:
    """`texts`, each cut to fit `limit` tokens as measured by `lengths` (the whole model input).

    `truncate=False`: a text that does not fit is a `TooLarge` error naming it.
    `side="right"`: texts are returned as they are; the model keeps their beginning itself.
    """
    if side == "right" and truncate:
        return list(texts)
    counts = lengths(texts)
    out = list(texts)
    for i, (text, count) in enumerate(zip(texts, counts, strict=True)):
        if count <= limit:
            continue
        if not truncate:
            raise TooLarge(
                f"{what}[{i}] takes {count} tokens, more than the {limit} the model reads: shorten it, "
                "or send truncate=true"
            )
        out[i] = keep_tail(text, lambda tail: lengths([tail])[0] <= limit, limit)
    return out


WINDOW_OVERLAP = 0.25  # of a window, repeated at the start of the next one
_MIN_WINDOW = 8


def windows(text: str, lengths: Lengths, limit: int, tokens: "Qwen3Tokens") -> list[str]:
    """`text` itself when its whole model input fits `limit`, else overlapping windows that do.

    Windows are cut at Qwen3 token boundaries, sized from the room the prompt and query leave
    and shrunk until the model's own tokenizer (through `lengths`) counts every one within
    `limit`. When the query alone leaves no room, the text is returned whole (the model
    truncates it, as it would without windows).
    """
    if lengths([text])[0] <= limit:
        return [text]
    room = limit - lengths([""])[0]
    if room < _MIN_WINDOW:
        return [text]
    text = unicodedata.normalize("NFC", text)  # the offsets below index the NFC text
    ids = tokens.encode(text)
    _, offsets = tokens.encoding.decode_with_offsets(ids)
    size = room
    while True:
        step = max(1, int(size * (1 - WINDOW_OVERLAP)))
        starts = list(range(0, max(len(ids) - size, 0) + 1, step))
        if starts[-1] + size < len(ids):
            starts.append(len(ids) - size)
        cut = [text[offsets[a] : offsets[a + size] if a + size < len(ids) else len(text)] for a in starts]
        worst = max(lengths(cut))
        if worst <= limit or size <= _MIN_WINDOW:
            return cut
        size = max(_MIN_WINDOW, min(size - 1, int(size * room / max(worst - (limit - room), 1) * 0.95)))
