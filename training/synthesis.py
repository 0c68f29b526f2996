"""Pairs from the corpus itself, for a cold start (`twostage pairs synthesize`).

An LLM writes a query for each sampled chunk (the InPars / Promptagator recipe) and the query is
kept only when the deployed retriever, searching as it serves, finds that chunk in its top k
(the round-trip filter: a query the system cannot connect to its passage is more often a bad
query than a hard one). The LLM is an OpenAI-compatible chat endpoint (vLLM, Ollama, OpenAI:
`POST {url}/v1/chat/completions`) or, offline, a local causal LM run here through transformers
(`--llm local`; SmolLM2 in this repository's tests: the path is real, its queries are poor).

Chunk text is a stranger's: it reaches the LLM with its chat markers escaped (a zero-width space
after the `<`), so a passage cannot close the user turn and speak as the assistant.
"""

import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from twostage.retrieval.core.errors import InputError, ModelLoadError, RemoteUnavailable
from twostage.retrieval.models.remote import RemoteClient, escape_markers
from twostage.retrieval.search.two_stage import Deployment, SearchQuery, search
from twostage.retrieval.store.vector_store import VectorStore
from twostage.training.data import Judgement, pair_row, split_by_query
from twostage.training.settings import SynthesisSettings, TrainingSettings

Say = Callable[[str], None]
_LEAD = re.compile(r"^\s*(?:(?:question|query|q)\s*[:\-]\s*|[-*\d.)\s]+)", re.I)


class QueryWriter(Protocol):
    """Writes `n` queries for each passage (fewer where the model answered nothing usable)."""

    name: str

    def write(self, passages: Sequence[str], n: int) -> list[list[str]]: ...


def prompt_for(template: str, passage: str, max_chars: int) -> str:
    """The user message: the template with `{passage}` replaced (a plain replace: braces in a
    template or a passage mean nothing), the passage cut to `max_chars` and its markers escaped."""
    return template.replace("{passage}", escape_markers(passage[:max_chars]))


def clean_query(text: str) -> str | None:
    """The first non-empty line, without a "Question:" lead or list marker, quotes or <think> blocks."""
    text = re.sub(r"<think>.*?</think>", "", text, flags=re.S)
    for line in text.splitlines():
        line = _LEAD.sub("", line).strip().strip("\"“”'").strip()
        if len(line) >= 4:
            return line[:500]
    return None


class ChatEndpoint:
    """An OpenAI-compatible chat completions endpoint (retries, backoff and a breaker: `RemoteClient`)."""

    def __init__(self, url: str, model: str, cfg: SynthesisSettings) -> None:
        self.name = f"{model} at {url}"
        self.model, self.cfg = model, cfg
        self.client = RemoteClient(cfg.llm.model_copy(update={"url": url}), "llm")

    def write(self, passages: Sequence[str], n: int) -> list[list[str]]:
        out = []
        for passage in passages:
            body = {
                "model": self.model, "n": n, "temperature": self.cfg.temperature,
                "max_tokens": self.cfg.max_new_tokens,
                "messages": [{"role": "user", "content": prompt_for(self.cfg.prompt, passage,
                                                                    self.cfg.max_passage_chars)}],
            }  # fmt: skip
            answer = self.client.post("/v1/chat/completions", body)
            try:
                texts = [str(c["message"]["content"] or "") for c in answer["choices"]]
            except (KeyError, TypeError) as exc:
                raise self.client.bad_answer(f"no choices[].message.content ({exc})") from None
            out.append([q for q in map(clean_query, texts) if q])
        return out

    def close(self) -> None:
        self.client.close()


