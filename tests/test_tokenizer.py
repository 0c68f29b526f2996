"""The rebuilt Qwen3 tokenizer is Qwen3's byte for byte, and tiktoken counts exactly like it."""

import hashlib
import json

import pytest
from transformers import AutoTokenizer

from twostage.retrieval.models.prompts import MAX_CHARS_PER_TOKEN
from twostage.retrieval.models.qwen_vocab import load_ranks
from twostage.retrieval.models.tiny import QWEN3_TOKENIZER_JSON_SHA256, TinyModelPaths
from twostage.retrieval.models.tokens import Qwen3Tokens

MIXED_TEXTS = [
    "Qdrant is a vector database & vector similarity search engine.",
    "如何在 Debian 上安装软件包？使用 apt-get install 命令。",
    "def last_token_pool(h, mask):\n    return h[:, -1]  # left padding\n\n\n\tindent\r\nwindows",
    "Ünïcödé cafe\u0301 naïve — “quotes” 日本語テキスト 한국어 텍스트 العربية русский",
    "<|im_start|>user\nhello<|im_end|>\n<think>\n\n</think>\n\n",
    "numbers 1234567890 3.14159 1e-5 0x1F   trailing spaces   ",
    "emoji 🚀🔥👍🏽 and math ∑∫√∞ ≤ ≥",
    "",
    "   ",
    "I'm, you're, they'll, it's, we've, I'd",
]


def test_reranker_tokenizer_json_is_qwen3_byte_for_byte(tiny_models: TinyModelPaths) -> None:
    raw = (tiny_models.reranker / "tokenizer.json").read_bytes()
    assert hashlib.sha256(raw).hexdigest() == QWEN3_TOKENIZER_JSON_SHA256
    assert len(raw) == 11_422_654


def test_embedding_tokenizer_differs_only_by_appending_endoftext(tiny_models: TinyModelPaths) -> None:
    base = json.loads((tiny_models.reranker / "tokenizer.json").read_bytes())
    emb = json.loads((tiny_models.embedder / "tokenizer.json").read_bytes())
    assert emb["post_processor"]["type"] == "TemplateProcessing"
    assert {k: v for k, v in emb.items() if k != "post_processor"} == {
        k: v for k, v in base.items() if k != "post_processor"
    }
    tok = AutoTokenizer.from_pretrained(tiny_models.embedder)
    assert tok("hello world")["input_ids"] == [14990, 1879, 151643]
    # truncation keeps the appended <|endoftext|>
    assert tok("a b c d e f", truncation=True, max_length=3)["input_ids"] == [64, 293, 151643]
    rerank_tok = AutoTokenizer.from_pretrained(tiny_models.reranker)
    assert rerank_tok("hello world")["input_ids"] == [14990, 1879]


def test_tiktoken_ids_equal_hf_tokenizer(tiny_models: TinyModelPaths) -> None:
    hf = AutoTokenizer.from_pretrained(tiny_models.reranker)
    tokens = Qwen3Tokens()
    for text in MIXED_TEXTS:
        assert tokens.encode(text) == hf.encode(text, add_special_tokens=False), text
    assert tokens.encode_batch(MIXED_TEXTS) == [hf.encode(t, add_special_tokens=False) for t in MIXED_TEXTS]


def test_tiktoken_normalises_to_nfc() -> None:
    tokens = Qwen3Tokens()
    assert tokens.encode("cafe\u0301") == tokens.encode("café")
    assert tokens.decode(tokens.encode("中文 text")) == "中文 text"
    assert tokens.count("<|endoftext|>") == 1


@pytest.mark.parametrize("word,expected", [("yes", 9693), ("no", 2152)])
def test_yes_no_ids_match_qwen3(tiny_models: TinyModelPaths, word: str, expected: int) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_models.reranker)
    assert tok.convert_tokens_to_ids(word) == expected
    assert tok.encode(word, add_special_tokens=False) == [expected]


def test_char_clip_bound_covers_longest_token() -> None:
    assert max(len(token) for token in load_ranks()) <= MAX_CHARS_PER_TOKEN
