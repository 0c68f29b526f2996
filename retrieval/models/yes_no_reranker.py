"""Qwen3-Reranker semantics for any causal LM whose `yes` and `no` are single tokens.

score = P(yes | prompt) over {yes, no} = sigmoid(z_yes - z_no) at the last position, with
the exact prefix / body / suffix of the Qwen3-Reranker model card; only the document is
truncated, so the prefix and suffix always survive at max length. The sigmoid is taken in
float64, so `log(p / (1 - p))` gives z back (TEI's `raw_scores`) wherever |z| < 36.

Three things make it faster than the recipe without changing a score beyond float noise:

* The prompt up to the document (system prefix, instruction, query) is the same for every
  document of a query. It is run once and its key/value cache is shared by all documents,
  so each pair only pays for its own document and the suffix.
* On a CPU the documents go back to back in packed rows of up to 2,048 tokens (`packed_attention`):
  no padding, and matrix products over about 2,000 rows instead of a few hundred, where oneDNN
  runs faster. Elsewhere (CUDA) they are sorted by length and grouped under a padded-token budget.
* z_yes - z_no is one dot product of the last hidden state with (W_yes - W_no); no
  vocabulary-sized logits are computed for any position.

`score_many` serves several rerank calls (different queries, as gathered by the service's
micro-batcher) in shared forward passes: each query's prefix cache is computed once, the caches
are laid side by side (packed rows) or left-padded to one width and masked (padded batches), and
documents of all queries share the passes with their own position ids, so results equal one
`score` call per query.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DynamicCache,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from twostage.retrieval.core.errors import InputError, ModelLoadError
from twostage.retrieval.models.batching import right_pad, token_budget_batches, token_packs
from twostage.retrieval.models.numerics import bf16_matmuls, causal_lm_dtype, numeric_path
from twostage.retrieval.models.packed_attention import (
    PACK_TOKENS,
    PACKED_ATTENTION,
    pack_row,
    packs_documents,
)
from twostage.retrieval.models.prompts import (
    DOCUMENT_TAG,
    RERANKER_PREFIX,
    RERANKER_SUFFIX,
    clip_for_tokens,
    require_text,
    require_texts,
    reranker_document_part,
    reranker_query_part,
)
from twostage.retrieval.models.reranker import RerankMixin, RerankRequest
from twostage.retrieval.models.settings import RerankerSettings
from twostage.retrieval.models.source import ModelSource, model_identity
from twostage.retrieval.models.tokens import TokenCounter, split_markers_in_text


def single_token_id(tokenizer: PreTrainedTokenizerBase, word: str, model_name: str) -> int:
    """The id of `word`, which must be one token both as a vocabulary entry and when encoded."""
    encoded = tokenizer.encode(word, add_special_tokens=False)
    token_id = tokenizer.convert_tokens_to_ids(word)
    if not isinstance(token_id, int) or len(encoded) != 1 or encoded[0] != token_id:
        raise ModelLoadError(
            f"{model_name} cannot be a yes/no reranker: {word!r} is not a single token of its vocabulary "
            f"(it encodes to {encoded})"
        )
    return token_id


@dataclass(frozen=True)
class PromptTokens:
    """Token ids of one (instruction, query) prompt, split where documents are inserted."""

    shared: list[int]  # system prefix + "<Instruct>: ...\n<Query>: ...\n"
    documents: list[list[int]]  # "<Document>: ..." per document, already truncated
    suffix: list[int]

    def full(self, i: int) -> list[int]:
        """The whole prompt of document `i`, as the official recipe builds it."""
        return self.shared + self.documents[i] + self.suffix


def per_prompt(scores: Sequence[float], prompts: Sequence[PromptTokens]) -> list[list[float]]:
    """Scores of all prompts' documents, in order, split back per prompt."""
    out: list[list[float]] = []
    start = 0
    for prompt in prompts:
        out.append(list(scores[start : start + len(prompt.documents)]))
        start += len(prompt.documents)
    return out