class LocalWriter:
    """A causal LM with a chat template, run here through transformers (sampling, seeded)."""

    def __init__(self, model: str, settings: TrainingSettings, seed: int = 0) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from twostage.retrieval.models.devices import resolve_device
        from twostage.retrieval.models.source import resolve_model

        source = resolve_model(model, cache_dir=settings.cache_dir)
        self.name = f"{model} (local)"
        self.cfg = settings.synthesis
        self.device = resolve_device(settings.device)
        self.tokenizer = AutoTokenizer.from_pretrained(source.path)
        if self.tokenizer.chat_template is None:
            raise ModelLoadError(
                f"{model} has no chat template: --llm local needs an instruction-tuned model"
            )
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        loaded = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype)
        self.model = loaded.to(self.device).eval()  # type: ignore[arg-type]
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        markers = sorted(self.tokenizer.all_special_tokens, key=len, reverse=True)
        self._markers = re.compile("|".join(re.escape(t) for t in markers if t.startswith("<")))

    def user_message(self, passage: str) -> str:
        """The prompt for one chunk, its text escaped of this model's own special tokens (they need
        not be Qwen3's): what reaches the model as the user's message."""
        text = prompt_for(self.cfg.prompt, passage, self.cfg.max_passage_chars)
        return self._markers.sub(lambda m: m.group(0)[0] + "\u200b" + m.group(0)[1:], text)

    def write(self, passages: Sequence[str], n: int) -> list[list[str]]:
        import torch

        messages = [[{"role": "user", "content": self.user_message(p)}] for p in passages]
        prompts = [
            self.tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
            for m in messages
        ]
        batch = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        batch = batch.to(self.device)
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=self.generator)))
        with torch.inference_mode():
            generated = self.model.generate(
                **batch, max_new_tokens=self.cfg.max_new_tokens, do_sample=True,
                temperature=self.cfg.temperature, top_p=0.95, num_return_sequences=n,
                pad_token_id=self.tokenizer.pad_token_id,
            )  # fmt: skip
        texts = self.tokenizer.batch_decode(
            generated[:, batch["input_ids"].shape[1] :], skip_special_tokens=True
        )
        return [[q for q in map(clean_query, texts[i * n : (i + 1) * n]) if q] for i in range(len(passages))]

    def close(self) -> None:
        pass


@dataclass
class Synthesized:
    pairs: list[Judgement] = field(default_factory=list)
    chunks: int = 0  # chunks sampled
    written: int = 0  # queries the LLM wrote
    kept: int = 0  # of them, found by the deployed retriever in its top k
    dev_queries: set[str] = field(default_factory=set)
    writer: str = ""
    failed: list[str] = field(default_factory=list)  # chunks the LLM failed on, with why


def sample_chunks(store: VectorStore, collection: str, count: int, seed: int) -> list[tuple[str, str]]:
    """`count` (chunk id, text) drawn uniformly without replacement, the same for the same seed."""
    chunks = [(r.id, str(r.payload.get("text", ""))) for r in store.scroll(collection, fields=["text"])]
    chunks = [c for c in chunks if c[1].strip()]
    if not chunks:
        raise InputError(f"{collection} has no chunks to write queries for: ingest documents first")
    return random.Random(seed).sample(chunks, min(count, len(chunks)))


def synthesize(
    settings: TrainingSettings, store: VectorStore, deployment: Deployment, writer: QueryWriter, *,
    chunks: int, per_chunk: int, seed: int = 0, say: Say = print,
) -> Synthesized:  # fmt: skip
    """Queries for `chunks` sampled chunks, kept by the round-trip filter (see the module doc)."""
    cfg = settings.synthesis
    instruction = cfg.instruction or settings.embedder.instruction
    out = Synthesized(writer=writer.name)
    sampled = sample_chunks(store, deployment.collection, chunks, seed)
    out.chunks = len(sampled)
    batch = max(1, cfg.batch)
    for start in range(0, len(sampled), batch):
        part = sampled[start : start + batch]
        try:
            written = writer.write([text for _, text in part], per_chunk)
        except RemoteUnavailable as exc:  # one failed call is reported; the rest goes on
            out.failed += [f"{chunk_id}: {exc}" for chunk_id, _ in part]
            continue
        for (chunk_id, _), queries in zip(part, written, strict=True):
            for query in dict.fromkeys(queries):
                out.written += 1
                found = search(deployment, store, SearchQuery(query, top_k=cfg.top_k, top_n=cfg.top_k,
                                                              instruction=instruction), settings)  # fmt: skip
                if any(h.id == chunk_id for h in found.hits):
                    out.kept += 1
                    out.pairs.append(Judgement(query, chunk_id=chunk_id, instruction=instruction))
        say(f"{min(start + batch, len(sampled))}/{len(sampled)} chunks: {out.written} queries written, "
            f"{out.kept} kept")  # fmt: skip
    _, dev = split_by_query(out.pairs, settings.retrain.dev_fraction)
    out.dev_queries = {j.query for j in dev}
    return out


def write_pairs(made: Synthesized, path: Path) -> None:
    """One JSON line a pair, with its split and where it came from."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for pair in made.pairs:
            split = "dev" if pair.query in made.dev_queries else "train"
            row: dict[str, Any] = {**pair_row(pair), "split": split, "source": f"synthetic: {made.writer}"}
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
