"""Training: hard-negative mining, LoRA fine-tuning of the embedder and reranker, evaluation."""