class YesNoReranker(RerankMixin):
    """Causal-LM reranker with the Qwen3-Reranker template and a shared-prefix KV cache."""

    family = "yes-no"
    probabilities = True

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        model_id: str,
        max_length: int = 8192,
        batch_tokens: int = 16384,
        instruction: str,
        packed: bool = False,
    ) -> None:
        self.model = model
        self.tokenizer = split_markers_in_text(tokenizer)  # query, instruction, document: text only
        self._model_id = model_id
        self.max_length = max_length
        self.batch_tokens = batch_tokens
        # documents back to back in rows of up to `pack_tokens` (`packed_attention`): set where
        # the model's attention is segment-aware; right with any attention, fast only with those
        self.packed = packed and getattr(model.config, "_attn_implementation", None) in PACKED_ATTENTION
        self.pack_tokens = PACK_TOKENS
        self.instruction = require_text(instruction, "instruction")
        self.yes_id = single_token_id(tokenizer, "yes", model_id)
        self.no_id = single_token_id(tokenizer, "no", model_id)
        # the template's own chat markers are the only control tokens of a prompt
        template = {"add_special_tokens": False, "split_special_tokens": False}
        self._prefix_ids = tokenizer.encode(RERANKER_PREFIX, **template)
        self._suffix_ids = tokenizer.encode(RERANKER_SUFFIX, **template)
        self._tag_len = len(tokenizer.encode(DOCUMENT_TAG, add_special_tokens=False))
        self._pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.no_id
        head = model.get_output_embeddings()
        if head is None:
            raise ModelLoadError(f"{model_id} has no language-model head to read yes/no from")
        weight = head.weight.detach()
        # formed in fp32 from the rows as stored (bf16 or fp32): a bf16 subtraction would round it
        self._direction = weight[self.yes_id].float() - weight[self.no_id].float()
        bias = getattr(head, "bias", None)
        self._offset = 0.0 if bias is None else float(bias[self.yes_id].float() - bias[self.no_id].float())
        self._decoder = model.get_decoder()
        self._counter = TokenCounter(self.tokenizer)  # lengths for callers in other threads

    @classmethod
    def load(
        cls,
        source: ModelSource,
        cfg: RerankerSettings,
        *,
        device: torch.device,
        dtype: torch.dtype,
        cache_dir: Path,
    ) -> "YesNoReranker":
        """Load a causal LM from a resolved model directory."""
        try:
            tokenizer = AutoTokenizer.from_pretrained(source.path)
            weights = causal_lm_dtype(dtype, device)
            model = AutoModelForCausalLM.from_pretrained(source.path, dtype=weights).to(device).eval()  # type: ignore[arg-type]
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot load reranker {source.name!r} from {source.path}: {exc}") from exc
        bf16_matmuls(model.get_decoder(), dtype, device)  # the head only gives its yes/no rows, in fp32
        packed = packs_documents(model, device)
        return cls(
            model,
            tokenizer,
            model_id=model_identity(source, cache_dir),
            max_length=cfg.max_length,
            batch_tokens=cfg.batch_tokens,
            instruction=cfg.instruction,
            packed=packed,
        )

    @property
    def model_id(self) -> str:
        return self._model_id

    @property
    def numerics(self) -> str:
        return numeric_path(self.model)

    def prompt_tokens(
        self, query: str, documents: Sequence[str], instruction: str | None = None
    ) -> PromptTokens:
        """Tokenize and truncate exactly as the official recipe does, split at the document."""
        require_text(query, "query")
        docs = require_texts(documents, "documents", allow_empty_items=True)
        task = self.instruction if instruction is None else require_text(instruction, "instruction")
        shared = self._prefix_ids + self.tokenizer.encode(
            reranker_query_part(task, query), add_special_tokens=False, split_special_tokens=True
        )
        room = self.max_length - len(shared) - len(self._suffix_ids)
        if room <= self._tag_len:
            used = len(shared) - len(self._prefix_ids)
            raise InputError(
                f"instruction and query take {used} tokens, which leaves no room "
                f"for a document within the reranker's max_length of {self.max_length} tokens"
            )
        bodies = [reranker_document_part(clip_for_tokens(d, room)) for d in docs]
        encoded = (
            self.tokenizer(bodies, add_special_tokens=False, split_special_tokens=True)["input_ids"]
            if bodies
            else []
        )
        return PromptTokens(shared, [ids[:room] for ids in encoded], self._suffix_ids)

    def input_lengths(
        self, query: str, documents: Sequence[str], instruction: str | None = None
    ) -> list[int]:
        task = self.instruction if instruction is None else require_text(instruction, "instruction")
        fixed = len(self._prefix_ids) + len(self._suffix_ids)
        fixed += self._counter.count([reranker_query_part(task, query)], add_special_tokens=False)[0]
        bodies = [reranker_document_part(clip_for_tokens(d, self.max_length)) for d in documents]
        return [fixed + n for n in self._counter.count(bodies, add_special_tokens=False)]

    def score(self, query: str, documents: Sequence[str], instruction: str | None = None) -> list[float]:
        prompt = self.prompt_tokens(query, documents, instruction)
        if not prompt.documents:
            return []
        return self._score_packed([prompt])[0] if self.packed else self._score(prompt)

    def score_many(self, requests: Sequence[RerankRequest]) -> list[list[float]]:
        """`[score(q, docs, instruction) for ...]`, with the documents of all requests batched together."""
        prompts = [self.prompt_tokens(q, docs, instruction) for q, docs, instruction in requests]
        live = [k for k, p in enumerate(prompts) if p.documents]
        out: list[list[float]] = [[] for _ in prompts]
        if len(live) == 1 and not self.packed:
            out[live[0]] = self._score(prompts[live[0]])
        elif live:
            across = self._score_packed if self.packed else self._score_across
            for k, scores in zip(live, across([prompts[k] for k in live]), strict=True):
                out[k] = scores
        return out

    @torch.inference_mode()
    def _score_across(self, prompts: Sequence[PromptTokens]) -> list[list[float]]:
        device = self.model.device
        widths = [len(p.shared) for p in prompts]
        width = max(widths)
        keys: list[torch.Tensor] = []
        values: list[torch.Tensor] = []
        for q, prompt in enumerate(prompts):  # each prefix exactly as in `_score`, then left-padded
            cache = self._decoder(
                input_ids=torch.tensor([prompt.shared], dtype=torch.long, device=device), use_cache=True
            ).cache
            for layer, (k, v, *_) in enumerate(cache):
                if q == 0:
                    keys.append(k.new_zeros((len(prompts), *k.shape[1:2], width, k.shape[-1])))
                    values.append(v.new_zeros((len(prompts), *v.shape[1:2], width, v.shape[-1])))
                keys[layer][q, :, width - widths[q] :] = k[0]
                values[layer][q, :, width - widths[q] :] = v[0]
        rows = [(q, doc + p.suffix) for q, p in enumerate(prompts) for doc in p.documents]
        scores = [0.0] * len(rows)
        for batch in token_budget_batches([len(t) for _, t in rows], self.batch_tokens):
            owner = torch.tensor([rows[i][0] for i in batch], device=device)
            tails = [rows[i][1] for i in batch]
            ids = right_pad(tails, self._pad_id, device)
            span = torch.arange(ids.shape[1], device=device)
            lengths = torch.tensor([len(t) for t in tails], device=device)
            prefix_len = torch.tensor(widths, device=device)[owner]
            mask = torch.cat(
                [
                    torch.arange(width, device=device)[None, :] >= (width - prefix_len)[:, None],
                    span[None, :] < lengths[:, None],
                ],
                dim=1,
            ).long()
            cache = DynamicCache([(k[owner], v[owner]) for k, v in zip(keys, values, strict=True)])
            hidden = self._decoder(
                input_ids=ids,
                attention_mask=mask,
                position_ids=prefix_len[:, None] + span[None, :],
                cache=cache,
                use_cache=True,
            ).last_hidden_state
            last = hidden[torch.arange(len(tails), device=device), lengths - 1]
            z = last.float() @ self._direction.to(device) + self._offset
            for i, s in zip(batch, torch.sigmoid(z.double()).tolist(), strict=True):
                scores[i] = s
        return per_prompt(scores, prompts)

    @torch.inference_mode()
    def _score(self, prompt: PromptTokens) -> list[float]:
        device = self.model.device
        shared = torch.tensor([prompt.shared], dtype=torch.long, device=device)
        prefix_cache = self._decoder(input_ids=shared, use_cache=True).cache
        tails = [doc + prompt.suffix for doc in prompt.documents]
        scores = [0.0] * len(tails)
        for batch in token_budget_batches([len(t) for t in tails], self.batch_tokens):
            rows = [tails[i] for i in batch]
            cache = DynamicCache(
                [
                    (k.expand(len(rows), -1, -1, -1), v.expand(len(rows), -1, -1, -1))
                    for k, v, *_ in prefix_cache
                ]
            )
            hidden = self._decoder(
                input_ids=right_pad(rows, self._pad_id, device), cache=cache, use_cache=True
            ).last_hidden_state
            last = hidden[torch.arange(len(rows), device=device), torch.tensor([len(r) - 1 for r in rows])]
            z = last.float() @ self._direction.to(device) + self._offset
            for i, s in zip(batch, torch.sigmoid(z.double()).tolist(), strict=True):
                scores[i] = s
        return scores

    @torch.inference_mode()
    def _score_packed(self, prompts: Sequence[PromptTokens]) -> list[list[float]]:
        """The documents of all `prompts` in packed rows of up to `pack_tokens` (never more than
        `batch_tokens`); each query's prefix is computed once and cached for its documents."""
        device = self.model.device
        prefixes = [
            [(k, v) for k, v, *_ in self._decoder(
                input_ids=torch.tensor([p.shared], dtype=torch.long, device=device), use_cache=True
            ).cache]
            for p in prompts
        ]  # fmt: skip
        rows = [(q, doc + p.suffix) for q, p in enumerate(prompts) for doc in p.documents]
        scores = [0.0] * len(rows)
        for batch in token_packs([len(t) for _, t in rows], min(self.pack_tokens, self.batch_tokens)):
            owners = sorted({rows[i][0] for i in batch})  # the prefixes this row's documents read
            lengths = [len(prompts[q].shared) for q in owners]
            row = pack_row(lengths, [(owners.index(rows[i][0]), rows[i][1]) for i in batch], device)
            per_layer = zip(*(prefixes[q] for q in owners), strict=True)
            cache = DynamicCache(
                [tuple(torch.cat(parts, 2) for parts in zip(*layer, strict=True)) for layer in per_layer]
            )
            hidden = self._decoder(
                input_ids=row.input_ids,
                attention_mask=row.attention_mask,
                position_ids=row.position_ids,
                cache=cache,
                use_cache=True,
                packed_segments=row.segments,
            ).last_hidden_state
            z = hidden[0, row.last].float() @ self._direction.to(device) + self._offset
            for i, s in zip(batch, torch.sigmoid(z.double()).tolist(), strict=True):
                scores[i] = s
        return per_prompt(scores, prompts)
