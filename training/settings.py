"""The training layer's settings: retrain (and its gate and canary), pair synthesis."""

from pydantic import BaseModel, Field

from twostage.retrieval.ingest.settings import IngestionSettings
from twostage.retrieval.models.settings import RemoteSettings
from twostage.retrieval.search.settings import QuerySettings
from twostage.retrieval.traffic.settings import FeedbackSettings


class RetrainSettings(BaseModel):
    """`twostage retrain`: how candidates are trained and what it takes to promote one."""

    gate_metric: str = Field("nDCG@10", description="per-query measure the gate's paired tests compare")
    min_gain: float = Field(0.005, ge=0, description="a promoted model gains at least this much")
    alpha: float = Field(0.05, gt=0, lt=1, description="significance level of the gate's paired tests")
    min_dev_queries: int = Field(30, ge=1, description="fewer dev queries than this: nothing is promoted")
    tolerance: float = Field(0.02, ge=0, description="how far the verify step's index metrics may drop")
    dev_fraction: float = Field(0.2, gt=0, lt=1, description="held-out share of --pairs without --dev")
    negatives: int = Field(3, ge=1, description="mined hard negatives per pair")
    top_k: int = Field(20, ge=1, description="dense candidates the reranker sees in evaluation")
    max_distractors: int = Field(20000, ge=0, description="indexed chunks added to the evaluation corpus")
    embedder_epochs: float = Field(1.0, gt=0)
    embedder_batch_size: int = Field(32, ge=2)
    embedder_lr: float = Field(1e-4, gt=0)
    reranker_epochs: float = Field(1.0, gt=0)
    reranker_batch_size: int = Field(16, ge=1)
    reranker_lr: float = Field(1e-4, gt=0)
    lora: bool = Field(True, description="LoRA (merged after training); False: full fine-tuning")
    mask_false_negatives: bool = Field(
        False, description="embedder: leave out in-batch negatives scored above the positive (GIST)"
    )
    eval_steps: int = Field(50, ge=1)
    reranker_max_length: int = Field(1024, ge=64, description="prompt tokens in reranker training")
    canary_events: int = Field(
        1000, ge=1, description="--canary: positive feedback events on canary-period searches before deciding"
    )
    canary_seconds: float = Field(7 * 86400.0, gt=0, description="--canary: decide after this long at most")
    canary_check_s: float = Field(10.0, gt=0, description="how often a service checks its canary's budget")


SYNTHESIS_PROMPT = (
    "Here is a passage from a document collection:\n\n{passage}\n\n"
    "Write one question a user could type into a search box that this passage answers. "
    "Reply with the question only."
)


class SynthesisSettings(BaseModel):
    """`twostage pairs synthesize`: queries an LLM writes for chunks, kept by a round trip."""

    prompt: str = Field(
        SYNTHESIS_PROMPT, min_length=10, description="the user message; {passage} is replaced by the chunk's "
        "text (its chat markers escaped)",
    )  # fmt: skip
    instruction: str | None = Field(
        None, min_length=1, description="the task instruction recorded with each pair and used by the round "
        "trip's search (default: embedder.instruction)",
    )  # fmt: skip
    top_k: int = Field(10, ge=1, le=1000, description="a query is kept when its chunk is in this many hits")
    max_passage_chars: int = Field(2000, ge=100, description="a longer chunk is cut for the prompt")
    max_new_tokens: int = Field(64, ge=8, le=1024)
    temperature: float = Field(0.7, ge=0, le=2)
    batch: int = Field(8, ge=1, le=256, description="chunks per generation call (--llm local)")
    llm: RemoteSettings = Field(
        default_factory=RemoteSettings, description="retries, timeout and key for --llm URL (url: the flag)"
    )


class TrainingSettings(IngestionSettings, QuerySettings):
    """What retraining, its gate and reindex, and pairs from traffic or an LLM read."""

    retrain: RetrainSettings = Field(default_factory=RetrainSettings)
    feedback: FeedbackSettings = Field(default_factory=FeedbackSettings)
    synthesis: SynthesisSettings = Field(default_factory=SynthesisSettings)
