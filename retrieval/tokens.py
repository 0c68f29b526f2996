"""Token counting with tiktoken over Qwen3's vocabulary.

This is what the chunker counts with: it gives the same ids as the Hugging Face Qwen3
tokenizer (NFC normalisation, Qwen's split pattern, the 26 added tokens recognised in text)
at a fraction of the cost, and it needs no model directory. The ranks are passed to
tiktoken directly, so tiktoken never downloads or writes a cache file.
"""

import unicodedata
from collections.abc import Sequence

import tiktoken

from retrieval.qwen_vocab import SPLIT_PATTERN, load_ranks, special_token_ids


class Qwen3Tokens:
    """Encode/decode/count exactly like Qwen3's tokenizer. Build once and pass it around."""

    def __init__(self) -> None:
        self.encoding = tiktoken.Encoding(
            name="qwen3",
            pat_str=SPLIT_PATTERN,
            mergeable_ranks=load_ranks(),
            special_tokens=special_token_ids(),
        )

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (added tokens such as `<|im_end|>` written in the text count as one)."""
        return self.encoding.encode(unicodedata.normalize("NFC", text), allowed_special="all")

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of many texts, encoded on tiktoken's thread pool."""
        normalised = [unicodedata.normalize("NFC", t) for t in texts]
        return self.encoding.encode_batch(normalised, allowed_special="all")

    def count(self, text: str) -> int:
        """Number of tokens in `text`."""
        return len(self.encode(text))

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; invalid UTF-8 at a cut inside a character becomes U+FFFD."""
        return self.encoding.decode(list(ids), errors="replace")
